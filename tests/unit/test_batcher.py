"""The dynamic batcher on a real event loop with a fake runner: batching, deadlines, cancels."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from server.batcher import Batcher, BatchOutput, Item
from server.errors import BudgetExceeded, Overloaded
from server.settings import Settings


class FakeCosts:
    """A variant whose batches are predicted to take ``ms``; never inline, never timed out."""

    def __init__(self, ms: float = 0.0) -> None:
        self.ms = ms

    def predict_ms(self, n: int) -> float:
        return self.ms

    def timeout_s(self, n: int) -> float | None:
        return None

    def inline(self, n: int) -> bool:
        return False


class FakeRunner:
    """Records batch sizes; the first batch can be held until `release` (a busy variant)."""

    def __init__(self, hold_first: bool = False, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self.fail = fail

    def __call__(self, items: list[Item]) -> BatchOutput:
        self.sizes.append(sum(i.n for i in items))
        self.started.set()
        self.release.wait(10)
        if self.fail:
            raise RuntimeError("runner broke")
        return BatchOutput([i.x.reshape(i.n, -1)[:, :2] for i in items], [None] * len(items))


def _x(n: int = 1, value: float = 0.0) -> np.ndarray:
    return np.full((n, 1, 2, 2), value, np.float32)


def _run(test: Callable[[ThreadPoolExecutor], Coroutine[Any, Any, None]]) -> None:
    with ThreadPoolExecutor(2) as pool:
        asyncio.run(asyncio.wait_for(test(pool), 20))


async def _until_started(runner: FakeRunner) -> None:
    await asyncio.get_running_loop().run_in_executor(None, runner.started.wait, 10)


def test_requests_queued_behind_a_running_batch_share_the_next_one() -> None:
    runner = FakeRunner(hold_first=True)

    async def test(pool: ThreadPoolExecutor) -> None:
        b = Batcher("v", runner, pool, FakeCosts(), clock=time.monotonic, settings=Settings(max_batch=4))
        b.start()
        first = asyncio.create_task(b.submit(_x(), deadline=None))
        await _until_started(runner)
        rest = [asyncio.create_task(b.submit(_x(1, float(i)), deadline=None)) for i in range(5)]
        await asyncio.sleep(0)  # let them enqueue
        assert b.state().queued == 5 and b.state().running == 1
        runner.release.set()
        results = await asyncio.gather(first, *rest)
        assert runner.sizes == [1, 4, 1]
        assert [float(r.logits[0, 0]) for r in results[1:]] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert results[1].batch_size == 4 and results[1].queue_ms > 0
        await b.stop()

    _run(test)


def test_a_batch_counts_in_the_shared_pool_set_exactly_while_it_is_dispatched() -> None:
    """The engine reads `executing` over the batchers in this set (its load, twice a request):
    a batch joins it when handed to the pool and leaves once it returned, failed or not."""
    runner = FakeRunner(hold_first=True)
    in_pool: set[Batcher] = set()

    async def test(pool: ThreadPoolExecutor) -> None:
        b = Batcher("v", runner, pool, FakeCosts(), clock=time.monotonic, in_pool=in_pool)
        idle = Batcher("w", runner, pool, FakeCosts(), clock=time.monotonic, in_pool=in_pool)
        b.start()
        idle.start()
        assert in_pool == set()
        first = asyncio.create_task(b.submit(_x(), deadline=None))
        await _until_started(runner)
        assert in_pool == {b} and b.executing and not idle.executing
        runner.release.set()
        await first
        assert in_pool == set() and not b.executing
        runner.fail = True
        with pytest.raises(Exception, match="runner broke"):
            await b.submit(_x(), deadline=None)
        assert in_pool == set()
        await b.stop()
        await idle.stop()

    _run(test)


class InlineCosts(FakeCosts):
    """A variant small enough that every batch runs on the event loop."""

    def inline(self, n: int) -> bool:
        return True


def test_requests_arriving_in_one_loop_turn_share_one_batch_on_the_loop() -> None:
    """An idle lane whose batches run on the event loop still batches: what arrives in the same
    turn of the loop (a busy stream delivers many requests per turn) is one runner call, on the
    loop's own thread, not one call per request."""
    threads: list[int] = []

    def runner(items: list[Item]) -> BatchOutput:
        threads.append(threading.get_ident())
        return FakeRunner()(items)

    async def test(pool: ThreadPoolExecutor) -> None:
        b = Batcher("v", runner, pool, InlineCosts(), clock=time.monotonic,
                    settings=Settings(max_batch=8))
        b.start()
        out = await asyncio.gather(*(b.submit(_x(1, float(i)), deadline=None) for i in range(5)))
        assert [float(r.logits[0, 0]) for r in out] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert threads == [threading.get_ident()]  # one batch, on the loop's thread
        assert {r.batch_size for r in out} == {5}
        await b.stop()

    _run(test)


