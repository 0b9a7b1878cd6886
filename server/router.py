"""The routing policy: which variant, or early-exit depth, answers a request inside its budget.

Candidates are the family's variants plus one per exit of the early-exit network
(``early-exit@0``, ``early-exit@1``, …), each ranked by its *validation* accuracy (for
``early-exit@k``: the calibrated exit policy capped at depth k, which is what the server returns)
and costed by the latency-model units it runs. For a request with ``n`` samples due at ``d`` the
router predicts, per candidate, when it would finish if sent now:

    completion = start of its batch + compute of that batch + overhead + margin

- *start*: the work ahead of it, laid out on the shared worker threads (`server.schedule`): the
  rest of its variant's running batch and queued batches, and every other variant's batches that
  hold or will hold the threads first. A request joins its variant's last queued batch when that
  has room (and then pays for the bigger batch), else starts a new one.
- *compute*: the latency model's p50 for the batch, times the CPU slowdown now.
- *overhead*: the per-request time outside the model, learned from every answer.
- *margin*: the closed-loop safety margin (`server.calibration`) that holds the target miss
  rate: the smaller of a learned additive and a learned proportional bound on the lateness.

It then picks

1. the most accurate candidate whose predicted completion fits the time left (ties: faster) and
   whose compute stays within the CPU share a request can have at the arrival rate now
   (`server.calibration.CpuShare`; when everything that fits costs more, the cheapest that fits);
2. if none fits with its margin: the fastest, while it is predicted to make it without the
   margin (while its admitted answers miss more often than the target and it would wait behind
   queued work: with the margin); otherwise `Shed` (DEADLINE_EXCEEDED) at once
   (``on_miss="shed"``, the default: doomed work would only delay others), or the fastest
   anyway (``on_miss="best-effort"``);
3. with no deadline: the most accurate candidate within the CPU share (requests without a
   budget are never shed), without laying out the queues: nothing waits on that prediction.

Candidates of ``exclude``d variants (quarantined after failures) and of variants whose queue
cannot take the request (``max_queue``) are skipped; when that leaves nothing the request is
refused at once (`Unavailable`, `Overloaded`) instead of queueing.

Placement is a routing dimension: with GPU lanes (`server.engine.Accelerator`) every candidate
exists once per device (``full`` on the CPU, ``cuda:full`` on the GPU), each with its own queue
(*lane*), latency-model units and closed loop. The layout above is per device: CPU lanes share the
CPU worker threads and are slowed by CPU load; GPU lanes share the GPU's worker threads (one
stream each) and are slowed by the GPU's load from other processes (`Load.accel_slowdown`). Their
compute includes the host↔device copies (the runner times the whole call), and a GPU candidate
costs the CPU share nothing. Equal accuracies rank the faster placement first, so a request goes to
the GPU while its queue lets it fit and overflows to the CPU when it does not.

For the early-exit network the chosen candidate fixes the *deepest* exit; while it runs, the
runner asks `Router.next_stage_fits` before each further stage and stops early when an exit is
confident enough (`compression.core.exits`). Every answer reports back through `Router.observe`.
Pure: no grpc, no I/O; the clock is injected (tests use a fake clock and fake queues).
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from compression.core.family import Variant
from protos.wire import CPU, DEVICE_SEPARATOR, candidate_name, placed_name
from server.calibration import Calibration, CpuShare, Overhead
from server.errors import InvalidArgument, NotFound, Overloaded, Shed, Unavailable, shown
from server.latency import Clock, LatencyModel, Load, Prediction, unit_name
from server.schedule import IDLE_PLAN, Backlog, Plan, chained, plan
from server.settings import ON_MISS

_CPU_PREFIX = CPU + DEVICE_SEPARATOR  # pins a variant's (or candidate's) CPU lane


@dataclass(frozen=True, slots=True)
class Candidate:
    """One thing the router can choose: a variant, or the early-exit network up to one exit."""

    name: str
    variant: str
    accuracy: float
    units: tuple[str, ...]  # latency-model units run in order; compute = their sum
    exit: int | None = None  # deepest exit, for the early-exit network
    device: str = CPU  # where its lane runs: "cpu", or the accelerator's device ("cuda")
    lane: str = ""  # the queue (batcher) it joins: the variant placed on the device

    def __post_init__(self) -> None:
        if not self.lane:
            object.__setattr__(self, "lane", placed_name(self.variant, self.device))


@dataclass(frozen=True, slots=True)
class Decision:
    """The router's answer, with the predictions it was based on (reported to the caller)."""

    candidate: Candidate
    queue_ms: float  # predicted wait before the batch starts (0 without a deadline: not laid out)
    compute_ms: float  # predicted compute (p50) of the batch it joins, CPU slowdown included
    overhead_ms: float  # predicted time outside the model
    margin_ms: float  # the calibrated safety margin added on top
    remaining_ms: float | None  # time left to the deadline when deciding (None: no deadline)
    fits: bool
    slowdown: float
    decided_at: float = 0.0  # clock seconds

    @property
    def predicted_ms(self) -> float:
        """Expected completion from the decision, ms (without the margin)."""
        return self.queue_ms + self.compute_ms + self.overhead_ms


