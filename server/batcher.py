"""Dynamic batching: one queue per variant, one batch of it computing at a time.

Requests wait in the variant's queue while its previous batch computes, so batches grow with load
by themselves. ``max_queue_delay_ms`` > 0 additionally holds the first request up to that long for
company, but never past the moment its deadline requires it to start: the batch is dispatched by
``min(first arrival + delay, earliest deadline − predicted compute of the batch)``. A batch never
exceeds ``max_batch`` samples (a single larger request runs alone). The batch runs in the worker
thread pool; the event loop only queues and wakes — except a batch that `Costs.inline` finds
cheaper than the hand-off to a thread and back (a tiny model): it runs on the loop itself, still
batched with whatever queued meanwhile.

Failures: a batch whose runner raises, or runs past `Costs.timeout_s`, fails its requests and
every request queued behind it with `VariantFailed` (the engine retries them on another variant)
and is reported once to the `Listener`. A timed-out batch cannot be killed (it is a thread):
the variant stays *wedged*, refusing new requests at once, until that call returns, so a hang holds
at most one worker thread per variant.

Cancellation: a request cancelled while it waits stops counting against ``max_queue`` at once
(in `submit`, where its wait is cancelled), not when the loop reaches it, so a burst of cancelled requests
cannot make later ones look like a full queue; its item is dropped from the queue when the
cancelled ones outnumber the live ones, so they cannot pile up (holding their arrays) either.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from server.errors import BudgetExceeded, Overloaded, Unavailable, VariantFailed
from server.latency import Clock, QueueState
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One request waiting in a queue."""

    x: np.ndarray  # [n, C, H, W] float32
    deadline: float | None  # clock seconds; None: no budget
    max_exit: int | None  # early-exit network: deepest exit allowed
    enqueued: float
    future: asyncio.Future[Result] = field(repr=False)
    # Its samples count in the batcher's `queued` (set when queued, cleared exactly once when
    # taken, failed or cancelled: what keeps the count from being subtracted twice).
    counted: bool = field(default=False, repr=False, compare=False)

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


@dataclass(frozen=True)
class Result:
    """What a request gets back from its batch."""

    logits: np.ndarray  # [n, classes]
    exits: np.ndarray | None  # [n] exit index per sample (early-exit network only)
    queue_ms: float
    compute_ms: float
    batch_size: int


@dataclass(frozen=True)
class BatchOutput:
    """What the execute function returns: one entry per item, in order, and the compute time of
    each latency-model unit it ran as ``(unit, batch size, ms)``."""

    logits: Sequence[np.ndarray]
    exits: Sequence[np.ndarray | None]
    timings: Sequence[tuple[str, int, float]] = ()


Execute = Callable[[list[Item]], BatchOutput]  # runs in a worker thread


class Costs(Protocol):
    """What a batcher asks about its variant's batches (the engine answers from the latency
    model, so the batcher never sees the router or the load)."""

    def predict_ms(self, n: int) -> float:
        """Predicted compute time (p95) of a batch of ``n`` samples."""
        ...

    def timeout_s(self, n: int) -> float | None:
        """How long a batch of ``n`` may run before it counts as hung (None: forever)."""
        ...

    def inline(self, n: int) -> bool:
        """Run a batch of ``n`` on the event loop itself instead of the thread pool?"""
        ...


class Listener(Protocol):
    """Who hears about finished and failed batches (on the event loop)."""

    def batch_done(self, variant: str, items: list[Item], started: float, out: BatchOutput
                   ) -> None: ...

    def batch_failed(self, exc: VariantFailed) -> None:
        """Once per failed batch."""
        ...