def test_a_request_alone_in_its_loop_turn_runs_at_once_on_an_idle_inline_lane() -> None:
    """A unary call (``alone``: nothing else arrives in its turn) to an idle lane whose batch
    runs on the loop is answered without suspending: no hand-off to the batching task. Behind a
    queued request it waits its turn and shares that batch, in order."""
    sizes: list[int] = []

    def runner(items: list[Item]) -> BatchOutput:
        sizes.append(sum(i.n for i in items))
        return FakeRunner()(items)

    async def test(pool: ThreadPoolExecutor) -> None:
        b = Batcher("v", runner, pool, InlineCosts(), clock=time.monotonic,
                    settings=Settings(max_batch=8))
        b.start()
        at_once = b.submit(_x(1, 7.0), deadline=None, alone=True)
        with pytest.raises(StopIteration) as answered:  # returned on its first step
            at_once.send(None)
        assert float(answered.value.value.logits[0, 0]) == 7.0 and sizes == [1]

        # Both start in the same turn: the first is queued before the batching task wakes.
        out = await asyncio.gather(b.submit(_x(1, 1.0), deadline=None),
                                   b.submit(_x(1, 2.0), deadline=None, alone=True))
        assert [float(r.logits[0, 0]) for r in out] == [1.0, 2.0]
        assert sizes == [1, 2]  # the second shared the queued one's batch
        await b.stop()

    _run(test)


def test_queue_delay_waits_for_company() -> None:
    runner = FakeRunner()

    async def test(pool: ThreadPoolExecutor) -> None:
        b = Batcher("v", runner, pool, FakeCosts(), clock=time.monotonic,
                    settings=Settings(max_batch=8, max_queue_delay_ms=200))
        b.start()
        await asyncio.gather(*(b.submit(_x(), deadline=None) for _ in range(3)))
        assert runner.sizes == [3]
        await b.stop()

    _run(test)


def test_a_full_batch_does_not_wait_for_the_delay() -> None:
    runner = FakeRunner()

    async def test(pool: ThreadPoolExecutor) -> None:
        b = Batcher("v", runner, pool, FakeCosts(), clock=time.monotonic,
                    settings=Settings(max_batch=4, max_queue_delay_ms=10_000))
        b.start()
        t0 = time.monotonic()
        await asyncio.gather(*(b.submit(_x(2), deadline=None) for _ in range(2)))
        assert runner.sizes == [4] and time.monotonic() - t0 < 5
        await b.stop()

    _run(test)


def test_deadline_cuts_the_batching_delay_short() -> None:
    runner = FakeRunner()

    async def test(pool: ThreadPoolExecutor) -> None:
        b = Batcher("v", runner, pool, FakeCosts(5.0), clock=time.monotonic,
                    settings=Settings(max_batch=8, max_queue_delay_ms=10_000))
        b.start()
        r = await b.submit(_x(), deadline=time.monotonic() + 0.05)  # must start by +45 ms
        assert runner.sizes == [1] and r.queue_ms < 1000  # not the 10 s delay
        await b.stop()

    _run(test)


def test_cancelled_request_never_runs() -> None:
    runner = FakeRunner(hold_first=True)

    async def test(pool: ThreadPoolExecutor) -> None:
        b = Batcher("v", runner, pool, FakeCosts(), clock=time.monotonic, settings=Settings(max_batch=8))
        b.start()
        first = asyncio.create_task(b.submit(_x(), deadline=None))
        await _until_started(runner)
        doomed = asyncio.create_task(b.submit(_x(3), deadline=None))
        kept = asyncio.create_task(b.submit(_x(2), deadline=None))
        await asyncio.sleep(0)
        doomed.cancel()
        runner.release.set()
        await asyncio.gather(first, kept)
        assert runner.sizes == [1, 2] and b.state().queued == 0
        await b.stop()

    _run(test)


def test_full_queue_is_overloaded_and_expired_requests_are_dropped_when_shedding() -> None:
    runner = FakeRunner(hold_first=True)

    async def test(pool: ThreadPoolExecutor) -> None:
        b = Batcher("v", runner, pool, FakeCosts(), clock=time.monotonic,
                    settings=Settings(max_batch=8, max_queue=3, on_miss="shed"))
        b.start()
        first = asyncio.create_task(b.submit(_x(), deadline=None))
        await _until_started(runner)
        late = asyncio.create_task(b.submit(_x(2), deadline=time.monotonic() - 1))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="queue full"):
            await b.submit(_x(2), deadline=None)
        runner.release.set()
        await first
        with pytest.raises(BudgetExceeded, match="deadline passed"):
            await late
        assert runner.sizes == [1]
        await b.stop()

    _run(test)