def candidates_for(variants: Iterable[Variant], device: str = CPU,
                   accuracy: Mapping[str, float] | None = None) -> list[Candidate]:
    """Candidates of a family on one device: each plain variant, and each exit depth of
    early-exit variants, with the accuracy they are ranked by (validation; test only for
    manifests without it; ``accuracy``: re-measured values by candidate name, e.g. fp16 on a
    GPU)."""
    out: list[Candidate] = []
    measured = accuracy or {}
    for v in variants:
        lane = placed_name(v.name, device)
        if v.exits:
            for e in sorted(v.exits, key=lambda e: e.index):
                units = tuple(unit_name(lane, s) for s in range(e.index + 1))
                name = placed_name(candidate_name(v.name, e.index), device)
                acc = measured.get(name, _first(e.policy_val_accuracy, e.accuracy))
                out.append(Candidate(name, v.name, acc, units, exit=e.index, device=device,
                                     lane=lane))
        else:
            acc = measured.get(lane, _first(v.val_accuracy, v.accuracy))
            out.append(Candidate(lane, v.name, acc, (unit_name(lane),), device=device,
                                 lane=lane))
    return out


def _first(*values: float | None) -> float:
    """The first recorded accuracy (validation; test for manifests written before it was kept)."""
    return float(next(v for v in values if v is not None))


