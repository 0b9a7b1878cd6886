"""Runners: execute a variant's graph, or the early-exit network stage by stage.

ONNX Runtime is the default backend: CPUExecutionProvider, plus CUDAExecutionProvider first when
the installed onnxruntime offers it. The torch backend runs each variant's torch form, derived at
load time from its served, sha256-verified ONNX graph (`compression.core.torch_form`), with
`server.torch_runner`: CUDA graphs on a GPU, eager on the CPU. A variant whose graph has no torch
form (int8's QDQ graphs) stays on ONNX Runtime on the CPU, and a warning names it. torch is
imported only then: the default serving path never loads it.

Runners are called from the server's worker threads; ONNX Runtime and torch release the GIL while
they run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort

from compression.core.exits import StageChain, Stages
from compression.core.family import Family
from compression.core.ort import CPU, run, session
from server.errors import InvalidArgument

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "torch")


def providers(device: str = "auto") -> list[str]:
    """ORT execution providers: CUDA first when available (``auto``) or required (``cuda``)."""
    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", CPU]
    if device == "cuda":
        raise InvalidArgument(
            f"--device cuda: this onnxruntime has no CUDAExecutionProvider (it has "
            f"{', '.join(available)}); on a host with an NVIDIA driver install torch with CUDA "
            f"(pip install 'adaptive-inference[gpu]') or onnxruntime's CUDA build, or serve "
            f"with --device cpu")
    return [CPU]


class Runner(Protocol):
    """Something that maps an input batch to named outputs."""

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]: ...


class OrtRunner:
    """One ONNX graph in one ORT session; returns every output by name."""

    def __init__(self, graph: onnx.ModelProto, *, provider_list: Sequence[str],
                 threads: int = 1) -> None:
        self.session = session(graph, threads=threads, providers=provider_list)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"graph has {len(inputs)} inputs, expected 1")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.backend = "onnxruntime"

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = run(self.session, {self.input_name: x}, rows=len(x))
        return dict(zip(self.output_names, outs, strict=True))


def _stage_graphs(family: Family, name: str) -> list[onnx.ModelProto]:
    graphs = family.stage_graphs(name)
    exits = family.variant(name).exits or []
    if len(graphs) != len(exits):
        raise ValueError(f"variant {name!r}: {len(graphs)} stage graphs but {len(exits)} exits")
    return graphs


def torch_runners(family: Family, *, device: str, dtype: str = "fp32", max_batch: int = 256,
                  threads: int = 1) -> tuple[dict[str, Runner | Stages], dict[str, str]]:
    """Warmed torch runners on ``device`` ("cpu", "cuda", "cuda:N") for the variants whose
    graphs all have a torch form, and {variant: why not} for the others.

    A `TorchStageChain` for the early-exit network, else a `TorchGraphRunner`; on CUDA, warming
    captures their graphs (``max_batch`` sets the largest). On the CPU, ``threads`` is torch's
    intra-op thread count, which is process-wide (one per runner call, like ORT's sessions, since
    the server runs several batches at once).
    """
    import torch

    from compression.core.torch_form import supported
    from server.torch_runner import TorchGraphRunner, TorchStageChain

    if torch.device(device).type == "cpu":
        torch.set_num_threads(max(int(threads), 1))
    runners: dict[str, Runner | Stages] = {}
    skipped: dict[str, str] = {}
    for name, v in family.variants.items():
        graphs = _stage_graphs(family, name) if v.exits else [family.graph(name)]
        why = next((f"stage {i}: {w}" if v.exits else w for i, g in enumerate(graphs)
                    if (w := supported(g)) is not None), None)
        if why is not None:
            skipped[name] = why
            continue
        runner = (TorchStageChain(graphs, device=device, dtype=dtype, max_batch=max_batch)
                  if v.exits else
                  TorchGraphRunner(graphs[0], device=device, dtype=dtype, max_batch=max_batch))
        runner.warm()
        runners[name] = runner
    return runners, skipped


def load_runners(family: Family, *, backend: str = "onnxruntime", device: str = "cpu",
                 threads: int = 1, dtype: str = "fp32", max_batch: int = 32
                 ) -> dict[str, Runner | Stages]:
    """A runner per variant: `Stages` for the early-exit network, else one graph runner.

    ``backend="onnxruntime"``: ORT sessions with `providers(device)`. ``backend="torch"``: torch
    runners on ``device`` ("auto": CUDA when torch sees a GPU) for every variant that has a
    torch form (`torch_runners`), ORT on the CPU for the rest, named in a warning.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: expected one of {BACKENDS}")
    out: dict[str, Runner | Stages] = {}
    if backend == "torch":
        from server.torch_runner import cuda_problem

        if device == "auto":
            device = "cuda" if cuda_problem() is None else "cpu"
        out, skipped = torch_runners(family, device=device, dtype=dtype, max_batch=max_batch,
                                     threads=threads)
        if skipped:
            log.warning("--backend torch: %s on onnxruntime (CPU) instead: %s",
                        ", ".join(skipped), "; ".join(f"{n}: {w}" for n, w in skipped.items()))
        plist = [CPU]
    else:
        plist = providers(device)
    for name, v in family.variants.items():
        if name in out:
            continue
        out[name] = (StageChain.from_graphs(_stage_graphs(family, name), threads=threads,
                                            providers=plist)
                     if v.exits else
                     OrtRunner(family.graph(name), provider_list=plist, threads=threads))
    return out
