"""The latency model: how long a unit of work computes at a batch size, on this host.

A *unit* is one thing a runner executes: a variant's graph (``"full"``) or one stage of the
early-exit network (``"early-exit/1"``); a routing candidate costs the sum of its units. For each
unit we keep estimates at a few batch sizes, seeded from the manifest (measured on the build host)
or the warm-up re-measurement, then updated online with an EWMA of observed compute times, in the
style of TCP's RTT estimator: a smoothed mean and a smoothed absolute deviation, p95 ≈ mean + k·dev.

Waiting is not modelled here: the router lays queued work out on the worker threads itself
(`server.schedule`). What this model does scale by is *CPU contention* — other processes' busy
cores, or more running batches than cores — because that slows a batch down while it runs.
Observations are divided by the slowdown in force when they were made, so the stored numbers are
uncontended times and one busy minute does not poison the estimates once the host is quiet again.
Pure: no clock, no I/O, no grpc.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

# Floor for any prediction: even an empty graph costs a session call.
MIN_MS = 0.005

Clock = Callable[[], float]  # monotonic seconds; injected everywhere so tests can fake time


def unit_name(variant: str, stage: int | None = None) -> str:
    """Latency-model unit of a variant's graph, or of one early-exit stage."""
    return variant if stage is None else f"{variant}/{stage}"


@dataclass(frozen=True)
class Load:
    """The host and server state a prediction depends on (built by the monitor and batchers)."""

    cores: int = 1
    cpu_other: float = 0.0  # share of all cores busy with work outside this server, 0..1
    executing: int = 0  # batches computing on a worker thread right now
    threads: int = 1  # worker threads, shared by every variant's batches
    queues: Mapping[str, QueueView] = field(default_factory=dict)  # per lane (variant, device)
    accel_threads: int = 1  # worker threads of the GPU lanes (a CUDA stream each)
    accel_slowdown: float = 1.0  # GPU lanes' slowdown from other processes' use of the GPU


