"""Torch runners: a variant's torch form (`compression.core.torch_form`) on the CPU or a GPU.

`TorchGraphRunner` keeps `server.runtime.OrtRunner`'s contract (float32 numpy in; output name →
float32 numpy out); `TorchStageChain` is the early-exit network stage by stage for
`compression.core.exits.walk`, its features kept on the device between stages.

Every call is cut into chunks of at most ``max_batch`` rows, and a chunk runs at the smallest
*bucket* (the powers of two below ``max_batch``, and ``max_batch``) that holds it, its rows copied
into the head of a static input buffer. The rows past them hold whatever an earlier call left;
every op of a served graph works per sample, so they never reach the rows returned.

- On CUDA, `warm` captures one CUDA graph per bucket on the runner's own stream, and a call is:
  numpy → pinned host buffer → device (non-blocking, on that stream), replay, outputs → pinned
  host buffer, one stream synchronisation. Each runner owns its stream and buffers, so different
  runners may be called from different threads at once; one runner serves one call at a time
  (the server runs one batch per variant at a time).
- On the CPU the same path runs eagerly (no graphs, no pinned memory) under
  ``torch.inference_mode()``: the code that pads, chunks and copies is the code CI tests.

``dtype`` "fp16"/"bf16" casts the model and its inputs; outputs still come back as float32. In
fp32 the GPU graphs are captured with TF32 off: fp32 here means what ONNX Runtime computes.
This module imports torch only when a runner is built, so the server's modules all stay importable
without it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from compression.core.exits import FEATURES, stage_io
from compression.core.ort import OUTPUT_NAME
from compression.core.torch_form import input_name, input_shape, output_names, to_torch

if TYPE_CHECKING:
    import torch

DTYPES = ("fp32", "fp16", "bf16")
WARMUP_CALLS = 3  # eager calls per bucket before its capture: cuDNN autotunes, allocator settles

# warm() flips process-wide cuDNN/cuBLAS switches while it captures: one capture at a time.
_CAPTURE_LOCK = threading.Lock()


def cuda_problem() -> str | None:
    """None when torch is importable and sees a CUDA GPU; else one line saying what is missing
    and what to install. Never raises."""
    install = "pip install 'adaptive-inference[gpu]' (torch with CUDA) on a host with an NVIDIA driver"
    try:
        import torch
    except Exception as exc:  # not installed, or an install that fails to load
        return f"torch is not importable ({type(exc).__name__}: {exc}): {install}"
    try:
        if torch.cuda.is_available():
            return None
        cuda = torch.version.cuda
    except Exception as exc:  # a broken driver can make the probe itself fail
        return f"torch {torch.__version__}: probing CUDA failed ({type(exc).__name__}: {exc})"
    if not cuda:
        return f"torch {torch.__version__} is a CPU build (no CUDA): {install}"
    return (f"torch {torch.__version__} (CUDA {cuda}) sees no GPU: check the NVIDIA driver "
            f"(nvidia-smi) and CUDA_VISIBLE_DEVICES")


def buckets(max_batch: int) -> list[int]:
    """The batch sizes a runner runs at: the powers of two below ``max_batch``, then it."""
    if max_batch < 1:
        raise ValueError(f"max_batch {max_batch}: expected ≥ 1")
    return [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch] + [max_batch]


def _torch_dtype(dtype: str) -> torch.dtype:
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")
    return table[dtype]


@contextmanager
def _capture_flags(ieee_fp32: bool) -> Iterator[None]:
    """While `warm` warms up and captures (the captured kernels keep these choices): cuDNN
    benchmark on, since every bucket has fixed shapes and one autotuning pays for every replay;
    and for fp32 runners TF32 off in convolutions and matmuls. Restored afterwards."""
    import torch

    switches: list[tuple[Any, str, object]] = [(torch.backends.cudnn, "benchmark", True)]
    if ieee_fp32:
        if hasattr(torch.backends.cudnn, "conv"):  # torch ≥ 2.9: per-op precision
            switches += [(torch.backends.cudnn.conv, "fp32_precision", "ieee"),
                         (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
        else:  # (the legacy switches; mixing both APIs is an error in torch ≥ 2.9)
            switches += [(torch.backends.cudnn, "allow_tf32", False),
                         (torch.backends.cuda.matmul, "allow_tf32", False)]
    with _CAPTURE_LOCK:
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in switches]
        try:
            for obj, attr, value in switches:
                setattr(obj, attr, value)
            yield
        finally:
            for obj, attr, value in saved:
                setattr(obj, attr, value)


class _Executor:
    """One graph's torch form on one device and dtype, run in buckets (see the module doc).

    Outputs named in ``keep_on_device`` come back as tensors on the device in the model's dtype
    (the early-exit features); the others as float32 numpy arrays.
    """

    def __init__(self, graph: onnx.ModelProto, *, device: str, dtype: str, max_batch: int,
                 keep_on_device: Sequence[str] = ()) -> None:
        import torch

        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r}: expected cpu, cuda or cuda:N")
        self.cuda = self.device.type == "cuda"
        if self.cuda and (problem := cuda_problem()) is not None:
            raise RuntimeError(f"device {device!r}: {problem}")
        if self.cuda and self.device.index is None:  # pin "cuda" to one GPU for the capture
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = _torch_dtype(dtype)
        self.names = output_names(graph)
        self.host = [name not in keep_on_device for name in self.names]
        self.buckets = buckets(max_batch)
        self.max_batch = max_batch
        self.sample_shape = input_shape(graph)
        self.model = to_torch(graph).to(device=self.device, dtype=self.dtype)
        shape = (max_batch, *self.sample_shape)
        # The static input: float32 whatever the dtype, the cast to it is part of each run.
        self.x = torch.zeros(shape, dtype=torch.float32, device=self.device)
        # Where numpy input lands first: a pinned host buffer on CUDA, the static input on the CPU.
        self.staging = (torch.zeros(shape, dtype=torch.float32, pin_memory=True) if self.cuda
                        else self.x)
        self.staging_np = self.staging.numpy()
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]] = {}
        self.pinned_out: list[torch.Tensor | None] = []
        self.ready = False

    def _forward(self, rows: int) -> list[torch.Tensor]:
        """The model on the first ``rows`` rows of the static input; host-bound outputs in fp32."""
        outs = self.model(self.x[:rows].to(self.dtype))
        return [o.float() if host else o for o, host in zip(outs, self.host, strict=True)]

    def warm(self) -> None:
        """Prepare to serve: on CUDA capture every bucket's graph; on the CPU run the model once
        (a graph that cannot run fails here, not on the first request)."""
        import torch

        if self.ready:
            return
        with torch.inference_mode():
            if not self.cuda:
                self._forward(1)
            else:
                with _capture_flags(ieee_fp32=self.dtype == torch.float32):
                    for b in self.buckets:
                        self.graphs[b] = self._capture(b)
                _, outs = self.graphs[self.max_batch]
                self.pinned_out = [torch.empty(o.shape, dtype=o.dtype, pin_memory=True)
                                   if host else None for o, host in zip(outs, self.host,
                                                                        strict=True)]
        self.ready = True

    def _capture(self, rows: int) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
        """PyTorch's recipe: warm up on a side stream, then capture on it; the graph reads the
        static input and writes tensors of its own memory pool, its outputs."""
        import torch

        assert self.stream is not None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for _ in range(WARMUP_CALLS):
                self._forward(rows)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            outs = self._forward(rows)
        self.stream.synchronize()
        return graph, outs

    def run(self, x: np.ndarray | torch.Tensor) -> list[Any]:
        """Every output for ``x`` [N, *sample_shape] (numpy, or a tensor: an earlier stage's
        features), in output order; N > max_batch runs as max_batch chunks."""
        import torch

        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"input of shape {list(x.shape)}: expected [N, "
                             f"{', '.join(map(str, self.sample_shape))}]")
        if not self.ready:
            self.warm()
        n = int(x.shape[0])
        with torch.inference_mode():
            parts = [self._chunk(x, lo, min(self.max_batch, n - lo))
                     for lo in range(0, max(n, 1), self.max_batch)]
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(col) if host else torch.cat(col)
                for col, host in zip(zip(*parts, strict=True), self.host, strict=True)]

    def _feed(self, x: np.ndarray | torch.Tensor, lo: int, n: int) -> None:
        """Rows lo … lo+n of ``x`` into the head of the static input."""
        if isinstance(x, np.ndarray):
            np.copyto(self.staging_np[:n], x[lo:lo + n])
            if self.cuda:
                self.x[:n].copy_(self.staging[:n], non_blocking=True)
        else:
            self.x[:n].copy_(x[lo:lo + n])

    def _chunk(self, x: np.ndarray | torch.Tensor, lo: int, n: int) -> list[Any]:
        rows = next(b for b in self.buckets if b >= n)
        if not self.cuda:
            self._feed(x, lo, n)
            return [o[:n].numpy() if host else o[:n]
                    for o, host in zip(self._forward(rows), self.host, strict=True)]
        import torch

        assert self.stream is not None
        graph, outs = self.graphs[rows]
        caller = torch.cuda.current_stream(self.device)
        # The caller's stream may still be writing a device input (walk's masking) or copying
        # our previous call's features out of the graph's memory: the replay waits for both.
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            self._feed(x, lo, n)
            graph.replay()
            for o, pinned in zip(outs, self.pinned_out, strict=True):
                if pinned is not None:
                    pinned[:n].copy_(o[:n], non_blocking=True)
        self.stream.synchronize()
        # Copies: the pinned buffers and the graph's outputs are overwritten by the next call.
        # The device copies are made on the caller's stream, which owns them from here on.
        return [pinned[:n].numpy().copy() if pinned is not None else o[:n].clone()
                for o, pinned in zip(outs, self.pinned_out, strict=True)]


class TorchGraphRunner:
    """One variant's graph on torch, with `server.runtime.OrtRunner`'s contract: a float32 batch
    [N, C, H, W] in, {output name: float32 numpy} out. ``warm()`` before serving (the first call
    does it otherwise): on CUDA it captures the graphs."""

    backend = "torch"

    def __init__(self, graph: onnx.ModelProto, *, device: str = "cpu", dtype: str = "fp32",
                 max_batch: int = 32) -> None:
        self._exec = _Executor(graph, device=device, dtype=dtype, max_batch=max_batch)
        self.device = str(self._exec.device)
        self.output_names = self._exec.names

    def warm(self) -> None:
        self._exec.warm()

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self._exec.run(x), strict=True))


class TorchStageChain:
    """The early-exit network on torch (`compression.core.exits.Stages`): ``stage(i, x)`` →
    (stage i's logits as float32 numpy, its features as a tensor on the device, or None after
    the last stage). Stage 0 takes numpy pixels; a later stage takes what the one before returned,
    masked to the samples still running."""

    backend = "torch"

    def __init__(self, graphs: Sequence[onnx.ModelProto], *, device: str = "cpu",
                 dtype: str = "fp32", max_batch: int = 32) -> None:
        if not graphs:
            raise ValueError("an early-exit chain needs at least one stage")
        n = len(graphs)
        for i, g in enumerate(graphs):
            want_in, want_out = stage_io(i, n)
            got_in, got_out = input_name(g), output_names(g)
            if got_in != want_in or sorted(got_out) != sorted(want_out):
                raise ValueError(f"stage {i} of {n}: graph takes {got_in!r} and returns "
                                 f"{got_out}; the stage contract is {want_in!r} → "
                                 f"{list(want_out)}")
        self._stages = [_Executor(g, device=device, dtype=dtype, max_batch=max_batch,
                                  keep_on_device=(FEATURES,)) for g in graphs]
        self.device = str(self._stages[0].device)

    def __len__(self) -> int:
        return len(self._stages)

    def warm(self) -> None:
        for s in self._stages:
            s.warm()

    def stage(self, i: int, x: Any) -> tuple[np.ndarray, Any]:
        """Run stage ``i`` on ``x``: (its exit's logits, features for stage i+1 or None)."""
        ex = self._stages[i]
        out = dict(zip(ex.names, ex.run(x), strict=True))
        return out[OUTPUT_NAME], out.get(FEATURES)