def test_runner_failure_fails_its_batch_only() -> None:
    runner = FakeRunner(fail=True)

    async def test(pool: ThreadPoolExecutor) -> None:
        b = Batcher("v", runner, pool, FakeCosts(), clock=time.monotonic)
        b.start()
        with pytest.raises(RuntimeError, match="runner broke"):
            await b.submit(_x(), deadline=None)
        runner.fail = False
        assert (await b.submit(_x(), deadline=None)).batch_size == 1
        await b.stop()

    _run(test)


def test_cancelled_requests_stop_counting_against_the_queue_at_once() -> None:
    """2,000 requests cancelled while a batch runs: none of them may hold queue room until the
    loop dequeues them (that answered later requests RESOURCE_EXHAUSTED), and none of their
    samples is subtracted twice when the loop does reach them."""
    runner = FakeRunner(hold_first=True)

    async def test(pool: ThreadPoolExecutor) -> None:
        b = Batcher("v", runner, pool, FakeCosts(), clock=time.monotonic,
                    settings=Settings(max_batch=8, max_queue=4))
        b.start()
        first = asyncio.create_task(b.submit(_x(), deadline=None))
        await _until_started(runner)
        kept = asyncio.create_task(b.submit(_x(1, 7.0), deadline=None))
        await asyncio.sleep(0)
        for _ in range(2000):
            doomed = asyncio.create_task(b.submit(_x(3), deadline=None))
            await asyncio.sleep(0)  # queued
            doomed.cancel()
            await asyncio.sleep(0)  # the cancellation lands
            await asyncio.sleep(0)  # and its done-callback runs
            assert b.state().queued == 1
        assert len(b._queue) < 50  # cancelled items (and their arrays) do not pile up
        late = asyncio.create_task(b.submit(_x(3), deadline=None))  # fits: 1 + 3 <= 4
        await asyncio.sleep(0)
        assert b.state().queued == 4
        runner.release.set()
        await first
        assert float((await kept).logits[0, 0]) == 7.0 and (await late).batch_size == 4
        assert b.state().queued == 0 and runner.sizes == [1, 4]
        await b.stop()

    _run(test)


def test_a_request_cancelled_after_the_loop_saw_it_is_not_subtracted_twice() -> None:
    runner = FakeRunner(hold_first=True)

    async def test(pool: ThreadPoolExecutor) -> None:
        b = Batcher("v", runner, pool, FakeCosts(), clock=time.monotonic,
                    settings=Settings(max_batch=8, max_queue=10))
        b.start()
        first = asyncio.create_task(b.submit(_x(), deadline=None))
        await _until_started(runner)
        doomed = asyncio.create_task(b.submit(_x(3), deadline=None))
        kept = asyncio.create_task(b.submit(_x(2), deadline=None))
        await asyncio.sleep(0)
        doomed.cancel()
        runner.release.set()  # the loop may reach the cancelled item before its callback runs
        await asyncio.gather(first, kept)
        await asyncio.sleep(0)
        assert b.state().queued == 0
        await b.stop()

    _run(test)


class TimedCosts(FakeCosts):
    """Batches time out after ``timeout`` seconds of running."""

    def __init__(self, timeout: float) -> None:
        super().__init__()
        self.timeout = timeout

    def timeout_s(self, n: int) -> float | None:
        return self.timeout


def test_the_batch_timeout_counts_running_time_not_waiting_for_a_thread() -> None:
    """One worker thread, held by another variant's batch for longer than this variant's
    timeout: this variant's batch waits for the thread, then runs, and is answered — a batch
    that waits for a thread is not hung (it was failed as 'timed out' before)."""
    busy = FakeRunner(hold_first=True)
    quick = FakeRunner()

    async def test(pool: ThreadPoolExecutor) -> None:
        settings = Settings(max_batch=4)
        a = Batcher("a", busy, pool, FakeCosts(), clock=time.monotonic, settings=settings)
        b = Batcher("b", quick, pool, TimedCosts(0.2), clock=time.monotonic, settings=settings)
        a.start()
        b.start()
        held = asyncio.create_task(a.submit(_x(), deadline=None))
        await _until_started(busy)
        waiting = asyncio.create_task(b.submit(_x(1, 3.0), deadline=None))
        await asyncio.sleep(0.5)  # 2.5x b's timeout, all of it waiting for the one thread
        assert b.state().waiting
        busy.release.set()
        await held
        result = await waiting
        assert np.all(result.logits == 3.0)
        await a.stop()
        await b.stop()

    with ThreadPoolExecutor(1) as pool:
        asyncio.run(asyncio.wait_for(test(pool), 20))
