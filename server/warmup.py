"""Seeding the latency model: from the manifest at load, then re-measured on this host.

The manifest's latencies were measured on the build host; they are only a first guess here. Before
the server says SERVING it runs every variant (every early-exit stage on the features the previous
stage produces) at a few batch sizes and replaces the guess with this host's times; from then on
the latency model learns online from every batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from compression.core.exits import Stages, walk
from compression.core.family import Family, LatencyTable, Variant
from compression.core.ort import OUTPUT_NAME, time_ms
from protos.wire import candidate_name, placed_name
from server.latency import LatencyModel, unit_name

if TYPE_CHECKING:
    from server.runtime import Runner

log = logging.getLogger(__name__)

Tables = dict[str, LatencyTable]  # latency-model unit → {batch: {"p50": ms, "p95": ms}}


def seed_from_manifest(latency: LatencyModel, v: Variant) -> None:
    """Build-host latencies until warm-up re-measures: early-exit stages as increments of the
    cumulative exit latencies the manifest records."""
    if not v.exits:
        latency.seed(unit_name(v.name), v.latency_ms)
        return
    prev: LatencyTable | None = None
    for e in sorted(v.exits, key=lambda e: e.index):
        inc = {b: {k: max(row[k] - (prev[b][k] if prev and b in prev else 0.0), 0.0)
                   for k in ("p50", "p95")} for b, row in e.latency_ms.items()}
        latency.seed(unit_name(v.name, e.index), inc)
        prev = e.latency_ms


def remeasure(name: str, runner: Runner | Stages, input_shape: Sequence[int],
              batch_sizes: Sequence[int] = (1, 8, 32), iters: int = 30) -> Tables:
    """Warm a runner up and time it on this host, per latency-model unit and batch size.

    For the early-exit network each stage is its own unit, timed on the features the previous
    stage produces, so a candidate's cost is the sum of its stages.
    """
    rng = np.random.default_rng(0)
    tables: Tables = {}
    for b in batch_sizes:
        x = rng.random((b, *input_shape), dtype=np.float32)
        n = max(iters // max(b // 4, 1), 5)  # fewer calls at big batches: warm-up stays short
        if isinstance(runner, Stages):
            feed: np.ndarray | None = x
            for i in range(len(runner)):
                assert feed is not None, f"stage {i} of {name!r} has no input features"
                stage_in = feed
                tables.setdefault(unit_name(name, i), {})[str(b)] = time_ms(
                    functools.partial(runner.stage, i, stage_in), warmup=1, iters=n,
                    max_seconds=1.0, min_iters=3)
                feed = runner.stage(i, stage_in)[1]
        else:
            tables.setdefault(unit_name(name), {})[str(b)] = time_ms(
                functools.partial(runner, x), warmup=1, iters=n, max_seconds=1.0, min_iters=3)
    return tables


def remeasure_accuracy(family: Family, runners: Mapping[str, Runner | Stages], device: str,
                       *, batch: int = 256) -> dict[str, float]:
    """Validation accuracy of every candidate of ``runners`` as they compute on ``device`` (fp16
    and bf16 change the numbers the build measured in fp32), by candidate name: what the router
    ranks GPU candidates by. Empty, with a warning, for families built without a validation
    sample: the build's fp32 accuracies are used then."""
    sample = family.validation()
    if sample is None:
        log.warning("family %r has no validation sample (built before it was kept): GPU "
                    "candidates are ranked by the build's fp32 accuracy", family.name)
        return {}
    x, y = sample
    out: dict[str, float] = {}
    for name, runner in runners.items():
        v = family.variant(name)
        if isinstance(runner, Stages):
            exits = sorted(v.exits or (), key=lambda e: e.index)
            thresholds = [e.threshold for e in exits]
            for e in exits:
                pred = np.concatenate([
                    walk(runner, x[i:i + batch], thresholds, exits[0].criterion,
                         max_exit=np.full(len(x[i:i + batch]), e.index)).logits.argmax(1)
                    for i in range(0, len(x), batch)])
                out[placed_name(candidate_name(name, e.index), device)] = float((pred == y).mean())
        else:
            pred = np.concatenate([runner(x[i:i + batch])[OUTPUT_NAME].argmax(1)
                                   for i in range(0, len(x), batch)])
            out[placed_name(name, device)] = float((pred == y).mean())
    for cand, acc in out.items():
        log.info("candidate %s: validation accuracy %.4f on %s (%d images)", cand, acc, device,
                 len(y))
    return out
