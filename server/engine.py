"""The request path between the wire and the runners: route → queue → batch → run → observe.

`Engine` owns the family's runners, one `Batcher` per variant, the `Router` and its latency model,
and records the per-request metrics. The servicer hands it a decoded `Call` and gets an `Outcome`
back; nothing here knows gRPC or protobuf. The other rooms: `execute` (what a batch runs),
`quarantine` (failed variants), `warmup` (seeding the latency model), `metrics.publish` (gauges).

Placement: the family's variants run on the CPU (ONNX Runtime, the engine's executor) and, given
an `Accelerator`, also on a GPU (torch runners, the accelerator's own threads). Each (variant,
device) is a *lane*: its own runner, batcher, latency-model units and router candidates
(``cuda:full``), so the router chooses the device per request like it chooses the variant.

Faults: when a routed request's batch fails (its runner raised or timed out), the request is
retried once on the next-best candidate that fits what is left of its budget, and the lane is
quarantined until a background probe passes. Pinned requests are not moved to another variant.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from compression.core.exits import Stages
from compression.core.family import Family
from protos.wire import BUDGET, CPU, LOAD
from server.batcher import Batcher, BatchOutput, Execute, Item
from server.errors import AdaptiveError, BudgetExceeded, InternalError, Shed, VariantFailed
from server.execute import graph_executor, stages_executor
from server.faults import FaultInjector
from server.latency import Clock, LatencyModel, Load
from server.monitor import GpuSample, Monitor
from server.quarantine import Breaker, Quarantine
from server.router import Candidate, Decision, Router, candidates_for
from server.runtime import Runner
from server.settings import Settings
from server.warmup import remeasure, seed_from_manifest

if TYPE_CHECKING:  # prometheus_client is imported only after --workers set its multiprocess dir
    from server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Call:
    """A decoded, validated inference request."""

    x: np.ndarray  # [N, C, H, W] float32, C-contiguous
    budget_ms: float | None  # effective budget from now; None: no budget
    pin: str | None  # model_version: a variant (or variant@exit) the client pinned
    request_id: str
    received: float | None = None  # clock seconds when the handler got it (None: at `infer`)
    # The budget its parameters state, ms (None: only a gRPC deadline, or none): unlike
    # ``budget_ms``, not shortened by a wait before decoding, so it tells a budget no idle
    # server could meet from one that load ate (`Shed.refusal`).
    stated_ms: float | None = None


@dataclass(frozen=True)
class Outcome:
    """One answered request."""

    logits: np.ndarray  # [N, classes]
    variant: str
    candidate: str
    exit: int | None  # deepest exit used (early-exit network)
    exits: np.ndarray | None  # per-sample exits
    queue_ms: float
    compute_ms: float
    budget_ms: float | None
    met: bool  # answered inside the budget (True without one)
    retried_from: str | None = None  # the variant that failed first, when this is the retry
    device: str = CPU  # where it ran


@dataclass(frozen=True)
class Accelerator:
    """The GPU lanes: a torch runner per variant on one device, on their own worker threads."""

    device: str  # "cuda"; "cpu" runs the same runner code without a GPU (tests, CI)
    runners: Mapping[str, Runner | Stages]  # per variant that has a form on the device
    executor: Executor  # one thread per concurrently running lane (each has its own stream)
    threads: int
    max_batch: int = 256  # a GPU computes 256 images in about the time the CPU does one
    # re-measured validation accuracy by candidate name (fp16/bf16 change the numbers)
    accuracy: Mapping[str, float] = field(default_factory=dict)
    # A small batch on a GPU lane runs on the event loop: a graph replay and a wait on the
    # device (the GIL released) cost less than the hand-off to a worker thread and back, which
    # took 0.2 ms of a 1.0 ms batch-1 round trip on the CPU lanes.
    inline_below_ms: float = 0.3


@dataclass(frozen=True)
class Lane:
    """One variant on one device: what its batcher runs and where."""

    name: str  # the variant on the CPU; "cuda:variant" on the accelerator
    variant: str
    device: str
    runner: Runner | Stages
    executor: Executor
    settings: Settings


class Engine:
    """Routes and runs requests for one family; see the module docstring."""

    def __init__(self, family: Family, runners: Mapping[str, Runner | Stages], *,
                 executor: Executor, metrics: Metrics, monitor: Monitor,
                 settings: Settings = Settings(), clock: Clock = time.monotonic,
                 threads: int = 1, faults: FaultInjector | None = None,
                 accelerator: Accelerator | None = None) -> None:
        self.family = family
        self.accelerator = accelerator
        self.lanes = {name: Lane(name, name, CPU, r, executor, settings)
                      for name, r in runners.items()}
        candidates = candidates_for(family.variants[n] for n in runners)
        if accelerator is not None:
            # As many batches may queue on a GPU lane as on a CPU lane: samples scale with the
            # batch size (a 256-image request must not fill a GPU lane's queue on its own).
            accel_settings = replace(settings, max_batch=accelerator.max_batch, max_queue=max(
                settings.max_queue,
                settings.max_queue * accelerator.max_batch // max(settings.max_batch, 1)))
            for c in candidates_for((family.variants[n] for n in accelerator.runners),
                                    accelerator.device, accelerator.accuracy):
                if c.lane not in self.lanes:
                    self.lanes[c.lane] = Lane(c.lane, c.variant, c.device,
                                              accelerator.runners[c.variant],
                                              accelerator.executor, accel_settings)
                candidates.append(c)
        self.runners = {name: lane.runner for name, lane in self.lanes.items()}
        self.settings = settings
        self.metrics = metrics
        self.monitor = monitor
        self.clock = clock
        self.executor = executor
        self.threads = max(int(threads), 1)  # the executor's worker threads
        self.latency = LatencyModel(threads_per_batch=settings.intra_op_threads)
        for v in family.variants.values():
            seed_from_manifest(self.latency, v)
        self.router = Router(candidates, self.latency, max_batch=settings.max_batch,
                             on_miss=settings.on_miss, max_queue=settings.max_queue,
                             target_miss_rate=settings.target_miss_rate, clock=clock,
                             lane_max_batch={n: ln.settings.max_batch
                                             for n, ln in self.lanes.items()},
                             lane_max_queue={n: ln.settings.max_queue
                                             for n, ln in self.lanes.items()})
        self.batchers: dict[str, Batcher] = {}
        self._cpu_in_pool: set[Batcher] = set()  # CPU lanes with a batch in the pool (`load`)
        self.faults = faults
        self.breaker = Breaker(Quarantine(base_s=settings.quarantine_s,
                                          max_s=settings.quarantine_max_s), self._probe, metrics)
        self._inflight = 0
        self._accel_slowdown = 1.0  # from the GPU's utilisation by others (`update_gauges`)
        self._accel_busy_ms = 0.0  # GPU lanes' compute since the last gauge update
        self._idle = asyncio.Event()  # set while no request is in flight (graceful shutdown)
        self._idle.set()
        for c in self.router.candidates:
            metrics.accuracy.labels(c.name).set(c.accuracy)
            if c.exit is not None:
                metrics.early_exit.labels(str(c.exit))
        for reason in (LOAD, BUDGET):
            metrics.refused.labels(family.name, reason)
        for name in self.lanes:  # zero series from the start, so rates work at once
            metrics.budget_misses.labels(family.name, name)
            metrics.requests.labels(family.name, name, "OK")
            metrics.variant_failures.labels(name)
            metrics.retries.labels(name)
            metrics.quarantined.labels(name).set(0)

    # --- lifecycle -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Run every lane at batch 1, 8, 32 and its largest and re-seed the latency model with
        this host's times, on the device each lane runs on (blocking: call it in a worker thread
        before serving). GPU runners first capture their CUDA graphs."""
        shape = self.family.input_shape
        spreads: list[float] = []  # p95 / p50 at batch 1
        for name, lane in self.lanes.items():
            runner = lane.runner
            warm = getattr(runner, "warm", None)
            if callable(warm):
                warm()
            mb = lane.settings.max_batch
            sizes = sorted({1, 8, min(32, mb), mb})
            tables = remeasure(name, runner, shape, batch_sizes=sizes)
            slowdown = self.slowdown() if lane.device == CPU else 1.0
            for unit, table in tables.items():
                # Store uncontended times, like online observations.
                self.latency.seed(unit, {b: {k: v / slowdown for k, v in row.items()}
                                         for b, row in table.items()})
            p = self.router.compute(self.router.deepest(name), 1)
            spreads.append(p.p95 / max(p.p50, 1e-6))
            log.info("lane %s: re-measured on %s, p50 %.3f ms, p95 %.3f ms at batch 1",
                     name, lane.device, p.p50, p.p95)
        self.router.rerank()  # ties in accuracy: the cheaper one on this host first
        # The closed loop moves the margin from here: a typical timing spread on this host.
        self.router.reset_calibration(float(np.median(spreads)) if spreads else 1.0)

    def start(self) -> None:
        """Start the batchers (on the running event loop); arm injected faults (after warm-up,
        which must succeed)."""
        if self.faults is not None:
            self.runners = self.faults.wrap(self.runners)
            self.faults.arm()
        for name, lane in self.lanes.items():
            self.batchers[name] = Batcher(
                name, self._executor_for(name), lane.executor, _LaneCosts(self, name),
                clock=self.clock, settings=lane.settings, listener=self,
                in_pool=self._cpu_in_pool if lane.device == CPU else None)
            self.batchers[name].start()

    async def stop(self) -> None:
        self.breaker.stop()
        if self.faults is not None:
            self.faults.release()  # hung injected calls return, so worker threads can exit
        await asyncio.gather(*(b.stop() for b in self.batchers.values()))
        if self.accelerator is not None:
            self.accelerator.executor.shutdown(wait=False)

    @property
    def inflight(self) -> int:
        return self._inflight

    async def drained(self) -> None:
        """Return once no request is in flight."""
        await self._idle.wait()

    # --- load ----------------------------------------------------------------------------------

    def load(self) -> Load:
        """The host and queues now (read per routing decision, and per batch answered)."""
        host = self.monitor.latest
        accel = self.accelerator
        return Load(cores=host.cores, cpu_other=host.cpu_other,
                    executing=sum(1 for b in self._cpu_in_pool if b.executing),
                    threads=self.threads, queues=self.batchers,
                    accel_threads=accel.threads if accel is not None else 1,
                    accel_slowdown=self._accel_slowdown)

    def slowdown(self, starting: int = 1) -> float:
        """The CPU slowdown now of a batch, with ``starting`` more batches about to start."""
        return self.latency.slowdown(self.load(), starting=starting)

    # --- requests ------------------------------------------------------------------------------

    async def infer(self, call: Call, *, alone: bool = False) -> Outcome:
        """Route, queue and run one request; records its metrics whatever the result. ``alone``:
        nothing else arrives with it in this loop turn (a unary call; `Batcher.submit`)."""
        t0 = self.clock() if call.received is None else call.received
        m = self.metrics
        model = self.family.name
        deadline = None if call.budget_ms is None else t0 + call.budget_ms / 1e3
        if call.budget_ms is not None:
            m.child(m.budget, model).observe(max(call.budget_ms, 0.0) / 1e3)
        variant = "none"
        retried_from: str | None = None
        self.router.cpu.arrived(t0)
        m.inflight.inc()
        self._inflight += 1
        self._idle.clear()
        try:
            if call.budget_ms is not None and call.budget_ms <= 0:
                # The gRPC deadline passed while the request waited to be read (overload): its
                # caller has given up, so computing an answer would only deepen the backlog.
                raise BudgetExceeded(f"the request's deadline passed {-call.budget_ms:.3f} ms "
                                     f"before it was decoded (server overloaded)")
            batch = call.x.shape[0]
            decision = self.router.choose(deadline=deadline, batch=batch, load=self.load(),
                                          pin=call.pin, exclude=self.breaker.variants)
            variant = decision.candidate.lane
            try:
                res = await self.batchers[variant].submit(call.x, deadline=deadline,
                                                          max_exit=decision.candidate.exit,
                                                          alone=alone)
            except VariantFailed:
                if call.pin is not None:  # the client asked for this variant and no other
                    raise
                retried_from = variant
                m.child(m.retries, variant).inc()
                decision = self.router.choose(deadline=deadline, batch=batch, load=self.load(),
                                              exclude=self.breaker.variants | {variant})
                variant = decision.candidate.lane
                log.debug("request %r: %s failed, retrying on %s", call.request_id, retried_from,
                          decision.candidate.name)
                res = await self.batchers[variant].submit(call.x, deadline=deadline,
                                                          max_exit=decision.candidate.exit,
                                                          alone=alone)
            cand = decision.candidate
        except Shed as exc:
            m.child(m.shed, model).inc()
            m.child(m.requests, model, variant, exc.code).inc()
            # Below what an idle server could have met: the budget's fault, not the load's.
            exc.refusal = (BUDGET if call.stated_ms is not None and call.stated_ms < exc.least_ms
                           else LOAD)
            m.child(m.refused, model, exc.refusal).inc()
            raise
        except AdaptiveError as exc:
            m.child(m.requests, model, variant, exc.code).inc()
            if exc.refusal is not None:
                m.child(m.refused, model, exc.refusal).inc()
            raise
        except asyncio.CancelledError:
            m.child(m.requests, model, variant, "CANCELLED").inc()
            raise
        except Exception as exc:
            log.exception("request %r failed", call.request_id)
            m.child(m.requests, model, variant, "INTERNAL").inc()
            raise InternalError(f"inference on {variant!r} failed: {type(exc).__name__}") from exc
        finally:
            m.inflight.dec()
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
        done = self.clock()
        met = deadline is None or done <= deadline
        m.child(m.requests, model, variant, "OK").inc()
        m.child(m.request_latency, model, variant).observe(done - t0)
        if not met:
            m.child(m.budget_misses, model, variant).inc()
        actual_ms = (done - decision.decided_at) * 1e3
        # Only the router's own choices calibrate its margin: a pinned request's budget may be
        # one its variant can never meet (a client's choice), and counting those misses would
        # widen the margin for every routed request after it.
        self.router.observe(decision, actual_ms, missed=None if deadline is None else not met,
                            calibrate=call.pin is None,
                            outside_ms=actual_ms - res.queue_ms - res.compute_ms)
        exit_index = int(res.exits.max()) if res.exits is not None else None
        _log_decision(call, decision, met)
        return Outcome(res.logits, cand.variant, cand.name, exit_index, res.exits, res.queue_ms,
                       res.compute_ms, call.budget_ms, met, retried_from, cand.device)

    def rejected(self, exc: AdaptiveError) -> None:
        """Count a request refused before it reached `infer` (malformed, unknown model)."""
        m = self.metrics
        m.child(m.requests, self.family.name, "none", exc.code).inc()

    async def _probe(self, lane: str) -> None:
        """One zero image through a quarantined lane (the breaker's re-probe)."""
        x = np.zeros((1, *self.family.input_shape), np.float32)
        await self.batchers[lane].submit(x, deadline=None)

    # --- the variant table and gauges ----------------------------------------------------------

    def table(self, batch: int = 1) -> list[tuple[Candidate, Decision, float]]:
        """Per candidate: the router's prediction now and the compute p95 (ms)."""
        r = self.router
        return [(d.candidate, d, r.compute(d.candidate, batch, d.slowdown).p95)
                for d in r.predictions(r.candidates, batch, self.load())]

    def update_gauges(self) -> None:
        """Once per monitor interval: the CPU share per request, then every gauge."""
        host = self.monitor.latest
        now = self.clock()
        r = self.router
        r.cpu.sample(now, cores=host.cores, cpu_process=host.cpu_process,
                     cpu_other=host.cpu_other, cpu_siblings=host.cpu_siblings)
        self._accel_slowdown = self._gpu_slowdown(host.gpus)
        self.metrics.publish(host, {name: b.queued for name, b in self.batchers.items()},
                             {c.name: d.compute_ms / 1e3 for c, d, _p95 in self.table(1)},
                             (r.calibration.factor, r.calibration.additive_ms,
                              r.calibration.miss_rate, r.overhead.ms, r.cpu.share_ms(now)),
                             r.late_share)

    def _gpu_slowdown(self, gpus: Sequence[GpuSample]) -> float:
        """The GPU lanes' slowdown from other processes on the GPU: NVML's utilisation less the
        share this server's own GPU lanes computed since the last update (the way CPU load
        feeds the CPU lanes)."""
        busy_ms, self._accel_busy_ms = self._accel_busy_ms, 0.0
        accel = self.accelerator
        if accel is None or accel.device == CPU or not gpus:
            return 1.0
        own = busy_ms / (self.monitor.interval_s * 1e3)
        other = min(max(gpus[0].utilization - own, 0.0), 0.9)
        return 1.0 / (1.0 - other)

    # --- batches: what runs, and what each one teaches the latency model -----------------------

    def _executor_for(self, name: str) -> Execute:
        lane = self.lanes[name]
        runner = self.runners[name]  # fault injection may have wrapped the lane's runner
        if isinstance(runner, Stages):
            return stages_executor(self.family.variant(lane.variant), runner, self._stages_fit,
                                   lane=name, max_batch=lane.settings.max_batch)
        return graph_executor(name, runner, max_batch=lane.settings.max_batch)

    def _stages_fit(self, lane: str, stage: int, samples: int,
                    deadlines: Sequence[float | None]) -> list[bool]:
        """Early exit, between stages (worker thread): may each request run ``stage``?"""
        slowdown = (self.slowdown(starting=0) if self.lanes[lane].device == CPU
                    else self._accel_slowdown)
        return [self.router.next_stage_fits(lane, stage, deadline=d, batch=samples,
                                            slowdown=slowdown) for d in deadlines]

    def batch_done(self, variant: str, items: list[Item], started: float, out: BatchOutput
                   ) -> None:
        """`Listener`: on the event loop after each batch: metrics and the latency model."""
        m = self.metrics
        n = sum(i.n for i in items)
        m.child(m.batch_size, variant).observe(n)
        for i in items:
            m.child(m.queue_wait, variant).observe(max(started - i.enqueued, 0.0))
        for exits in out.exits:
            if exits is not None:
                for e, count in zip(*np.unique(exits, return_counts=True), strict=True):
                    m.child(m.early_exit, str(int(e))).inc(int(count))
        if self.lanes[variant].device != CPU:  # the GPU's time, not the CPU's
            for unit, batch, ms in out.timings:
                self.latency.observe(unit, batch, ms, slowdown=self._accel_slowdown)
                self._accel_busy_ms += ms
            return
        slowdown = self.slowdown()  # this batch has left `executing`: count it as starting
        for unit, batch, ms in out.timings:
            self.latency.observe(unit, batch, ms, slowdown=slowdown)
            self.router.cpu.computed(ms)

    def batch_failed(self, exc: VariantFailed) -> None:
        """`Listener`: a batch failed; quarantine its variant."""
        self.breaker.failed(exc)


