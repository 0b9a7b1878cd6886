"""Closed-loop calibration of the router: how wrong are its predictions, and what margin holds
the target miss rate?

Every answered request with a budget reports how long it took against what the router predicted
when it chose (`Calibration.observe`). From that stream, over the last ``window`` answers, none
older than ``horizon_s`` (refreshed every ``every`` answers and at least once a second):

- the **safety margin** added to a prediction of ``p`` ms is ``min(A, (F - 1)·p)``, where ``A`` is
  a high quantile of the additive errors (actual − predicted, ms) and ``F`` the same quantile of
  the ratios actual / predicted. Some lateness is additive (an event-loop hiccup costs a light
  variant as much as a heavy one) and some proportional (CPU contention stretches long work
  more): each bound alone is right for one kind and far too wide for the other, and the smaller
  of the two fits both. Each is taken at ``1 - target/2``, so that by the union bound at most a
  share ``target`` of answers finishes later than predicted plus margin, on a 2-core laptop and
  a 16-core server alike. A *window* rather than a running stochastic estimate, because the
  margin must shrink within seconds once a burst is over (a 1 % quantile tracker steps down a
  hundred times slower than up), and expire with time: a margin that made every request look too
  slow would shed them all and never hear of one again;
- the **observed miss rate**: an exponentially weighted share of budgeted requests answered late,
  the figure an operator compares with the target.

`CpuShare` adds the throughput side: the compute per request the CPU can sustain at the arrival
rate now. Pure: the caller passes the time and the measurements; no clock, no I/O.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import numpy as np

# Predictions below this (ms) are taken as this when dividing: a ratio of near-zero is noise.
MIN_PREDICTED_MS = 0.05
# `CpuShare`'s short view of the arrival rate: over this many arrivals (a burst shows in them).
RECENT_ARRIVALS = 8


@dataclass
class Calibration:
    """The router's safety margin and observed miss rate; see the module docstring."""

    target: float = 0.01  # share of answers allowed to finish later than predicted + margin
    window: int = 2048  # recent answers the quantiles are taken over (a 0.5 % tail: ~10 of them)
    horizon_s: float = 10.0  # …none older than this
    every: int = 32  # refresh every this many answers
    min_samples: int = 32  # below this many recent answers: the base (or the worst seen)
    max_margin_ms: float = 1_000.0
    max_factor: float = 100.0
    miss_alpha: float = 0.01  # EWMA weight of the miss-rate estimate (~100 requests)
    base: float = 1.0  # F until enough answers are known (warm-up's p95 / p50 on this host)
    factor: float = 1.0  # F
    additive_ms: float = math.inf  # A
    miss_rate: float = 0.0
    observed: int = 0
    ready: bool = False  # enough recent answers for the quantiles
    # A ring of the last `window` answers, rows (time, actual − predicted, actual / predicted):
    # numpy, because the quantiles are taken over it every `every` answers on the event loop.
    _ring: np.ndarray = field(init=False, repr=False)
    _refreshed: float = float("-inf")

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise ValueError(f"target miss rate must lie in (0, 1), got {self.target!r}")
        self._ring = np.empty((self.window, 3))

    def reset(self, base: float) -> None:
        """Start over from ``F = base`` (after warm-up: a typical p95 / p50 on this host)."""
        self.base = self.factor = base
        self.additive_ms = math.inf
        self.ready = False
        self.observed = 0

    def margin_ms(self, predicted_ms: float) -> float:
        """The margin to add to a prediction of ``predicted_ms``."""
        return min(self.additive_ms, (self.factor - 1.0) * predicted_ms)

    def observe(self, predicted_ms: float, actual_ms: float, *, now: float, missed: bool) -> None:
        """One answered request with a budget, at ``now`` (seconds): its predicted and actual
        completion (ms from the decision), and whether it missed its budget."""
        ratio = actual_ms / max(predicted_ms, MIN_PREDICTED_MS)
        self._ring[self.observed % self.window] = (now, actual_ms - predicted_ms, ratio)
        self.observed += 1
        if not self.ready and ratio > self.factor:
            # Until enough answers are known the factor is the worst seen: widen it at once, not
            # at the next refresh. A freshly started server's first tens of answers otherwise all
            # get warm-up's spread (measured: a third of them late at 500 requests/s).
            self.factor = min(ratio, self.max_factor)
        self.miss_rate += self.miss_alpha * (float(missed) - self.miss_rate)
        if self.observed % self.every == 0:
            self._refresh(now)

    def refresh(self, now: float) -> None:
        """Refresh by time too, not only by answers (at most once a second)."""
        if now - self._refreshed > 1.0:
            self._refresh(now)

    def _refresh(self, now: float) -> None:
        self._refreshed = now
        rows = self._ring[:min(self.observed, self.window)]
        oldest = now - self.horizon_s
        if len(rows) and rows[:, 0].min() < oldest:  # under load none has aged: no copy then
            rows = rows[rows[:, 0] >= oldest]
        self.ready = len(rows) >= self.min_samples
        if not self.ready:  # too few to take a quantile from
            worst = float(rows[:, 2].max()) if len(rows) else self.base
            self.factor = min(max(self.base, worst), self.max_factor)
            self.additive_ms = math.inf
            return
        q_add, q_ratio = upper_quantile(rows[:, 1:], 1.0 - self.target / 2)
        # Either can be negative (below 1) when predictions run pessimistic: it gives time back.
        self.additive_ms = float(min(max(q_add, -self.max_margin_ms), self.max_margin_ms))
        self.factor = float(min(q_ratio, self.max_factor))