class Batcher:
    """A variant's queue and its batching loop; `submit` from the event loop."""

    def __init__(self, name: str, execute: Execute, executor: Executor, costs: Costs, *,
                 clock: Clock, settings: Settings = Settings(), listener: Listener | None = None,
                 in_pool: set[Batcher] | None = None) -> None:
        self.name = name
        self._execute = execute
        self._executor = executor
        self._costs = costs
        self._clock = clock
        self._listener = listener
        self.max_batch = max(int(settings.max_batch), 1)
        self.max_delay_s = max(float(settings.max_queue_delay_ms), 0.0) / 1e3
        self.max_queue = settings.max_queue
        # Shedding: a request whose deadline passed in the queue is failed, not computed.
        self._drop_expired = settings.on_miss == "shed"
        self._wedged: asyncio.Future[BatchOutput] | None = None  # a timed-out call still running
        self._watch: asyncio.TimerHandle | None = None  # the running batch's timeout
        self._queue: collections.deque[Item] = collections.deque()
        self._queued = 0  # samples of the live (not cancelled) items in _queue
        self._dead = 0  # cancelled items still in _queue, no longer counted
        self._running = 0  # samples in the batch dispatched now
        self._started_at: float | None = None  # when a worker thread began it (None: waiting)
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Shared with the engine's other CPU lanes: the batchers with a batch in the pool now, so
        # the engine counts `executing` over those few instead of asking every lane twice per
        # request (most batches of a small model run inline and never enter it).
        self._in_pool = in_pool if in_pool is not None else set()

    # --- the router's view (a `QueueView`, read live: no snapshot per request) -----------------

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return self._running

    @property
    def running_for_ms(self) -> float:
        """How long the dispatched batch has been computing on its worker thread."""
        started = self._started_at
        return (self._clock() - started) * 1e3 if self._running and started is not None else 0.0

    @property
    def executing(self) -> bool:
        """A dispatched batch is computing on a worker thread now."""
        return bool(self._running) and self._started_at is not None

    @property
    def waiting(self) -> bool:
        """The dispatched batch still waits in the pool for a free worker thread."""
        return bool(self._running) and self._started_at is None

    def state(self) -> QueueState:
        return QueueState(self.queued, self.running, self.running_for_ms, self.waiting)

    @property
    def wedged(self) -> bool:
        """A timed-out batch is still running in its thread."""
        return self._wedged is not None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(),
                                                                name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            item = self._queue.popleft()
            item.counted = False
            if not item.future.done():
                item.future.set_exception(Unavailable("server is shutting down"))
        self._queued = self._dead = 0

    # --- requests ------------------------------------------------------------------------------

    async def submit(self, x: np.ndarray, *, deadline: float | None,
                     max_exit: int | None = None, alone: bool = False) -> Result:
        """Queue ``x`` and wait for its share of a batch. Cancelling the caller drops the item.

        ``alone``: the caller knows nothing else arrives with it in this turn of the loop (a
        unary call: gRPC's aio server hands the loop one new call per turn). Then an idle lane
        whose batch would run on the loop runs it here and now: waiting a turn for company would
        find none, and the hand-off to the batching task costs two task switches and a future
        (4 % of the server's CPU per unary answer, bench/ceiling.py, 2 cores)."""
        if self._task is None:
            raise Unavailable(f"variant {self.name!r} is not running")
        if self._wedged is not None:
            raise VariantFailed(self.name, "a timed-out batch is still running")
        if self._queued + x.shape[0] > self.max_queue:
            raise Overloaded(f"variant {self.name!r}: queue full ({self._queued} samples queued, "
                             f"limit {self.max_queue})")
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        item = Item(x, deadline, max_exit, self._clock(), future)
        if (alone and not self._queue and not self._running and self.max_delay_s <= 0
                and self._costs.inline(item.n)):
            self._run_inline([item], item.n)
            return future.result()  # set by now: an answer, or the batch's failure
        # Otherwise through the queue, even to an idle lane whose batch would run on the loop:
        # the batching task takes it on the loop's next turn, with every request that arrived
        # in this one (a busy stream delivers many per turn). Running each stream request at
        # once, alone, cost 40 % more server CPU per answer (bench/ceiling.py --stream, 2 cores).
        self._queue.append(item)
        self._queued += item.n
        item.counted = True
        self._arrived.set()
        try:
            return await future
        except asyncio.CancelledError:  # the caller was cancelled (and with it the future)
            self._cancelled(item)
            raise

    def _cancelled(self, item: Item) -> None:
        """A request cancelled while still queued gives its room back now (not when the loop
        reaches it); the loop skips its item."""
        if not item.counted or not item.future.cancelled():
            return  # taken, failed or answered: already uncounted
        item.counted = False
        self._queued -= item.n
        self._dead += 1
        if self._dead > len(self._queue) // 2:  # mostly cancelled: compact (frees their arrays)
            live = [i for i in self._queue if i.counted]
            self._queue.clear()
            self._queue.extend(live)
            self._dead = 0

    # --- the loop ------------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if self.max_delay_s > 0:
                await self._hold()
            items = self._take()
            if not items:
                continue
            n = sum(i.n for i in items)
            if self._costs.inline(n):
                self._run_inline(items, n)
                if self._queue:  # more than one batch was waiting: let the loop serve others first
                    await asyncio.sleep(0)
            else:
                await self._dispatch(loop, items, n)

    async def _dispatch(self, loop: asyncio.AbstractEventLoop, items: list[Item], n: int) -> None:
        """Run a batch in the worker thread pool and answer its requests."""
        t0 = self._clock()
        self._running, self._started_at = n, None
        self._in_pool.add(self)
        call = loop.run_in_executor(self._executor, self._run, items)
        timeout = self._costs.timeout_s(n)
        if timeout is not None:
            # A timer rather than wait_for(shield(call)): no extra future, task and callbacks per
            # batch; it acts only on a batch that overruns (`_overran`).
            self._watch = loop.call_later(timeout, self._overran, call, items, timeout)
        out: BatchOutput | None = None
        try:
            out = await call
        except Exception as exc:  # a runner failure fails this batch, not the server
            if self._wedged is not call:
                log.error("variant %s: batch of %d failed: %s: %s", self.name, n,
                          type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                self._fail(items, VariantFailed(self.name, f"{type(exc).__name__}: {exc}"))
        finally:
            self._running = 0
            self._in_pool.discard(self)
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None
        if self._wedged is call:  # it timed out: its requests were failed then; drop its result
            self._wedged = None
            log.info("variant %s: the timed-out batch returned", self.name)
        elif out is not None:
            self._answer(items, out, t0, n)

    def _run(self, items: list[Item]) -> BatchOutput:
        """In the worker thread: mark the start (the router's view of the pool), then run."""
        self._started_at = self._clock()
        return self._execute(items)

    def _overran(self, call: asyncio.Future[BatchOutput], items: list[Item], timeout: float
                 ) -> None:
        """Timer: the batch was dispatched ``timeout`` seconds ago. Time spent waiting for a free
        worker thread (behind other variants' batches) is not a hang, so the batch times out
        once it has *run* that long (`_run` marks the start); until then the timer is re-armed.
        A timed-out batch fails its requests (and those queued behind it) at once; its thread
        cannot be stopped, so the variant stays wedged, refusing requests, until it returns."""
        if call.done():  # it returned just now; the loop has yet to take its result
            self._watch = None
            return
        started = self._started_at
        left = timeout if started is None else started + timeout - self._clock()
        if left > 0:
            self._watch = asyncio.get_running_loop().call_later(left, self._overran, call, items,
                                                                timeout)
            return
        self._watch = None
        n = sum(i.n for i in items)
        log.error("variant %s: batch of %d still running after %.3f s; wedged until it returns",
                  self.name, n, timeout)
        self._wedged = call
        self._running = 0
        self._fail(items, VariantFailed(self.name, f"batch of {n} timed out after "
                                                   f"{timeout:.3f} s"))

    def _fail(self, items: list[Item], exc: VariantFailed) -> None:
        """Fail a batch and everything queued behind it (retried elsewhere at once, rather than
        run on a variant that just failed); report the failure once."""
        behind = list(self._queue)
        self._queue.clear()
        self._queued = self._dead = 0
        for item in behind:
            item.counted = False
        for item in (*items, *behind):
            if not item.future.done():
                item.future.set_exception(exc)
        if self._listener is not None:
            self._listener.batch_failed(exc)

    def _run_inline(self, items: list[Item], n: int) -> None:
        """`Costs.inline`: a batch predicted to take less than a thread hand-off runs on the event
        loop thread itself, blocking the loop about that long and saving the pool's two thread
        wake-ups. It cannot be timed out (the engine never inlines a variant that may hang)."""
        t0 = self._clock()
        try:
            out = self._execute(items)
        except Exception as exc:  # as in the pool: the batch fails, its requests are retried
            log.error("variant %s: batch of %d failed: %s: %s", self.name, n, type(exc).__name__,
                      exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self._fail(items, VariantFailed(self.name, f"{type(exc).__name__}: {exc}"))
            return
        self._answer(items, out, t0, n)

    def _answer(self, items: list[Item], out: BatchOutput, t0: float, n: int) -> None:
        """Give each request its share of a batch that started at ``t0``; tell the listener."""
        compute_ms = (self._clock() - t0) * 1e3
        for item, logits, exits in zip(items, out.logits, out.exits, strict=True):
            if not item.future.done():
                item.future.set_result(Result(logits, exits, (t0 - item.enqueued) * 1e3,
                                              compute_ms, n))
        if self._listener is not None:
            self._listener.batch_done(self.name, items, t0, out)

    async def _hold(self) -> None:
        """Wait for more requests until the batch is full, the delay is up, or a deadline needs
        the batch to start."""
        first = self._queue[0].enqueued
        while self._queued < self.max_batch:
            flush_at = first + self.max_delay_s
            deadlines = [i.deadline for i in self._queue if i.deadline is not None]
            if deadlines:
                flush_at = min(flush_at, min(deadlines) - self._costs.predict_ms(self._queued) / 1e3)
            timeout = flush_at - self._clock()
            if timeout <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                return

    def _take(self) -> list[Item]:
        """Pop up to ``max_batch`` samples of live requests (at least one request)."""
        items: list[Item] = []
        n = 0
        now = self._clock()
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # cancelled by its caller
                self._queue.popleft()
                self._uncount(item)
                continue
            if self._drop_expired and item.deadline is not None and item.deadline <= now:
                self._queue.popleft()
                self._uncount(item)
                item.future.set_exception(BudgetExceeded(
                    f"deadline passed after {(now - item.enqueued) * 1e3:.3f} ms in the "
                    f"{self.name!r} queue"))
                continue
            if items and n + item.n > self.max_batch:
                break
            self._queue.popleft()
            self._uncount(item)
            items.append(item)
            n += item.n
        return items

    def _uncount(self, item: Item) -> None:
        """An item leaves the queue: its samples stop counting, unless its cancellation did
        that already (then it was one of the `_dead`)."""
        if item.counted:
            item.counted = False
            self._queued -= item.n
        else:
            self._dead -= 1
