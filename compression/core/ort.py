"""ONNX Runtime sessions as every part of the product opens them, and the one timing helper.

The build profiles each variant with `session(graph, threads=1)`, the server serves through the
same factory (with its thread and provider choice), and the benchmarks compare against it: one set
of session options, so a latency measured at build time and one measured by the server are of the
same graph under the same optimisations.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    import onnx

INPUT_NAME = "input"  # every graph: FP32 [N, C, H, W], pixels in [0, 1]
OUTPUT_NAME = "logits"  # every graph (and every early-exit stage): FP32 [N, classes]
CPU = "CPUExecutionProvider"
# ORT's CPU arena keeps its peak for the session's life: eleven variants warmed up at batch 256
# held 1.3 GB. A run of more rows than this hands the arena's free chunks back afterwards (costs
# a re-allocation on the next large batch; measured in bench/memory.py).
SHRINK_ABOVE_ROWS = 32
_SHRINK = ort.RunOptions()
_SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Full graph optimisation, ``threads`` intra-op threads, no inter-op parallelism (our
    graphs are chains), warnings only."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(int(threads), 1)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


def session(graph: onnx.ModelProto | bytes, *, threads: int = 1,
            providers: Sequence[str] = (CPU,)) -> ort.InferenceSession:
    """An ORT session of ``graph`` (1 thread by default: reproducible build-time profiles)."""
    data = graph if isinstance(graph, bytes) else graph.SerializeToString()
    return ort.InferenceSession(data, sess_options=session_options(threads),
                                providers=list(providers))


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], *, rows: int
        ) -> list[np.ndarray]:
    """``sess.run`` of every output; a batch above `SHRINK_ABOVE_ROWS` rows shrinks the arena."""
    return sess.run(None, feeds, _SHRINK if rows > SHRINK_ABOVE_ROWS else None)


def time_ms(fn: Callable[[], object], *, warmup: int = 5, iters: int = 50,
            max_seconds: float = 2.0, min_iters: int = 10) -> dict[str, float]:
    """p50/p95 wall time of ``fn`` in ms over up to ``iters`` calls after ``warmup`` unmeasured
    ones; past ``max_seconds`` it stops once ``min_iters`` were taken (big batches)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(samples) < iters and (len(samples) < min_iters or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return {"p50": round(float(np.percentile(samples, 50)), 4),
            "p95": round(float(np.percentile(samples, 95)), 4)}
