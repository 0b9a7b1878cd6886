"""The routing policy: which variant, or early-exit depth, answers a request inside its budget.

Candidates are the family's variants plus one per exit of the early-exit network
(``early-exit@0``, ``early-exit@1``, …), each with its manifest accuracy and the latency-model
units it runs. For a request with deadline ``d`` and ``n`` samples the router predicts, per
candidate, the queue wait in front of it plus its compute p95 at the batch size it will join,
both scaled by the current load, and picks

1. the most accurate candidate whose predicted completion fits the time left (ties: faster);
2. if none fits: the fastest candidate (``on_miss="best-effort"``), or a refusal at once
   (``on_miss="reject"``): `Overloaded` (RESOURCE_EXHAUSTED, retry later) when the fastest
   candidate would fit an idle server, `BudgetExceeded` when the budget is below even that;
3. with no deadline: the most accurate candidate.

Candidates of ``exclude``d variants (quarantined after failures) and of variants whose queue
cannot take the request (``max_queue``) are skipped; when that leaves nothing the request is
refused at once (`Unavailable`, `Overloaded`) instead of queueing.

For the early-exit network the chosen candidate fixes the *deepest* exit; while it runs, the
runner asks `Router.next_stage_fits` before each further stage and stops early when an exit is
confident enough (`compression.core.exits`). Pure: no grpc, no I/O; the clock is injected (tests use a fake).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from compression.core.family import Variant
from protos.wire import candidate_name
from server.errors import BudgetExceeded, InvalidArgument, NotFound, Overloaded, Unavailable, shown
from server.latency import Clock, LatencyModel, Load, Prediction, QueueView, unit_name
from server.settings import ON_MISS


@dataclass(frozen=True, slots=True)
class Candidate:
    """One thing the router can choose: a variant, or the early-exit network up to one exit."""

    name: str
    variant: str
    accuracy: float
    units: tuple[str, ...]  # latency-model units run in order; compute = their sum
    exit: int | None = None  # deepest exit, for the early-exit network


@dataclass(frozen=True, slots=True)
class Decision:
    """The router's answer, with the predictions it was based on (reported to the caller)."""

    candidate: Candidate
    queue_ms: float  # predicted wait before the batch starts
    compute_ms: float  # predicted compute p95 at the batch size it joins, load included
    remaining_ms: float | None  # time left to the deadline when deciding (None: no deadline)
    fits: bool
    load_factor: float

    @property
    def predicted_ms(self) -> float:
        return self.queue_ms + self.compute_ms


def candidates_for(variants: Iterable[Variant]) -> list[Candidate]:
    """Candidates of a family: each plain variant, and each exit depth of early-exit variants."""
    out: list[Candidate] = []
    for v in variants:
        if v.exits:
            for e in sorted(v.exits, key=lambda e: e.index):
                units = tuple(unit_name(v.name, s) for s in range(e.index + 1))
                out.append(Candidate(candidate_name(v.name, e.index), v.name, float(e.accuracy),
                                     units, exit=e.index))
        else:
            out.append(Candidate(v.name, v.name, float(v.accuracy), (unit_name(v.name),)))
    return out