class _LaneCosts:
    """A batcher's `Costs`: its lane's batches as the latency model predicts them now."""

    def __init__(self, engine: Engine, lane: str) -> None:
        self._engine = engine
        self._deepest = engine.router.deepest(lane)
        self._on_cpu = engine.lanes[lane].device == CPU
        s = engine.settings
        self._timeout_floor_ms = s.batch_timeout_ms
        # A batch on the event loop cannot be timed out: never inline a fault-injected lane.
        accel = engine.accelerator
        self._inline_ms = (s.inline_below_ms if self._on_cpu or accel is None
                           else accel.inline_below_ms)
        self._may_inline = self._inline_ms > 0 and (
            engine.faults is None or lane not in engine.faults.faults)

    def _predict(self, n: int) -> tuple[float, float]:
        e = self._engine
        p = e.router.compute(self._deepest, max(n, 1),
                             e.slowdown() if self._on_cpu else e._accel_slowdown)
        return p.p50, p.p95

    def predict_ms(self, n: int) -> float:
        return self._predict(n)[1]

    def timeout_s(self, n: int) -> float:
        return max(self._timeout_floor_ms, 10.0 * self.predict_ms(n)) / 1e3

    def inline(self, n: int) -> bool:
        """Typical (p50) cost under the lane's inline threshold: run it on the event loop.
        Uncontended: contention slows the hand-off to a thread this saves as much as the batch
        (and the batcher asks per batch, so this reads no load)."""
        return self._may_inline and (
            self._engine.latency.sum_ms(self._deepest.units, max(n, 1))[0] <= self._inline_ms)


def _log_decision(call: Call, d: Decision, met: bool) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("request %r: %d samples, budget %s ms → %s (predicted %.3f + margin %.3f ms, "
                  "CPU x%.2f), %s", call.request_id, call.x.shape[0],
                  "none" if call.budget_ms is None else f"{call.budget_ms:.3f}", d.candidate.name,
                  d.predicted_ms, d.margin_ms, d.slowdown, "met" if met else "missed")
