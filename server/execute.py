"""Executing one batch in a worker thread: a variant's graph, or the early-exit walk.

An `Execute` function takes the batch's queued items (several requests concatenated) and returns
a `BatchOutput`: per item its logits (and exits), plus the compute time of every latency-model unit
it ran, which the engine folds into the latency model. The early-exit network runs through
`compression.core.exits.walk`, the same code the build measured its exit policy with; the only
thing the server adds is the deadline test between stages (`StageBudget`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import numpy as np

from compression.core.exits import StageChain, walk
from compression.core.family import Variant
from compression.core.ort import OUTPUT_NAME
from server.batcher import BatchOutput, Execute, Item
from server.latency import unit_name
from server.runtime import Runner

# May the requests with these deadlines run ``stage`` of ``variant`` on ``samples`` samples?
StageBudget = Callable[[str, int, int, Sequence[float | None]], Sequence[bool]]


def graph_executor(name: str, runner: Runner) -> Execute:
    """A plain variant: one graph call on the whole batch."""
    def execute(items: list[Item]) -> BatchOutput:
        x = concat(items)
        t = time.perf_counter()
        logits = runner(x)[OUTPUT_NAME]
        ms = (time.perf_counter() - t) * 1e3
        return BatchOutput(split(logits, items), [None] * len(items),
                           [(unit_name(name), x.shape[0], ms)])
    return execute


def stages_executor(v: Variant, chain: StageChain, fits: StageBudget) -> Execute:
    """The early-exit network: a sample leaves when confident, at its request's deepest allowed
    exit, or when ``fits`` says its request's remaining budget cannot pay for the next stage."""
    assert v.exits, f"variant {v.name!r} has no exits"
    exits = sorted(v.exits, key=lambda e: e.index)
    thresholds = [e.threshold for e in exits]
    criterion = exits[0].criterion
    last = len(exits) - 1

    def execute(items: list[Item]) -> BatchOutput:
        x = concat(items)
        owner = np.repeat(np.arange(len(items)), [i.n for i in items])  # sample → item
        max_exit = np.array([last if i.max_exit is None else i.max_exit for i in items])[owner]
        deadlines = [i.deadline for i in items]

        def keep_going(stage: int, samples: np.ndarray) -> np.ndarray:
            mine = owner[samples]
            asked = np.unique(mine)
            ok = fits(v.name, stage, len(samples), [deadlines[k] for k in asked])
            allowed = asked[np.asarray(ok, dtype=bool)]
            return np.isin(mine, allowed)

        out = walk(chain, x, thresholds, criterion, max_exit=max_exit, keep_going=keep_going)
        timings = [(unit_name(v.name, s), n, ms) for s, n, ms in out.timings]
        return BatchOutput(split(out.logits, items), split(out.exits, items), timings)
    return execute


def split(a: np.ndarray, items: list[Item]) -> list[np.ndarray]:
    """Rows of a batch result back to the requests they came from."""
    bounds = np.cumsum([0, *[i.n for i in items]])
    return [a[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def concat(items: list[Item]) -> np.ndarray:
    return items[0].x if len(items) == 1 else np.concatenate([i.x for i in items])
