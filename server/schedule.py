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
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backlog:
    """One variant's work ahead of a new request, in predicted ms."""

    running_ms: float = 0.0  # what is left of the batch in flight (0: none)
    running_waits: bool = False  # the batch in flight still waits for a worker thread
    batches_ms: tuple[float, ...] = ()  # each queued batch's compute, in dispatch order
    partial: int = 0  # samples in the last queued batch when it has room for more, else 0


@dataclass(frozen=True, slots=True)
class Plan:
    """The known work laid out on the threads (ms from now)."""

    ready_ms: Mapping[str, float]  # when each busy variant's chain ends (absent: idle now)
    last_start_ms: Mapping[str, float]  # when each variant's last queued batch starts
    jobs: tuple[tuple[float, float, float], ...]  # (ready, start, end) of every batch, in order
    threads: int

    def start_ms(self, variant: str) -> float:
        """When a new batch of ``variant`` would start: once its own chain has ended (its release)
        and a thread is free. Batches released before it go first (the pool is FIFO); batches
        released after it do not delay it."""
        release = self.ready_ms.get(variant, 0.0)
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


def plan(threads: int, backlogs: Mapping[str, Backlog]) -> Plan:
    """Greedy list scheduling of every variant's backlog on ``threads`` worker threads."""
    threads = max(int(threads), 1)
    free: list[float] = []  # end times of batches holding a thread now
    pending: list[tuple[float, int, str]] = []  # (ready at, tie-break, variant) of the next batch
    todo: dict[str, list[float]] = {}
    ready: dict[str, float] = {}
    laid: list[tuple[float, float, float]] = []
    for i, (name, b) in enumerate(backlogs.items()):
        batches = list(b.batches_ms)
        if b.running_ms > 0 and not b.running_waits:
            free.append(b.running_ms)  # on a thread already: holds it until done
            ready[name] = b.running_ms
            laid.append((-1.0, 0.0, b.running_ms))
        elif b.running_waits:
            batches.insert(0, b.running_ms)
        if batches:
            todo[name] = batches[::-1]  # pop() from the end = next in order
            pending.append((ready.get(name, 0.0), i, name))
    free.sort()
    # Threads beyond the busy ones are free now; more busy batches than threads cannot happen
    # (the pool would queue them), so keep the ``threads`` soonest.
    free = ([0.0] * max(threads - len(free), 0) + free)[:threads]
    heapq.heapify(free)
    heapq.heapify(pending)
    last_start: dict[str, float] = {}
    while pending:
        at, i, name = heapq.heappop(pending)
        start = max(at, heapq.heappop(free))
        end = start + todo[name].pop()
        heapq.heappush(free, end)
        laid.append((at, start, end))
        ready[name] = end
        last_start[name] = start
        if todo[name]:
            heapq.heappush(pending, (end, i, name))
    return Plan(ready, last_start, tuple(laid), threads)