def upper_quantile(rows: np.ndarray, q: float) -> np.ndarray:
    """``np.quantile(rows, q, axis=0)`` (linear interpolation) from a partial sort of the two
    order statistics around it: a quarter of np.quantile's cost on the event loop (23 against
    81 µs for 2,048 rows of two columns), which refreshes it every `Calibration.every` answers."""
    pos = q * (len(rows) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(rows) - 1)
    part = np.partition(rows, (lo, hi), axis=0)
    return part[lo] + (part[hi] - part[lo]) * (pos - lo)


@dataclass
class Overhead:
    """Per-request time outside the model (routing, queue hand-offs, event-loop wake-ups, the
    reply), ms: a smoothed mean learned from every answer, added to every prediction."""

    alpha: float = 0.05
    ms: float = 0.0

    def observe(self, ms: float) -> None:
        self.ms += self.alpha * (max(ms, 0.0) - self.ms)


@dataclass
class CpuShare:
    """How much compute per request the CPU can sustain at the arrival rate now, ms.

    Every request also costs CPU outside the model (decode, encode, gRPC, the event loop), and so
    does the rest of the host. What is left of the cores, divided by the arrival rate, is the
    compute a request may take on average without the server falling behind; the router prefers
    candidates within it. Without it, a router that picks the most accurate variant that fits
    each request's budget starves the event loop at high load: every choice fits on its own,
    together they do not. ``headroom`` keeps utilisation below 1 so queues stay short.

    Two time scales: the CPU a request costs outside the model and the cores other processes
    take change slowly, and are learned per sampling interval (`update`); the arrival rate can
    jump within a second (a burst), so it is an exponentially decaying count of arrivals with a
    time constant of ``tau_s`` (`arrived`), or the rate over the last `RECENT_ARRIVALS` arrivals
    where that is higher (a burst's onset), read at every decision (`share_ms`).

    With ``--workers N`` each worker sees only its own arrivals, and its sibling workers are the
    same server, not other load: the cores the host leaves to the server are split among the
    workers in proportion to the CPU each uses (``part``). Balanced, that is 1/N of them for 1/N
    of the arrivals, the very share one process would compute for all of them; a worker whose
    siblings idle (one client connection) has the host to itself, as one process would.
    """

    headroom: float = 0.7
    min_arrivals: int = 25  # per sampling interval, to learn the CPU a request costs
    tau_s: float = 0.1  # how fast the arrival rate follows a change
    alpha: float = 0.5  # EWMA weight of each sampling interval
    outside_ms: float = 0.0  # CPU ms per request outside the model (the request path)
    other_cores: float = 0.0  # cores busy with other processes (not this server's)
    part: float = 1.0  # this worker's part of the server's CPU (1 without --workers)
    cores: int = 1
    _rate: float = 0.0  # arrivals per second, decayed to `_at`
    _recent: collections.deque[float] = field(  # the last arrivals' times
        default_factory=lambda: collections.deque(maxlen=RECENT_ARRIVALS))
    _at: float = float("-inf")
    # The sampling interval in progress: since when, requests arrived, batch compute ms.
    _interval: tuple[float | None, int, float] = (None, 0, 0.0)

    def arrived(self, now: float) -> None:
        """One request arrived at ``now`` (seconds)."""
        self._rate = self._smoothed(now) + 1.0 / self.tau_s
        self._at = now
        self._recent.append(now)
        since, arrivals, compute_ms = self._interval
        self._interval = (since, arrivals + 1, compute_ms)

    def computed(self, ms: float) -> None:
        """A batch (or early-exit stage) computed for ``ms``."""
        since, arrivals, compute_ms = self._interval
        self._interval = (since, arrivals, compute_ms + ms)

    def sample(self, now: float, *, cores: int, cpu_process: float, cpu_other: float,
               cpu_siblings: float = 0.0) -> None:
        """End the sampling interval at ``now`` with the host's CPU shares over it (`update`),
        and start the next."""
        since, arrivals, compute_ms = self._interval
        if since is not None:
            self.update(seconds=now - since, arrivals=arrivals, compute_ms=compute_ms,
                        cores=cores, cpu_process=cpu_process, cpu_other=cpu_other,
                        cpu_siblings=cpu_siblings)
        self._interval = (now, 0, 0.0)

    def _smoothed(self, now: float) -> float:
        if self._at == float("-inf"):
            return 0.0
        return self._rate * math.exp(-max(now - self._at, 0.0) / self.tau_s)

    def rate(self, now: float) -> float:
        """Arrivals per second around ``now``."""
        smoothed = self._smoothed(now)
        if len(self._recent) < RECENT_ARRIVALS:
            return smoothed
        # The smoothed rate lags a burst's onset by a time constant or so, and in that time the
        # router, seeing an idle server, sends the first requests to heavy variants whose batches
        # hold every worker thread: the next tens of requests are shed. The rate over the last
        # few arrivals sees the burst within them; the larger of the two errs toward caution.
        # Arrivals closer together than a quarter of the time constant are a batch (a client
        # sending several at once), not a sustained rate of thousands a second.
        span = max(now - self._recent[0], self.tau_s / 4)
        return max(smoothed, (RECENT_ARRIVALS - 1) / span)

    def share_ms(self, now: float) -> float:
        """Compute per request (ms) the CPU left over can pay for at the arrival rate now."""
        rate = self.rate(now)
        if rate <= 0.0:
            return math.inf
        free = (self.cores - self.other_cores) * self.part - rate * self.outside_ms / 1e3
        return max(free, 0.0) * self.headroom * 1e3 / rate

    def update(self, *, seconds: float, arrivals: int, compute_ms: float, cores: int,
               cpu_process: float, cpu_other: float, cpu_siblings: float = 0.0) -> None:
        """Fold in one sampling interval: its length, the requests that arrived, the compute time
        of the batches that ran, and the CPU shares (0..1 of all cores) over it of this process,
        of other processes (``cpu_other``) and of this server's sibling workers."""
        self.cores = cores
        self.other_cores += self.alpha * (cpu_other * cores - self.other_cores)
        if cpu_process + cpu_siblings > 0.0:  # an idle server keeps the split it had
            part = cpu_process / (cpu_process + cpu_siblings)
            self.part += self.alpha * (part - self.part)
        if seconds <= 0 or arrivals < self.min_arrivals:
            # With a few requests per interval the process's CPU is mostly something else (its
            # threads' housekeeping, or whatever else the process hosts): no per-request figure.
            return
        compute_cores = compute_ms / 1e3 / seconds
        outside = max(cpu_process * cores - compute_cores, 0.0) * seconds * 1e3 / arrivals
        self.outside_ms += self.alpha * (outside - self.outside_ms) if self.outside_ms else outside
