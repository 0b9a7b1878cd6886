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
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort

from compression.core.exits import StageChain
from compression.core.family import Family, Variant
from compression.core.ort import CPU, OUTPUT_NAME, run, session
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
            f"{', '.join(available)}); on a host with an NVIDIA driver install onnxruntime-gpu "
            f"(pip install 'adaptive-inference[gpu]'), or serve with --device cpu")
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
        self.output_names = [OUTPUT_NAME]
        self.backend = "torch"

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = x if x.flags.writeable else x.copy()  # request bytes are read-only views
        with self._torch.inference_mode():
            return {OUTPUT_NAME: self.model(self._torch.from_numpy(x)).numpy()}


def torch_capable(v: Variant) -> bool:
    rec = v.details.get("torch") if isinstance(v.details, dict) else None
    return isinstance(rec, dict) and "spec" in rec and "state" in rec


def load_runners(family: Family, *, backend: str = "onnxruntime", device: str = "auto",
                 threads: int = 1) -> dict[str, Runner | StageChain]:
    """A runner per variant: a `StageChain` for the early-exit network, else one graph runner."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: expected one of {BACKENDS}")
    plist = providers(device)
    out: dict[str, Runner | StageChain] = {}
    for name, v in family.variants.items():
        if v.exits:
            graphs = family.stage_graphs(name)
            if len(graphs) != len(v.exits):
                raise ValueError(f"variant {name!r}: {len(graphs)} stage graphs but "
                                 f"{len(v.exits)} exits")
            out[name] = StageChain.from_graphs(graphs, threads=threads, providers=plist)
        elif backend == "torch" and torch_capable(v):
            out[name] = TorchRunner(family, v)
        else:
            if backend == "torch":
                log.warning("variant %s records no torch spec; serving it on onnxruntime", name)
            out[name] = OrtRunner(family.graph(name), provider_list=plist, threads=threads)
    return out
