"""`--backend torch`: every variant whose served graph has a torch form runs on torch (here on the
CPU), int8's QDQ graph stays on ONNX Runtime, and the answers are ONNX Runtime's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from client import AdaptiveClient
from client.synthetic import SHAPE, cnn, plain, table, write_family
from compression.core.exits import StageChain, confidence, stage_io
from compression.core.family import Exit, Variant, load_family, write_artifact
from compression.export import to_onnx
from compression.methods import int8
from server.runtime import OrtRunner
from server.settings import ServeOptions
from server.torch_runner import TorchGraphRunner, TorchStageChain
from tests.harness import serve_in_thread


class _Stage(nn.Module):
    """One early-exit stage: a conv block (the features) and a pooled linear head (the exit)."""

    def __init__(self, c_in: int, last: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
        self.last = last

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        f = self.body(x)
        return self.head(f) if self.last else (f, self.head(f))


def _between(logits: np.ndarray) -> float:
    """A max_prob threshold halfway between the two middle confidences: half the samples leave."""
    c = np.sort(confidence(logits, "max_prob"))
    return float((c[len(c) // 2 - 1] + c[len(c) // 2]) / 2)


def _early_exit(root: Path, x: np.ndarray) -> Variant:
    graphs = []
    for i in range(3):
        inp, outs = stage_io(i, 3)
        graphs.append(to_onnx(_Stage(SHAPE[0] if i == 0 else 8, last=i == 2),
                              SHAPE if i == 0 else (8, *SHAPE[1:]), output_names=outs,
                              input_name=inp))
    arts = [write_artifact(root, f"early-exit/stage_{i}.onnx", g.SerializeToString(),
                           role="stage", stage=i) for i, g in enumerate(graphs)]
    # thresholds that send some of ``x`` to each exit, none within rounding of one
    logits = StageChain.from_graphs(graphs).run(x)
    thresholds = (_between(logits[0]), _between(logits[1]), 0.0)
    exits = [Exit(i, 0.9, table(0.1 * (i + 1)), t, 1 / 3) for i, t in enumerate(thresholds)]
    return Variant(name="early-exit", method="early_exit", params={}, artifacts=arts,
                   accuracy=0.9, params_count=0, macs=0, size_bytes=sum(a.bytes for a in arts),
                   latency_ms=table(0.3), exits=exits)


def _int8(root: Path, full: Variant, calibration: np.ndarray) -> Variant:
    graph = load_family(root).graph(full.name)  # the full graph as the family serves it
    quantized = int8.quantize(graph, calibration, int8.Int8Config())
    art = write_artifact(root, "int8/model.onnx", quantized.SerializeToString())
    return Variant(name="int8", method="int8", params={}, artifacts=[art], accuracy=0.98,
                   params_count=0, macs=0, size_bytes=art.bytes, latency_ms=table(0.2))


def _family(root: Path, x: np.ndarray) -> Path:
    torch.manual_seed(0)
    full = plain(root, "full", 0.99, cnn(8, 2), 0.3)
    early = _early_exit(root, x)
    write_family(root, [full, early])  # so the int8 build reads full's graph back
    return write_family(root, [full, _int8(root, full, x), early])


def test_torch_backend_serves_every_torch_form_on_torch_and_int8_on_onnx_runtime(
        tmp_path: Path) -> None:
    """The same family served twice, on ONNX Runtime and with --backend torch: torch runners
    for full and the early-exit network, ORT for int8; every pinned answer within 1e-4 and the
    early-exit walk leaving at the same exits."""
    x = np.random.default_rng(0).random((8, *SHAPE), dtype=np.float32)
    family = _family(tmp_path / "family", x)
    answers: dict[str, dict[str, tuple[np.ndarray, tuple[int, ...] | None]]] = {}
    for backend in ("onnxruntime", "torch"):
        options = ServeOptions(threads=1, backend=backend, device="cpu")
        with serve_in_thread(family, options=options, metrics=False) as running, \
                AdaptiveClient(running.target) as c:
            runners = running.server.engine.runners
            if backend == "torch":
                assert isinstance(runners["full"], TorchGraphRunner)
                assert isinstance(runners["early-exit"], TorchStageChain)
                assert isinstance(runners["int8"], OrtRunner)  # QDQ: CPU-only
            else:
                assert isinstance(runners["full"], OrtRunner)
            answers[backend] = {}
            for name in ("full", "int8", "early-exit@2"):  # @2: any exit, by confidence
                r = c.infer(x, variant=name)
                answers[backend][name] = (r.outputs, r.exits)
    for name, (want, want_exits) in answers["onnxruntime"].items():
        got, got_exits = answers["torch"][name]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=name)
        assert got_exits == want_exits, name
    assert len(set(answers["torch"]["early-exit@2"][1] or ())) > 1  # the walk masked features