class QueueView(Protocol):
    """What the router reads of a variant's queue (a live `Batcher`, or a `QueueState`)."""

    @property
    def queued(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def running_for_ms(self) -> float: ...
    @property
    def waiting(self) -> bool: ...


@dataclass(frozen=True)
class QueueState:
    """A snapshot of one variant's queue (tests, benchmarks)."""

    queued: int = 0  # samples waiting, not yet dispatched
    running: int = 0  # samples in the batch dispatched now (0: idle)
    running_for_ms: float = 0.0  # how long that batch has been computing on its thread
    waiting: bool = False  # the dispatched batch still waits for a free worker thread


@dataclass(frozen=True, slots=True)
class Prediction:
    p50: float  # ms
    p95: float  # ms


@dataclass
class _Point:
    mean: float  # unloaded ms
    dev: float  # smoothed absolute deviation, ms
    samples: int = 0


class LatencyModel:
    """Per-unit, per-batch-size compute time estimates; see the module docstring."""

    def __init__(self, *, alpha: float = 0.2, dev_k: float = 2.0, threads_per_batch: int = 1
                 ) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha!r}")
        self.alpha = alpha
        self.dev_k = dev_k
        self.threads_per_batch = threads_per_batch
        self._points: dict[str, dict[int, _Point]] = {}
        # unit → batch → unloaded prediction; the router asks ~20 of these per request, so they
        # are memoised and dropped per unit when an observation or a seed changes that unit.
        self._cache: dict[str, dict[int, tuple[float, float]]] = {}
        self._curves: dict[str, tuple[list[int], list[float], list[float]]] = {}
        # units → batch → summed (p50, p95); an observation of one unit clears only the sums
        # that include it (`_dependents`), so the other candidates' stay memoised.
        self._sums: dict[tuple[str, ...], dict[int, tuple[float, float]]] = {}
        self._dependents: dict[str, list[dict[int, tuple[float, float]]]] = {}

    # --- seeding -------------------------------------------------------------------------------

    def seed(self, unit: str, table: Mapping[str, Mapping[str, float]]) -> None:
        """Replace ``unit``'s estimates with a table ``{batch: {"p50": ms, "p95": ms}}``."""
        points: dict[int, _Point] = {}
        for batch, row in table.items():
            p50 = max(float(row["p50"]), MIN_MS)
            p95 = max(float(row.get("p95", p50)), p50)
            points[int(batch)] = _Point(mean=p50, dev=(p95 - p50) / self.dev_k)
        if not points:
            raise ValueError(f"unit {unit!r}: empty latency table")
        self._points[unit] = points
        self._forget(unit)

    def __contains__(self, unit: str) -> bool:
        return unit in self._points

    # --- CPU contention ------------------------------------------------------------------------

    def slowdown(self, load: Load, *, starting: int = 1) -> float:
        """How much slower than uncontended a batch computes now, at least 1.

        Demand on the cores = other processes' busy cores + the batches computing (plus
        ``starting`` about to start, at most one per worker thread), each using
        ``threads_per_batch`` threads; past one runnable thread per core, they share the cores.
        """
        cores = max(load.cores, 1)
        running = min(load.executing + starting, max(load.threads, 1))
        demand = min(max(load.cpu_other, 0.0), 1.0) * cores + running * self.threads_per_batch
        return max(1.0, demand / cores)

    # --- online updates ------------------------------------------------------------------------

    def observe(self, unit: str, batch: int, ms: float, *, slowdown: float = 1.0) -> None:
        """Fold one observed compute time (``ms`` for ``batch`` samples, computed under
        ``slowdown``) into the estimate."""
        if unit not in self._points or batch < 1 or not math.isfinite(ms) or ms < 0:
            return
        unloaded = max(ms / max(slowdown, 1.0), MIN_MS)
        points = self._points[unit]
        point = points.get(batch)
        if point is None:  # a new batch size: start from what we would have predicted
            g50, g95 = self._ms(unit, batch)
            point = points[batch] = _Point(mean=g50, dev=(g95 - g50) / self.dev_k)
        err = unloaded - point.mean
        point.mean += self.alpha * err
        point.dev += self.alpha * (abs(err) - point.dev)
        point.samples += 1
        self._forget(unit, batch)

    # --- predictions ---------------------------------------------------------------------------

    def predict(self, unit: str, batch: int = 1, *, slowdown: float = 1.0) -> Prediction:
        """Predicted compute time of ``unit`` at ``batch`` under ``slowdown``."""
        base = self._unloaded(unit, batch)
        f = max(slowdown, 1.0)
        return Prediction(p50=base.p50 * f, p95=base.p95 * f)

    def predict_sum(self, units: tuple[str, ...], batch: int = 1, *, slowdown: float = 1.0
                    ) -> Prediction:
        """Units run one after another: sum the p50s and, conservatively, the p95s."""
        p50, p95 = self.sum_ms(units, batch)
        f = slowdown if slowdown > 1.0 else 1.0
        return Prediction(p50=p50 * f, p95=p95 * f)

    def sum_ms(self, units: tuple[str, ...], batch: int) -> tuple[float, float]:
        """Uncontended (p50, p95) of ``units`` run in sequence: the router's hot path, memoised."""
        by_batch = self._sums.get(units)
        if by_batch is None:
            by_batch = self._sums[units] = {}
            for u in units:
                self._dependents.setdefault(u, []).append(by_batch)
        hit = by_batch.get(batch)
        if hit is None:
            p50 = p95 = 0.0
            for u in units:
                a, b = self._ms(u, batch)
                p50 += a
                p95 += b
            hit = by_batch[batch] = (p50, p95)
        return hit

    def _forget(self, unit: str, batch: int | None = None) -> None:
        """Drop what was memoised from ``unit``'s estimates (they just changed). ``batch``: only
        that measured point moved, so its curve is patched in place instead of rebuilt (every
        answered batch lands here: the rebuild was a sort and two list builds per request)."""
        self._cache.setdefault(unit, {}).clear()
        curve = self._curves.get(unit)
        if curve is not None and batch is not None:
            sizes, p50, p95 = curve
            i = bisect.bisect_left(sizes, batch)
            if i < len(sizes) and sizes[i] == batch:
                p50[i], p95[i] = self._estimate(self._points[unit][batch])
            else:  # a batch size the curve does not have yet
                del self._curves[unit]
        else:
            self._curves.pop(unit, None)
        for sums in self._dependents.get(unit, ()):
            sums.clear()

    def _unloaded(self, unit: str, batch: int) -> Prediction:
        p50, p95 = self._ms(unit, batch)
        return Prediction(p50, p95)

    def _ms(self, unit: str, batch: int) -> tuple[float, float]:
        cache = self._cache[unit]
        hit = cache.get(batch)
        if hit is None:
            hit = cache[batch] = self._interpolate(unit, max(int(batch), 1))
        return hit

    def _curve(self, unit: str) -> tuple[list[int], list[float], list[float]]:
        """The unit's measured batch sizes, ascending, with their p50 and p95."""
        curve = self._curves.get(unit)
        if curve is None:
            points = self._points[unit]
            sizes = sorted(points)
            estimates = [self._estimate(points[b]) for b in sizes]
            curve = self._curves[unit] = (sizes, [e[0] for e in estimates],
                                          [e[1] for e in estimates])
        return curve

    def _estimate(self, point: _Point) -> tuple[float, float]:
        """(p50, p95) of one measured batch size."""
        p50 = max(point.mean, MIN_MS)
        return p50, p50 + self.dev_k * max(point.dev, 0.0)

    def _interpolate(self, unit: str, batch: int) -> tuple[float, float]:
        sizes, p50, p95 = self._curve(unit)
        i = bisect.bisect_left(sizes, batch)
        if i < len(sizes) and sizes[i] == batch:
            return p50[i], p95[i]
        if i == 0:  # below the smallest measured batch: scale down, never below a third of it
            s = max(batch / sizes[0], 1 / 3)
            return p50[0] * s, p95[0] * s
        if i == len(sizes):  # above the largest: extend the last per-sample slope
            if len(sizes) == 1:
                s = batch / sizes[-1]
                return p50[-1] * s, p95[-1] * s
            span = sizes[-1] - sizes[-2]
            extra = batch - sizes[-1]
            return (p50[-1] + max(p50[-1] - p50[-2], 0.0) / span * extra,
                    p95[-1] + max(p95[-1] - p95[-2], 0.0) / span * extra)
        t = (batch - sizes[i - 1]) / (sizes[i] - sizes[i - 1])
        return (p50[i - 1] + t * (p50[i] - p50[i - 1]), p95[i - 1] + t * (p95[i] - p95[i - 1]))
