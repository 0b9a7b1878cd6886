"""Measurements every variant gets: parameter count, MACs, artifact size and latency.

Latency is measured on ONNX Runtime with one intra-op thread (the build host's per-core cost, which
the server rescales online) at batch sizes 1, 8 and 32, reported as p50/p95 in milliseconds. The
sessions and the timing loop are `compression.core.ort`'s, the ones the server and benchmarks use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import torch
from torch import nn

from compression.core.family import BATCH_SIZES, LatencyTable
from compression.core.ort import session, time_ms


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one image through every Conv2d and Linear (hooks on a dry run)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1, *input_shape)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def onnx_latency(graph: onnx.ModelProto | bytes, input_shape: Sequence[int],
                 batch_sizes: Sequence[int] = BATCH_SIZES, iters: int = 50) -> LatencyTable:
    """p50/p95 of one ORT session (1 thread) per batch size."""
    sess = session(graph, threads=1)
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    table: LatencyTable = {}
    for b in batch_sizes:
        x = rng.random((b, *input_shape), dtype=np.float32)
        table[str(b)] = time_ms(lambda x=x: sess.run(None, {name: x}), iters=iters)
    return table


@torch.no_grad()
def torch_latency(model: nn.Module, input_shape: Sequence[int],
                  batch_sizes: Sequence[int] = BATCH_SIZES, iters: int = 50) -> LatencyTable:
    """The same table for eager torch on one thread, for the report's ORT-vs-torch comparison."""
    model = model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table: LatencyTable = {}
        for b in batch_sizes:
            x = torch.rand((b, *input_shape))
            table[str(b)] = time_ms(lambda x=x: model(x), iters=iters)
        return table
    finally:
        torch.set_num_threads(threads)