class Router:
    """Chooses a candidate per request; see the module docstring for the policy."""

    def __init__(self, candidates: Sequence[Candidate], latency: LatencyModel, *,
                 max_batch: int = 32, on_miss: str = "best-effort", max_queue: int | None = None,
                 clock: Clock = time.monotonic) -> None:
        if not candidates:
            raise ValueError("the router needs at least one candidate")
        if on_miss not in ON_MISS:
            raise ValueError(f"on_miss must be one of {ON_MISS}, got {on_miss!r}")
        self.candidates = list(candidates)
        self.latency = latency
        self.max_batch = max(int(max_batch), 1)
        self.on_miss = on_miss
        self.max_queue = max_queue  # samples per variant queue; None: unbounded
        self.clock = clock
        self._by_name = {c.name: c for c in self.candidates}
        # The deepest candidate of each variant: what its queued batches cost at worst.
        self._deepest: dict[str, Candidate] = {}
        for c in self.candidates:
            if c.variant not in self._deepest or len(c.units) > len(self._deepest[c.variant].units):
                self._deepest[c.variant] = c
        # Most accurate first, so the first fitting candidate is the answer.
        self._ranked = sorted(self.candidates, key=lambda c: (-c.accuracy, len(c.units), c.name))

    def candidate(self, name: str) -> Candidate:
        return self._by_name[name]

    def deepest(self, variant: str) -> Candidate:
        """The variant's most expensive candidate: what its queued batches cost at worst."""
        return self._deepest[variant]

    def remaining_ms(self, deadline: float | None) -> float | None:
        return None if deadline is None else (deadline - self.clock()) * 1e3

    # --- the policy ----------------------------------------------------------------------------

    def choose(self, *, deadline: float | None, batch: int, load: Load,
               pin: str | None = None, exclude: Collection[str] = ()) -> Decision:
        """The candidate for a request of ``batch`` samples due at ``deadline`` (clock seconds).

        ``pin``: a variant name (its only candidate, or the best exit depth of the early-exit
        network) or an exact candidate name such as ``early-exit@1``. ``exclude``: variants not
        to use (quarantined, or the one that just failed this request).
        """
        if batch < 1:
            raise InvalidArgument(f"batch size {batch!r} must be at least 1")
        pool = self._pool(pin)
        if exclude:
            pool = [c for c in pool if c.variant not in exclude]
            if not pool:
                what = f"variant {pin!r} is" if pin else "every variant is"
                raise Unavailable(f"{what} quarantined after failures (re-probed in the "
                                  f"background); retry later")
        if self.max_queue is not None:
            pool = self._with_room(pool, batch, load)
        remaining = self.remaining_ms(deadline)
        factor = self.latency.load_factor(load)
        queues: dict[str, tuple[float, int]] = {}  # per variant, shared by its exit depths
        fastest: tuple[float, Candidate, float, float] | None = None
        sum_ms = self.latency.sum_ms
        for c in pool:  # most accurate first: the first that fits is the answer
            q = queues.get(c.variant)
            if q is None:
                q = queues[c.variant] = self._queue(c.variant, load.queues.get(c.variant),
                                                    factor)
            wait, joins = q
            compute = sum_ms(c.units, joins + batch)[1] * factor
            if remaining is None or wait + compute <= remaining:
                return Decision(c, wait, compute, remaining, True, factor)
            if fastest is None or wait + compute < fastest[0]:
                fastest = (wait + compute, c, wait, compute)
        assert fastest is not None and remaining is not None
        total, c, wait, compute = fastest
        if self.on_miss == "reject":
            idle = sum_ms(c.units, batch)[1]
            if idle <= remaining:  # it is the load, not the budget: admission control says later
                raise Overloaded(
                    f"latency budget: {remaining:.3f} ms left, under the current load the fastest "
                    f"candidate {c.name!r} needs {total:.3f} ms (queue {wait:.3f} + compute "
                    f"{compute:.3f}, load x{factor:.2f}), {idle:.3f} ms when idle; retry later")
            raise BudgetExceeded(
                f"latency budget: {max(remaining, 0.0):.3f} ms left, the fastest candidate "
                f"{c.name!r} needs {total:.3f} ms (queue {wait:.3f} + compute {compute:.3f})")
        return Decision(c, wait, compute, remaining, False, factor)

    def next_stage_fits(self, variant: str, stage: int, *, deadline: float | None, batch: int,
                        load_factor: float) -> bool:
        """Early exit: is there time to run ``stage`` (and its exit) before ``deadline``?"""
        if deadline is None:
            return True
        remaining = self.remaining_ms(deadline)
        assert remaining is not None
        cost = self.latency.predict(unit_name(variant, stage), batch, load_factor=load_factor)
        return cost.p95 <= remaining

    # --- predictions ---------------------------------------------------------------------------

    def predict(self, c: Candidate, batch: int, load: Load) -> Decision:
        """Predicted queue wait and compute p95 of ``c`` for ``batch`` more samples now."""
        factor = self.latency.load_factor(load)
        queue_ms, joins = self._queue(c.variant, load.queues.get(c.variant), factor)
        compute = self.compute(c, joins + batch, factor)
        return Decision(c, queue_ms, compute.p95, None, True, factor)

    def compute(self, c: Candidate, batch: int, load_factor: float) -> Prediction:
        return self.latency.predict_sum(c.units, batch, load_factor=load_factor)

    def _queue(self, variant: str, q: QueueView | None, factor: float) -> tuple[float, int]:
        """(ms until our batch starts, samples already waiting in the batch we will join)."""
        if q is None or (q.running == 0 and q.queued == 0):
            return 0.0, 0
        units = self._deepest[variant].units
        wait = 0.0
        running = q.running
        if running > 0:
            run = self.latency.sum_ms(units, running)[0] * factor
            wait += max(run - q.running_for_ms, 0.0)
        queued = q.queued
        full_batches = queued // self.max_batch
        if full_batches:
            wait += full_batches * self.latency.sum_ms(units, self.max_batch)[0] * factor
        return wait, queued % self.max_batch

    def _with_room(self, pool: list[Candidate], batch: int, load: Load) -> list[Candidate]:
        """The candidates whose variant queue can take ``batch`` more samples."""
        assert self.max_queue is not None
        room = [c for c in pool
                if (q := load.queues.get(c.variant)) is None or q.queued + batch <= self.max_queue]
        if not room:
            raise Overloaded(f"every queue that could serve this request is full (limit "
                             f"{self.max_queue} samples per variant, request {batch}); retry later")
        return room

    def _pool(self, pin: str | None) -> list[Candidate]:
        if not pin:
            return self._ranked
        if pin in self._by_name:
            return [self._by_name[pin]]
        pool = [c for c in self._ranked if c.variant == pin]
        if not pool:
            raise NotFound(f"model_version {shown(pin)}: no such variant; variants: "
                           f"{sorted({c.variant for c in self.candidates})}")
        return pool
