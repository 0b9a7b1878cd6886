"""When would a new batch start? The work ahead of it, laid out on the shared worker threads.

Every variant has its own queue (`server.batcher`) and runs at most one batch at a time, but all
variants share one pool of worker threads. A request sent to variant *v* now therefore waits for

1. *v*'s own chain: the rest of *v*'s running batch and every full batch queued before it, and
2. a free thread: batches of other variants that are running, or queued and released earlier,
   hold the threads first.

`plan` lays the known work out by greedy list scheduling — each batch, in the order it becomes
ready, takes the earliest free thread — which is what a FIFO thread pool does. The result says,
per variant, when its chain ends and when its last queued batch starts (a new request joins that
batch when it has room), and when a new batch of any variant would get a thread. All times are ms
from now. Pure: no clock, no threads; the router calls it with snapshots of the live queues.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import NamedTuple


class Backlog(NamedTuple):
    """One variant's work ahead of a new request, in predicted ms."""

    running_ms: float = 0.0  # what is left of the batch in flight (0: none)
    running_waits: bool = False  # the batch in flight still waits for a worker thread
    batches_ms: tuple[float, ...] = ()  # each queued batch's compute, in dispatch order


class Plan:
    """The known work laid out on the threads (ms from now)."""

    __slots__ = ("_starts", "jobs", "last_start_ms", "ready_ms", "threads")

    def __init__(self, ready_ms: Mapping[str, float], last_start_ms: Mapping[str, float],
                 jobs: tuple[tuple[float, float, float], ...], threads: int) -> None:
        self.ready_ms = ready_ms  # when each busy variant's chain ends (absent: idle now)
        self.last_start_ms = last_start_ms  # when each variant's last queued batch starts
        self.jobs = jobs  # (ready, start, end) of every batch laid out, in that order
        self.threads = threads
        self._starts: dict[float, float] = {}  # release → start: idle variants share one answer

    def start_ms(self, variant: str) -> float:
        """When a new batch of ``variant`` would start: once its own chain has ended (its release)
        and a thread is free. Batches released before it go first (the pool is FIFO); batches
        released after it do not delay it."""
        release = self.ready_ms.get(variant, 0.0)
        start = self._starts.get(release)
        if start is None:
            start = self._starts[release] = self._start(release)
        return start

    def _start(self, release: float) -> float:
        ahead = [(start, end) for ready, start, end in self.jobs if ready <= release]
        if not ahead:
            return release
        # Every batch ahead has a thread once the last of them starts; from then on threads only
        # free up, so the new batch starts at the first moment fewer than `threads` are busy.
        t = max(release, max(start for start, _ in ahead))
        busy = sorted(end for start, end in ahead if start <= t < end)
        if len(busy) < self.threads:
            return t
        return busy[len(busy) - self.threads]


IDLE_PLAN = Plan({}, {}, (), 1)


def chained(backlogs: Mapping[str, Backlog], threads: int) -> Plan:
    """The layout when no batch waits for a thread (fewer busy variants than threads, none
    waiting): each variant's chain simply runs its batches back to back."""
    ready: dict[str, float] = {}
    last_start: dict[str, float] = {}
    for name, (running_ms, _waits, batches) in backlogs.items():
        ready[name] = end = running_ms + sum(batches)
        last_start[name] = end - batches[-1] if batches else running_ms
    return Plan(ready, last_start, (), threads)


def plan(threads: int, backlogs: Mapping[str, Backlog]) -> Plan:
    """Greedy list scheduling of every variant's backlog on ``threads`` worker threads."""
    threads = max(int(threads), 1)
    free: list[float] = []  # end times of batches holding a thread now
    pending: list[tuple[float, int, str]] = []  # (ready at, tie-break, variant) of the next batch
    todo: dict[str, list[float]] = {}
    ready: dict[str, float] = {}
    laid: list[tuple[float, float, float]] = []
    for i, (name, (running_ms, waits, batches)) in enumerate(backlogs.items()):
        if waits:
            chain = [*batches[::-1], running_ms]  # pop() from the end = next in order
        else:
            chain = list(batches[::-1])
            if running_ms > 0:
                free.append(running_ms)  # on a thread already: holds it until done
                ready[name] = running_ms
                laid.append((-1.0, 0.0, running_ms))
        if chain:
            todo[name] = chain
            pending.append((ready.get(name, 0.0), i, name))
    free.sort()
    # Threads beyond the busy ones are free now; more busy batches than threads cannot happen
    # (the pool would queue them), so keep the ``threads`` soonest.
    free = ([0.0] * (threads - len(free)) + free)[:threads]
    heapq.heapify(pending)
    last_start: dict[str, float] = {}
    pop, push, replace = heapq.heappop, heapq.heappush, heapq.heapreplace
    while pending:
        at, i, name = pop(pending)
        chain = todo[name]
        first = free[0]
        start = at if at > first else first
        end = start + chain.pop()
        replace(free, end)  # the thread that freed first now runs this batch
        laid.append((at, start, end))
        ready[name] = end
        last_start[name] = start
        if chain:
            push(pending, (end, i, name))
    return Plan(ready, last_start, tuple(laid), threads)
