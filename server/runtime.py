"""Runners: execute a variant's graph, or the early-exit network stage by stage.

ONNX Runtime is the default backend: CPUExecutionProvider, plus CUDAExecutionProvider first when
the installed onnxruntime offers it. ``--backend torch`` runs a variant on eager torch when the
variant records how to rebuild it (``details["torch"] = {"spec": <models.py spec>, "state":
<path of a safetensors artifact>}``); the compressed graphs (int8, clustered, …) have no such
record, so those variants stay on ONNX Runtime and a warning says so. torch is imported only then.

Runners are called from the server's worker threads; ONNX Runtime releases the GIL while it runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort

from compression.core.family import Family, Variant
from server.router import unit_name

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "torch")
LOGITS = "logits"


def providers(device: str = "auto") -> list[str]:
    """ORT execution providers: CUDA first when available (``auto``) or required (``cuda``)."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(f"--device cuda: onnxruntime offers no CUDAExecutionProvider "
                           f"(available: {available})")
    return ["CPUExecutionProvider"]


class Runner(Protocol):
    """Something that maps an input batch to named outputs."""

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]: ...


class OrtRunner:
    """One ONNX graph in one ORT session; returns every output by name."""

    def __init__(self, graph: onnx.ModelProto, *, provider_list: Sequence[str],
                 threads: int = 1) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(graph.SerializeToString(), sess_options=opts,
                                            providers=list(provider_list))
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"graph has {len(inputs)} inputs, expected 1")
        self.input_name = inputs[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.backend = "onnxruntime"

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {self.input_name: x})
        return dict(zip(self.output_names, outs, strict=True))


class TorchRunner:
    """A variant rebuilt in eager torch from its recorded spec and safetensors state."""

    def __init__(self, family: Family, variant: Variant) -> None:
        import torch  # only with --backend torch
        from safetensors.torch import load as load_safetensors

        from compression.models import build_model

        rec = variant.details["torch"]
        self._torch = torch
        self.model = build_model(rec["spec"]).eval()
        state = load_safetensors((family.root / rec["state"]).read_bytes())
        self.model.load_state_dict(state)
        self.output_names = [LOGITS]
        self.backend = "torch"

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = x if x.flags.writeable else x.copy()  # request bytes are read-only views
        with self._torch.inference_mode():
            return {LOGITS: self.model(self._torch.from_numpy(x)).numpy()}


class Stages:
    """The early-exit network: stage i takes the previous stage's other output (stage 0: the
    image) and returns ``logits`` of exit i, plus a feature tensor for stage i+1 (not the last)."""

    def __init__(self, runners: list[OrtRunner]) -> None:
        self.runners = runners

    def __len__(self) -> int:
        return len(self.runners)

    def run(self, i: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outs = self.runners[i](x)
        logits = outs.pop(LOGITS)
        features = next(iter(outs.values())) if outs else None
        return logits, features


def torch_capable(v: Variant) -> bool:
    rec = v.details.get("torch") if isinstance(v.details, dict) else None
    return isinstance(rec, dict) and "spec" in rec and "state" in rec


def load_runners(family: Family, *, backend: str = "onnxruntime", device: str = "auto",
                 threads: int = 1) -> dict[str, Runner | Stages]:
    """A runner per variant: `Stages` for the early-exit network, else one graph runner."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: expected one of {BACKENDS}")
    plist = providers(device)
    out: dict[str, Runner | Stages] = {}
    for name, v in family.variants.items():
        if v.exits:
            graphs = family.stage_graphs(name)
            if len(graphs) != len(v.exits):
                raise ValueError(f"variant {name!r}: {len(graphs)} stage graphs but "
                                 f"{len(v.exits)} exits")
            out[name] = Stages([OrtRunner(g, provider_list=plist, threads=threads)
                                for g in graphs])
        elif backend == "torch" and torch_capable(v):
            out[name] = TorchRunner(family, v)
        else:
            if backend == "torch":
                log.warning("variant %s records no torch spec; serving it on onnxruntime", name)
            out[name] = OrtRunner(family.graph(name), provider_list=plist, threads=threads)
    return out


# --- warm-up and re-measurement ----------------------------------------------------------------

def time_ms(fn: Callable[[], Any], *, iters: int, budget_s: float = 1.0) -> dict[str, float]:
    """p50/p95 wall time of ``fn`` in ms over up to ``iters`` calls (fewer past ``budget_s``)."""
    samples: list[float] = []
    stop = time.perf_counter() + budget_s
    while len(samples) < iters and (len(samples) < 3 or time.perf_counter() < stop):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"p50": float(np.percentile(samples, 50)), "p95": float(np.percentile(samples, 95))}


def remeasure(name: str, runner: Runner | Stages, input_shape: Sequence[int],
              batch_sizes: Sequence[int] = (1, 8, 32), iters: int = 30
              ) -> dict[str, dict[str, dict[str, float]]]:
    """Warm a runner up and time it on this host: latency-model unit → {batch: p50/p95}.

    For the early-exit network each stage is its own unit, timed on the features the previous
    stage produces, so a candidate's cost is the sum of its stages.
    """
    rng = np.random.default_rng(0)
    tables: dict[str, dict[str, dict[str, float]]] = {}
    for b in batch_sizes:
        x = rng.random((b, *input_shape), dtype=np.float32)
        n = max(iters // max(b // 4, 1), 5)
        if isinstance(runner, Stages):
            feed: np.ndarray | None = x
            for i in range(len(runner)):
                assert feed is not None, f"stage {i} of {name!r} has no input features"
                stage, stage_in = runner, feed

                def run_stage(i: int = i, s: Stages = stage, inp: np.ndarray = stage_in) -> None:
                    s.run(i, inp)
                run_stage()  # warm-up
                tables.setdefault(unit_name(name, i), {})[str(b)] = time_ms(run_stage, iters=n)
                feed = runner.run(i, stage_in)[1]
        else:
            graph = runner

            def run_graph(r: Runner = graph, inp: np.ndarray = x) -> None:
                r(inp)
            run_graph()  # warm-up
            tables.setdefault(unit_name(name), {})[str(b)] = time_ms(run_graph, iters=n)
    return tables