class Router:
    """Chooses a candidate per request; see the module docstring for the policy."""

    def __init__(self, candidates: Sequence[Candidate], latency: LatencyModel, *,
                 max_batch: int = 32, on_miss: str = "shed", max_queue: int | None = None,
                 target_miss_rate: float = 0.01, clock: Clock = time.monotonic,
                 lane_max_batch: Mapping[str, int] | None = None,
                 lane_max_queue: Mapping[str, int] | None = None) -> None:
        if not candidates:
            raise ValueError("the router needs at least one candidate")
        if on_miss not in ON_MISS:
            raise ValueError(f"on_miss must be one of {ON_MISS}, got {on_miss!r}")
        self.candidates = list(candidates)
        self.latency = latency
        self.max_batch = max(int(max_batch), 1)
        # Samples per batch by lane where not ``max_batch`` (GPU lanes batch far more).
        self._max_batch = {c.lane: max(int((lane_max_batch or {}).get(c.lane, self.max_batch)), 1)
                           for c in self.candidates}
        self.on_miss = on_miss
        self.max_queue = max_queue  # samples per lane queue; None: unbounded
        self._max_queue = dict(lane_max_queue or {})  # lanes with their own (GPU lanes: deeper)
        self.clock = clock
        # One closed loop per candidate (a heavy variant's lateness is not a light one's), and one
        # over all answers: the fallback for candidates with too few recent answers, and the
        # miss rate operators see.
        self.calibration = Calibration(target=target_miss_rate)
        self._calibrations = {c.name: Calibration(target=target_miss_rate, window=1024)
                              for c in self.candidates}
        self._refreshed = float("-inf")
        # Per candidate, the share of its answers that missed although admitted on a prediction
        # that they would make it, pinned requests' included (the margins learn from routed
        # answers only): high while its predictions fail, e.g. another process takes the cores.
        self.late_share = {c.name: 0.0 for c in self.candidates}
        self.overhead = Overhead()
        self.cpu = CpuShare()
        self._by_name = {c.name: c for c in self.candidates}
        # The deepest candidate of each lane: what its queued batches cost at worst.
        self._deepest: dict[str, Candidate] = {}
        for c in self.candidates:
            if c.lane not in self._deepest or len(c.units) > len(self._deepest[c.lane].units):
                self._deepest[c.lane] = c
        self.devices = sorted({c.device for c in self.candidates})
        self._ranked = self.candidates
        # pin → its candidates, in rank order: only pins that name some, so bounded by the family
        self._pinned: dict[str, list[Candidate]] = {}
        self.rerank()

    def rerank(self) -> None:
        """Most accurate first, so the first fitting candidate is the answer; equal accuracies
        on a GPU lane before the CPU (the CPU also decodes, routes and encodes every request, so
        it is the scarcer), then cheapest first by the latency model now (call again once warm-up
        re-measured it)."""
        self._ranked = sorted(self.candidates, key=lambda c: (
            -c.accuracy, c.device == CPU, self.latency.sum_ms(c.units, 1)[0] if all(
                u in self.latency for u in c.units) else 0.0, c.name))
        self._pinned.clear()

    def candidate(self, name: str) -> Candidate:
        return self._by_name[name]

    def reset_calibration(self, base: float) -> None:
        """Forget every closed loop's answers; start from the factor ``base``."""
        for cal in (self.calibration, *self._calibrations.values()):
            cal.reset(base)

    def refresh_calibration(self, now: float) -> None:
        """Let every closed loop drop what has aged past its horizon."""
        self._refreshed = now
        for cal in (self.calibration, *self._calibrations.values()):
            cal.refresh(now)

    def deepest(self, lane: str) -> Candidate:
        """The lane's most expensive candidate: what its queued batches cost at worst."""
        return self._deepest[lane]

    def lane_max_batch(self, lane: str) -> int:
        return self._max_batch.get(lane, self.max_batch)

    def remaining_ms(self, deadline: float | None) -> float | None:
        return None if deadline is None else (deadline - self.clock()) * 1e3

    # --- the policy ----------------------------------------------------------------------------

    def choose(self, *, deadline: float | None, batch: int, load: Load,
               pin: str | None = None, exclude: Collection[str] = ()) -> Decision:
        """The candidate for a request of ``batch`` samples due at ``deadline`` (clock seconds).

        ``pin``: a variant name (its candidates on every device, e.g. the best exit depth of the
        early-exit network), a lane (``cuda:full``: the variant on that device) or an exact
        candidate name such as ``early-exit@1``. ``exclude``: lanes not to use (quarantined, or
        the one that just failed this request).
        """
        if batch < 1:
            raise InvalidArgument(f"batch size {batch!r} must be at least 1")
        pool = self._pool(pin)
        if exclude:
            pool = [c for c in pool if c.lane not in exclude]
            if not pool:
                what = f"variant {pin!r} is" if pin else "every variant is"
                raise Unavailable(f"{what} quarantined after failures (re-probed in the "
                                  f"background); retry later")
        if self.max_queue is not None:
            pool = self._with_room(pool, batch, load)
        now = self.clock()
        remaining = None if deadline is None else (deadline - now) * 1e3
        slowdown = self.latency.slowdown(load)
        accel = load.accel_slowdown
        overhead = self.overhead.ms
        if now - self._refreshed > 1.0:  # answers refresh the margins; time must too (expiry)
            self.refresh_calibration(now)
        share = self.cpu.share_ms(now) if not pin else float("inf")
        if remaining is None:
            return self._unbudgeted(pool, batch, slowdown, accel, overhead, share, now)
        pooled, calibrations = self.calibration, self._calibrations
        # Shedding: a candidate whose own compute cannot fit is skipped before any layout.
        skip_above = remaining if self.on_miss == "shed" else math.inf
        layouts: dict[str, Plan] | None = None  # per device, once the first candidate might fit
        starts: dict[str, tuple[float, int]] = {}  # per lane, shared by its exit depths
        # The fastest that does not fit, ranked by its prediction without margin (predicted,
        # candidate, wait, compute, margin); the cheapest in CPU that fits but costs more than the
        # share (cost, candidate, wait, compute). A Decision is built only for the answer.
        fastest: tuple[float, Candidate, float, float, float] | None = None
        cheapest: tuple[float, Candidate, float, float] | None = None
        sum_ms = self.latency.sum_ms
        for c in pool:  # most accurate first: the first that fits is the answer
            cost = sum_ms(c.units, batch)[0]  # its own compute, uncontended: a lower bound
            on_cpu = c.device == CPU
            sd = slowdown if on_cpu else accel
            if cost * sd + overhead > skip_above:
                # Cannot make it even with no wait and no margin: the layout is not needed.
                if fastest is None or cost * sd + overhead < fastest[0]:
                    fastest = (cost * sd + overhead, c, 0.0, cost * sd, 0.0)
                continue
            if layouts is None:
                layouts = self._plans(load, slowdown)
            st = starts.get(c.lane)
            if st is None:
                st = starts[c.lane] = self._start(c, layouts, load, batch)
            wait, joins = st
            compute = sum_ms(c.units, joins + batch)[0] * sd
            predicted = wait + compute + overhead
            cal = calibrations[c.name]
            if not cal.ready:
                cal = pooled
            bound = (cal.factor - 1.0) * predicted  # inline `Calibration.margin_ms`: hot loop
            total = predicted + (cal.additive_ms if cal.additive_ms < bound else bound)
            if total <= remaining:
                if cost <= share or not on_cpu:  # a GPU lane's compute is not the CPU's
                    return Decision(c, wait, compute, overhead, total - predicted, remaining, True,
                                    sd, now)
                if cheapest is None or cost < cheapest[0]:
                    cheapest = (cost, c, wait, compute)
            elif fastest is None or predicted < fastest[0]:
                # Ranked without margin, as the skipped ones above: with the margin a candidate
                # that would make it could lose to one whose compute alone cannot.
                fastest = (predicted, c, wait, compute, total - predicted)
        if cheapest is not None:  # everything that fits costs more CPU than the rate allows
            _, c, wait, compute = cheapest
            predicted = wait + compute + overhead
            return Decision(c, wait, compute, overhead, self.margin_ms(c, predicted, now),
                            remaining, True, slowdown, now)
        assert fastest is not None
        predicted, c, wait, compute, margin = fastest
        slowdown = slowdown if c.device == CPU else accel
        # Nothing fits with its margin. The fastest still runs while it is more likely than not
        # to make it (predicted without margin) — unless admitted answers are missing their
        # budgets more often than the target and it would wait behind queued work: when
        # predictions fail (another process takes the cores), the queue grows until every
        # request admitted stands at the edge of its budget, a third of them late, each one's
        # compute taken from a request that could have made it. Then it must fit with its margin.
        cautious = wait > 0.0 and self.late_share[c.name] > pooled.target
        if self.on_miss == "best-effort" or predicted + (margin if cautious else 0.0) <= remaining:
            return Decision(c, wait, compute, overhead, margin, remaining, False, slowdown, now)
        raise Shed(remaining, c.name, wait, compute, overhead, margin,
                   least_ms=min(sum_ms(p.units, batch)[0] for p in pool))

    def _unbudgeted(self, pool: Sequence[Candidate], batch: int, slowdown: float, accel: float,
                    overhead: float, share: float, now: float) -> Decision:
        """A request without a deadline: the most accurate candidate whose compute stays within
        the CPU share (else the cheapest), never shed. Nothing waits on when it would finish, so
        the queues are not laid out (that schedule is most of what a decision costs) and the
        decision predicts no wait."""
        sum_ms = self.latency.sum_ms
        cheapest: tuple[float, Candidate] | None = None
        for c in pool:
            cost = sum_ms(c.units, batch)[0]
            if cost <= share or c.device != CPU:
                break
            if cheapest is None or cost < cheapest[0]:
                cheapest = (cost, c)
        else:
            assert cheapest is not None  # the pool is never empty
            cost, c = cheapest
        sd = slowdown if c.device == CPU else accel
        return Decision(c, 0.0, cost * sd, overhead, 0.0, None, True, sd, now)

    def observe(self, decision: Decision, actual_ms: float, *, missed: bool | None,
                calibrate: bool = True, outside_ms: float | None = None) -> None:
        """Feedback from one answered request: ``actual_ms`` from the decision to the answer,
        whether it ``missed`` its budget (None: it had none), whether it may ``calibrate`` the
        margins (the router's own choices only: a pinned request's budget may be one its variant
        can never meet), and the part of it spent outside its batch's queue and compute
        (``outside_ms``)."""
        if missed is not None:  # only budgeted answers: the margin exists to meet budgets
            if calibrate:
                now = self.clock()
                for cal in (self.calibration, self._calibrations[decision.candidate.name]):
                    cal.observe(decision.predicted_ms, actual_ms, now=now, missed=missed)
            if decision.predicted_ms <= (decision.remaining_ms or 0.0):  # admitted to make it
                name = decision.candidate.name
                self.late_share[name] += self.calibration.miss_alpha * (
                    float(missed) - self.late_share[name])
        if outside_ms is not None:
            self.overhead.observe(outside_ms)

    def next_stage_fits(self, lane: str, stage: int, *, deadline: float | None, batch: int,
                        slowdown: float) -> bool:
        """Early exit: is there time to run ``stage`` (and its exit) before ``deadline``?"""
        if deadline is None:
            return True
        remaining = self.remaining_ms(deadline)
        assert remaining is not None
        cost = self.latency.predict(unit_name(lane, stage), batch, slowdown=slowdown)
        return cost.p95 <= remaining

    # --- predictions ---------------------------------------------------------------------------

    def predict(self, c: Candidate, batch: int, load: Load) -> Decision:
        """What ``c`` would cost for ``batch`` more samples now."""
        return self.predictions([c], batch, load)[0]

    def predictions(self, candidates: Sequence[Candidate], batch: int, load: Load
                    ) -> list[Decision]:
        """What each of ``candidates`` would cost for ``batch`` more samples now (the variant
        table), from one layout of the queues."""
        slowdown = self.latency.slowdown(load)
        layouts = self._plans(load, slowdown)
        now = self.clock()
        out = []
        for c in candidates:
            wait, joins = self._start(c, layouts, load, batch)
            sd = slowdown if c.device == CPU else load.accel_slowdown
            compute = self.latency.sum_ms(c.units, joins + batch)[0] * sd
            predicted = wait + compute + self.overhead.ms
            out.append(Decision(c, wait, compute, self.overhead.ms,
                                self.margin_ms(c, predicted, now), None, True, sd, now))
        return out

    def margin_ms(self, c: Candidate, predicted_ms: float, now: float) -> float:
        """The safety margin for ``c``: from its own recent answers when it has enough of them,
        else from all answers."""
        own = self._calibrations[c.name]
        own.refresh(now)
        return (own if own.ready else self.calibration).margin_ms(predicted_ms)

    def compute(self, c: Candidate, batch: int, slowdown: float = 1.0) -> Prediction:
        return self.latency.predict_sum(c.units, batch, slowdown=slowdown)

    def _plans(self, load: Load, slowdown: float) -> dict[str, Plan]:
        """Per device, every busy lane's backlog laid out on that device's worker threads."""
        return {d: self._plan(load, slowdown, d) for d in self.devices}

    def _plan(self, load: Load, slowdown: float, device: str = CPU) -> Plan:
        """Every busy lane of ``device``: its backlog laid out on the device's worker threads."""
        sum_ms = self.latency.sum_ms
        if device != CPU:
            slowdown = load.accel_slowdown
        threads = load.threads if device == CPU else load.accel_threads
        backlogs: dict[str, Backlog] = {}
        waits = False
        for name, q in load.queues.items():
            running, queued = q.running, q.queued
            if not running and not queued:
                continue
            deepest = self._deepest.get(name)
            if deepest is None or deepest.device != device:
                continue
            units, mb = deepest.units, self._max_batch[name]
            run_ms = sum_ms(units, running)[0] * slowdown if running else 0.0
            waiting = running > 0 and q.waiting
            if running and not waiting:
                run_ms = max(run_ms - q.running_for_ms, 0.0)
            full, part = divmod(queued, mb)
            batches = (sum_ms(units, mb)[0] * slowdown,) * full if full else ()
            if part:
                batches += (sum_ms(units, part)[0] * slowdown,)
            backlogs[name] = Backlog(run_ms, waiting, batches)
            waits = waits or waiting
        if not backlogs:
            return IDLE_PLAN
        if not waits and len(backlogs) < threads:
            return chained(backlogs, threads)
        return plan(threads, backlogs)

    def _start(self, c: Candidate, layouts: Mapping[str, Plan], load: Load, batch: int
               ) -> tuple[float, int]:
        """(ms until our batch starts, samples already in the batch we join)."""
        layout = layouts[c.device]
        if layout is IDLE_PLAN:
            return 0.0, 0
        q = load.queues.get(c.lane)
        mb = self._max_batch[c.lane]
        part = q.queued % mb if q is not None else 0
        if part and part + batch <= mb:  # room in the last queued batch: join it
            return layout.last_start_ms[c.lane], part
        return layout.start_ms(c.lane), 0

    def _with_room(self, pool: list[Candidate], batch: int, load: Load) -> list[Candidate]:
        """The candidates whose variant queue can take ``batch`` more samples."""
        assert self.max_queue is not None
        limit = self.max_queue
        room = [c for c in pool if (q := load.queues.get(c.lane)) is None
                or q.queued + batch <= self._max_queue.get(c.lane, limit)]
        if not room:
            raise Overloaded(f"every queue that could serve this request is full (limit "
                             f"{limit} samples per CPU lane, request {batch}); retry later")
        return room

    def _pool(self, pin: str | None) -> list[Candidate]:
        if not pin:
            return self._ranked
        pool = self._pinned.get(pin)
        if pool is not None:
            return pool
        if pin.startswith(_CPU_PREFIX):  # "cpu:full": the variant's CPU lane only
            bare = pin[len(_CPU_PREFIX):]
            pool = [c for c in self._ranked if c.device == CPU and bare in (c.variant, c.name)]
        else:
            pool = [c for c in self._ranked if pin in (c.variant, c.lane)]
        if not pool and pin in self._by_name:
            pool = [self._by_name[pin]]
        if not pool:
            raise NotFound(f"model_version {shown(pin)}: no such variant; variants: "
                           f"{sorted({c.variant for c in self.candidates})}")
        self._pinned[pin] = pool  # callers filter it into new lists, never change it
        return pool
