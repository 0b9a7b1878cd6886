"""Executing one batch in a worker thread: a variant's graph, or the early-exit walk.

An `Execute` function takes the batch's queued items (several requests concatenated) and returns
a `BatchOutput`: per item its logits (and exits), plus the compute time of every latency-model unit
it ran, which the engine folds into the latency model. The early-exit network runs through
`compression.core.exits.walk`, the same code the build measured its exit policy with; the only
thing the server adds is the deadline test between stages (`StageBudget`).

Two guarantees per batch, whatever the path: the runner never sees more than ``max_batch``
samples at once (the batcher never combines requests past it, but runs a single larger request
alone, so that one is cut into ``max_batch`` chunks here and the results concatenated: memory per
session call stays bounded), and logits that are NaN or infinite fail the batch (`InternalError`)
instead of being answered as if valid.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from compression.core.exits import Stages, walk
from compression.core.family import Variant
from compression.core.ort import OUTPUT_NAME
from server.batcher import BatchOutput, Execute, Item
from server.errors import InternalError
from server.latency import unit_name
from server.runtime import Runner

# May the requests with these deadlines run ``stage`` of the lane on ``samples`` samples?
StageBudget = Callable[[str, int, int, Sequence[float | None]], Sequence[bool]]


def graph_executor(name: str, runner: Runner, *, max_batch: int | None = None) -> Execute:
    """A plain variant: one graph call per ``max_batch`` samples of the batch (None: one call)."""
    unit = unit_name(name)

    def execute(items: list[Item]) -> BatchOutput:
        x = concat(items)
        parts: list[np.ndarray] = []
        timings: list[tuple[str, int, float]] = []
        for rows in chunks(x.shape[0], max_batch):
            t = time.perf_counter()
            parts.append(runner(x[rows])[OUTPUT_NAME])
            timings.append((unit, rows.stop - rows.start, (time.perf_counter() - t) * 1e3))
        logits = parts[0] if len(parts) == 1 else np.concatenate(parts)
        check_finite(name, logits)
        return BatchOutput(split(logits, items), [None] * len(items), timings)
    return execute


def stages_executor(v: Variant, chain: Stages, fits: StageBudget, *, lane: str | None = None,
                    max_batch: int | None = None) -> Execute:
    """The early-exit network: a sample leaves when confident, at its request's deepest allowed
    exit, or when ``fits`` says its request's remaining budget cannot pay for the next stage.
    Walks ``max_batch`` samples at a time (None: the whole batch in one walk). ``lane``: the
    queue it runs for, which names its latency-model units (default: the variant on the CPU)."""
    assert v.exits, f"variant {v.name!r} has no exits"
    name = lane or v.name
    exits = sorted(v.exits, key=lambda e: e.index)
    thresholds = [e.threshold for e in exits]
    criterion = exits[0].criterion
    last = len(exits) - 1

    def execute(items: list[Item]) -> BatchOutput:
        x = concat(items)
        owner = np.repeat(np.arange(len(items)), [i.n for i in items])  # sample → item
        max_exit = np.array([last if i.max_exit is None else i.max_exit for i in items])[owner]
        deadlines = [i.deadline for i in items]

        logits: list[np.ndarray] = []
        used: list[np.ndarray] = []
        timings: list[tuple[str, int, float]] = []
        for rows in chunks(x.shape[0], max_batch):
            chunk_owner = owner[rows]

            def keep_going(stage: int, samples: np.ndarray,
                           chunk_owner: np.ndarray = chunk_owner) -> np.ndarray:
                mine = chunk_owner[samples]  # samples index the chunk
                asked = np.unique(mine)
                ok = fits(name, stage, len(samples), [deadlines[k] for k in asked])
                allowed = asked[np.asarray(ok, dtype=bool)]
                return np.isin(mine, allowed)

            out = walk(chain, x[rows], thresholds, criterion, max_exit=max_exit[rows],
                       keep_going=keep_going)
            logits.append(out.logits)
            used.append(out.exits)
            timings.extend((unit_name(name, s), n, ms) for s, n, ms in out.timings)
        all_logits = logits[0] if len(logits) == 1 else np.concatenate(logits)
        check_finite(v.name, all_logits)
        all_exits = used[0] if len(used) == 1 else np.concatenate(used)
        return BatchOutput(split(all_logits, items), split(all_exits, items), timings)
    return execute


def chunks(n: int, max_batch: int | None) -> list[slice]:
    """Row ranges of at most ``max_batch`` (None or ≥ n: one range of all ``n`` rows)."""
    step = n if max_batch is None or max_batch >= n else max(int(max_batch), 1)
    return [slice(lo, min(lo + step, n)) for lo in range(0, n, step)] if n else [slice(0, 0)]


def check_finite(variant: str, logits: np.ndarray) -> None:
    """Inputs are checked finite and in range when decoded, so NaN or infinite logits mean a
    broken variant (weights, numerics): fail the batch (the engine retries it elsewhere and the
    breaker quarantines the variant) rather than answer garbage with status OK."""
    if logits.size and math.isfinite(np.add.reduce(logits, axis=None)):
        return  # the common case in one pass: a NaN or ±Inf anywhere makes the sum non-finite
    # (finite logits whose sum overflows come here too, and pass the exact check)
    bad = ~np.isfinite(logits)
    if not bad.any():
        return
    rows = np.flatnonzero(bad.reshape(len(logits), -1).any(axis=1))
    raise InternalError(f"variant {variant!r} returned non-finite logits for {len(rows)} of "
                        f"{len(logits)} samples (first at sample {int(rows[0])}: "
                        f"{logits[rows[0]].tolist()[:4]}) from finite, in-range input")


def split(a: np.ndarray, items: list[Item]) -> list[np.ndarray]:
    """Rows of a batch result back to the requests they came from."""
    if len(items) == 1:
        return [a]
    bounds = np.cumsum([0, *[i.n for i in items]])
    return [a[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def concat(items: list[Item]) -> np.ndarray:
    return items[0].x if len(items) == 1 else np.concatenate([i.x for i in items])
