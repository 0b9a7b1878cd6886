"""`server.execute` with fake runners: an over-sized request runs in ``max_batch`` chunks whose
results are concatenated in order, and non-finite logits fail the batch instead of answering."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from compression.core.family import Exit, Variant
from server.batcher import Item
from server.errors import InternalError
from server.execute import graph_executor, stages_executor


def _item(n: int, start: float = 0.0, max_exit: int | None = None) -> Item:
    x = (start + np.arange(n, dtype=np.float32)).reshape(n, 1, 1, 1) * np.ones((1, 1, 2, 2),
                                                                              np.float32)
    loop = asyncio.new_event_loop()
    try:
        return Item(x, None, max_exit, 0.0, loop.create_future())
    finally:
        loop.close()


class Graph:
    """A runner whose logits are the sample's first pixel and its negation; records batch sizes."""

    def __init__(self, poison: float | None = None) -> None:
        self.sizes: list[int] = []
        self.poison = poison

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        self.sizes.append(len(x))
        first = x.reshape(len(x), -1)[:, :1]
        logits = np.concatenate([first, -first], axis=1)
        if self.poison is not None:
            logits[-1, 0] = self.poison
        return {"logits": logits}


def test_an_oversized_request_runs_in_max_batch_chunks() -> None:
    runner = Graph()
    out = graph_executor("v", runner, max_batch=4)([_item(10)])
    assert runner.sizes == [4, 4, 2]
    np.testing.assert_array_equal(out.logits[0][:, 0], np.arange(10, dtype=np.float32))
    assert [(b, unit) for unit, b, _ms in out.timings] == [(4, "v"), (4, "v"), (2, "v")]
    together = Graph()  # a batch of several requests within max_batch: one call, split back
    out = graph_executor("v", together, max_batch=4)([_item(1), _item(3, 1.0)])
    assert together.sizes == [4]
    assert [len(a) for a in out.logits] == [1, 3]
    assert graph_executor("v", unbounded := Graph())([_item(10)]) and unbounded.sizes == [10]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_fail_the_batch(bad: float) -> None:
    with pytest.raises(InternalError, match=r"variant 'v' returned non-finite logits .*"
                                            r"first at sample 2"):
        graph_executor("v", Graph(poison=bad))([_item(3)])


class Chain:
    """Two stages: stage 0 is confident (logits ±100) for samples with a first pixel >= 5."""

    def __init__(self, poison: bool = False) -> None:
        self.calls: list[tuple[int, int]] = []
        self.poison = poison

    def __len__(self) -> int:
        return 2

    def stage(self, i: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        self.calls.append((i, len(x)))
        first = x.reshape(len(x), -1)[:, :1]
        if i == 0:
            logits = np.where(first >= 5, 100.0, 0.0).astype(np.float32)
            return np.concatenate([logits, -logits], axis=1), x
        logits = np.concatenate([first, -first], axis=1).astype(np.float32)
        if self.poison:
            logits[0, 1] = np.nan
        return logits, None


VARIANT = Variant(name="ee", method="early-exit", params={}, artifacts=[], accuracy=0.9,
                  params_count=1, macs=1, size_bytes=1, latency_ms={},
                  exits=[Exit(index=0, accuracy=0.8, latency_ms={}, threshold=0.9,
                              exit_share=0.5),
                         Exit(index=1, accuracy=0.9, latency_ms={}, threshold=0.0,
                              exit_share=0.5)])


def _always(variant: str, stage: int, samples: int, deadlines: object) -> list[bool]:
    return [True] * len(deadlines)  # type: ignore[arg-type]


def test_the_early_exit_walk_runs_in_max_batch_chunks() -> None:
    chain = Chain()
    out = stages_executor(VARIANT, chain, _always, max_batch=4)([_item(10)])  # type: ignore[arg-type]
    assert [n for s, n in chain.calls if s == 0] == [4, 4, 2]
    assert all(n <= 4 for _s, n in chain.calls)
    exits = out.exits[0]
    assert exits is not None
    np.testing.assert_array_equal(exits, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out.logits[0][:5, 0], np.arange(5, dtype=np.float32))
    assert (out.logits[0][5:, 0] == 100.0).all()
    with pytest.raises(InternalError, match="non-finite"):
        stages_executor(VARIANT, Chain(poison=True), _always)([_item(2)])  # type: ignore[arg-type]
