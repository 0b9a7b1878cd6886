"""The request path between the wire and the runners: route → queue → batch → run → observe.

`Engine` owns the family's runners, one `Batcher` per variant, the `Router` and its latency model,
and records the per-request and per-batch metrics. The servicer hands it a decoded `Call` and gets
an `Outcome` back; everything here is independent of gRPC.

Faults: when a routed request's batch fails (its runner raised or timed out), the request is
retried once on the next-best candidate that fits what is left of its budget, and the variant is
quarantined: the router skips it until a background probe (one zero image, spaced by a doubling
back-off) runs cleanly. Pinned requests are not moved to another variant.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from compression.core.family import Family, Variant
from server.batcher import Batcher, BatchOutput, Execute, Item
from server.codec import Call
from server.errors import AdaptiveError, BudgetExceeded, InternalError, VariantFailed
from server.faults import FaultInjector, Quarantine
from server.latency import LatencyModel, Load
from server.monitor import Monitor
from server.router import Candidate, Clock, Decision, Router, candidates_for, confident, unit_name
from server.runtime import LOGITS, Runner, Stages, remeasure

if TYPE_CHECKING:  # prometheus_client is imported only after --workers set its multiprocess dir
    from server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """The serving knobs (CLI flags of `adaptive-inference serve`)."""

    max_batch: int = 32
    max_queue_delay_ms: float = 0.0
    max_queue: int = 1024
    on_miss: str = "best-effort"
    threads_per_batch: int = 1
    deadline_margin_ms: float = 0.5
    inline_below_ms: float = 0.0  # > 0: tiny batches on an idle variant skip the thread pool
    batch_timeout_ms: float = 1000.0  # a batch fails after max(this, 10 × its predicted p95)
    quarantine_s: float = 2.0  # first re-probe of a failed variant; doubles per failed probe
    quarantine_max_s: float = 60.0


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


class Engine:
    """Routes and runs requests for one family; see the module docstring."""

    def __init__(self, family: Family, runners: Mapping[str, Runner | Stages], *,
                 executor: Executor, metrics: Metrics, monitor: Monitor,
                 settings: Settings = Settings(), clock: Clock = time.monotonic,
                 faults: FaultInjector | None = None) -> None:
        self.family = family
        self.runners = dict(runners)
        self.settings = settings
        self.metrics = metrics
        self.monitor = monitor
        self.clock = clock
        self.executor = executor
        self.latency = LatencyModel(threads_per_batch=settings.threads_per_batch)
        for v in family.variants.values():
            _seed_from_manifest(self.latency, v)
        self.router = Router(candidates_for(family.variants.values()), self.latency,
                             max_batch=settings.max_batch, on_miss=settings.on_miss,
                             max_queue=settings.max_queue, clock=clock)
        self.batchers: dict[str, Batcher] = {}
        self.faults = faults
        self.quarantine = Quarantine(base_s=settings.quarantine_s, max_s=settings.quarantine_max_s)
        self._probes: set[asyncio.Task[None]] = set()
        self._inflight = 0
        self._idle = asyncio.Event()  # set while no request is in flight (graceful shutdown)
        self._idle.set()
        for c in self.router.candidates:
            metrics.accuracy.labels(c.name).set(c.accuracy)
            if c.exit is not None:
                metrics.early_exit.labels(str(c.exit))
        for name in family.variants:  # zero series from the start, so rates work at once
            metrics.budget_misses.labels(family.name, name)
            metrics.requests.labels(family.name, name, "OK")
            metrics.variant_failures.labels(name)
            metrics.retries.labels(name)
            metrics.quarantined.labels(name).set(0)

    # --- lifecycle -----------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Run every variant at batch 1, 8, 32 and re-seed the latency model with this host's
        times (blocking: call it in a worker thread before serving)."""
        shape = self.family.input_shape
        sizes = sorted({1, 8, min(32, self.settings.max_batch), self.settings.max_batch})
        for name, runner in self.runners.items():
            tables = remeasure(name, runner, shape, batch_sizes=sizes)
            factor = self.latency.load_factor(self.load(), extra_batches=1)
            for unit, table in tables.items():
                # Store unloaded times, like online observations.
                self.latency.seed(unit, {b: {k: v / factor for k, v in row.items()}
                                         for b, row in table.items()})
            p = self.router.compute(self._deepest(name), 1, 1.0)
            log.info("variant %s: re-measured on this host, p50 %.3f ms, p95 %.3f ms at batch 1",
                     name, p.p50, p.p95)

    def start(self) -> None:
        """Start the batchers (on the running event loop); arm injected faults (after warm-up,
        which must succeed)."""
        if self.faults is not None:
            self.runners = self.faults.wrap(self.runners)
            self.faults.arm()
        for name in self.family.variants:
            self.batchers[name] = Batcher(
                name, self._executor_for(name), self.executor, clock=self.clock,
                max_batch=self.settings.max_batch, max_delay_ms=self.settings.max_queue_delay_ms,
                max_queue=self.settings.max_queue, predict_ms=self._batch_ms(name),
                drop_expired=self.settings.on_miss == "reject",
                on_batch=functools.partial(self._on_batch, name),
                inline_ok=self._inline_ok(name) if self._may_inline(name) else None,
                timeout_s=self._timeout_s(name), on_failure=self._on_failure)
            self.batchers[name].start()

    async def stop(self) -> None:
        for t in self._probes:
            t.cancel()
        if self.faults is not None:
            self.faults.release()  # hung injected calls return, so worker threads can exit
        await asyncio.gather(*(b.stop() for b in self.batchers.values()))

    @property
    def inflight(self) -> int:
        return self._inflight

    async def drained(self) -> None:
        """Return once no request is in flight."""
        await self._idle.wait()

    # --- requests ------------------------------------------------------------------------------

    def load(self) -> Load:
        host = self.monitor.latest
        return Load(cores=host.cores, cpu_other=host.cpu_other,
                    executing=sum(1 for b in self.batchers.values() if b.running),
                    queues=self.batchers)

    async def infer(self, call: Call) -> Outcome:
        """Route, queue and run one request; records its metrics whatever the result."""
        t0 = self.clock()
        m = self.metrics
        model = self.family.name
        deadline = None if call.budget_ms is None else t0 + call.budget_ms / 1e3
        if call.budget_ms is not None:
            m.child(m.budget, model).observe(max(call.budget_ms, 0.0) / 1e3)
        variant = "none"
        retried_from: str | None = None
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
                                          pin=call.pin, exclude=self.quarantine.variants)
            variant = decision.candidate.variant
            try:
                res = await self.batchers[variant].submit(call.x, deadline=deadline,
                                                          max_exit=decision.candidate.exit)
            except VariantFailed:
                if call.pin is not None:  # the client asked for this variant and no other
                    raise
                retried_from = variant
                m.child(m.retries, variant).inc()
                decision = self.router.choose(deadline=deadline, batch=batch, load=self.load(),
                                              exclude=self.quarantine.variants | {variant})
                variant = decision.candidate.variant
                log.debug("request %r: %s failed, retrying on %s", call.request_id, retried_from,
                          decision.candidate.name)
                res = await self.batchers[variant].submit(call.x, deadline=deadline,
                                                          max_exit=decision.candidate.exit)
            cand = decision.candidate
        except AdaptiveError as exc:
            m.child(m.requests, model, variant, exc.code).inc()
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
        exit_index = int(res.exits.max()) if res.exits is not None else None
        _log_decision(call, decision, met)
        return Outcome(res.logits, variant, cand.name, exit_index, res.exits, res.queue_ms,
                       res.compute_ms, call.budget_ms, met, retried_from)

    def rejected(self, exc: AdaptiveError) -> None:
        """Count a request refused before it reached `infer` (malformed, unknown model)."""
        m = self.metrics
        m.child(m.requests, self.family.name, "none", exc.code).inc()

    # --- failures: quarantine and re-probe ------------------------------------------------------

    def _on_failure(self, exc: VariantFailed) -> None:
        """A batch of ``exc.variant`` failed (on the event loop, once per batch)."""
        m = self.metrics
        m.child(m.variant_failures, exc.variant).inc()
        if self.quarantine.fail(exc.variant):
            delay = self.quarantine.next_probe_s(exc.variant)
            log.warning("variant %s quarantined (%s); re-probing in %.1f s", exc.variant, exc,
                        delay)
            m.child(m.quarantined, exc.variant).set(1)
            task = asyncio.get_running_loop().create_task(self._reprobe(exc.variant, delay),
                                                          name=f"reprobe-{exc.variant}")
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _reprobe(self, variant: str, delay: float) -> None:
        """Run one zero image through the variant until it succeeds; then route to it again."""
        x = np.zeros((1, *self.family.input_shape), np.float32)
        while True:
            await asyncio.sleep(delay)  # the back-off itself: a broken variant is tried rarely
            try:
                await self.batchers[variant].submit(x, deadline=None)
            except AdaptiveError as exc:
                delay = self.quarantine.probe_failed(variant)
                log.warning("variant %s failed its probe (%s); next in %.1f s", variant, exc, delay)
                continue
            self.quarantine.recovered(variant)
            self.metrics.child(self.metrics.quarantined, variant).set(0)
            log.info("variant %s passed its probe; routed to again", variant)
            return

    # --- the variant table and gauges ----------------------------------------------------------

    def table(self, batch: int = 1) -> list[tuple[Candidate, Decision, float]]:
        """Per candidate: the router's prediction now and the compute p50 (ms)."""
        load = self.load()
        rows = []
        for c in self.router.candidates:
            d = self.router.predict(c, batch, load)
            rows.append((c, d, self.router.compute(c, batch, d.load_factor).p50))
        return rows

    def update_gauges(self) -> None:
        host = self.monitor.latest
        m = self.metrics
        m.cpu.set(host.cpu_system)
        m.process_cpu.set(host.cpu_process)
        m.memory.set(host.memory_system)
        for g in host.gpus:
            m.gpu.labels(str(g.index)).set(g.utilization)
            m.gpu_memory.labels(str(g.index)).set(g.memory_used)
        for name, b in self.batchers.items():
            m.queue_depth.labels(name).set(b.queued)
        for c, d, _p50 in self.table(1):
            m.predicted_latency.labels(c.name).set(d.compute_ms / 1e3)

    # --- batches (worker threads) --------------------------------------------------------------

    def _executor_for(self, name: str) -> Execute:
        runner = self.runners[name]
        if isinstance(runner, Stages):
            v = self.family.variant(name)
            return lambda items: self._run_stages(name, v, runner, items)
        return lambda items: _run_graph(name, runner, items)

    def _run_stages(self, name: str, v: Variant, stages: Stages, items: list[Item]
                    ) -> BatchOutput:
        """Stage by stage; a sample leaves at its exit when confident, at its request's deepest
        allowed exit, or when its request's remaining budget cannot pay for the next stage."""
        assert v.exits is not None
        exits = sorted(v.exits, key=lambda e: e.index)
        x = _concat(items)
        owner = np.repeat(np.arange(len(items)), [i.n for i in items])  # sample → item
        max_exit = np.array([len(exits) - 1 if i.max_exit is None else i.max_exit
                             for i in items])[owner]
        factor = self.latency.load_factor(self.load(), extra_batches=0)
        out = np.empty((x.shape[0], self.family.num_classes), np.float32)
        used = np.full(x.shape[0], -1, np.int64)
        active = np.arange(x.shape[0])
        feed: np.ndarray | None = x
        timings: list[tuple[str, int, float]] = []
        for s, e in enumerate(exits):
            assert feed is not None, f"stage {s} of {name!r} got no features"
            t = time.perf_counter()
            logits, features = stages.run(s, feed)
            timings.append((unit_name(name, s), len(active), (time.perf_counter() - t) * 1e3))
            done = confident(logits, e.threshold, e.criterion) | (max_exit[active] <= s)
            if s + 1 < len(exits):
                for k in np.unique(owner[active[~done]]):  # per request: time for one more stage?
                    mine = owner[active] == k
                    if not self.router.next_stage_fits(name, s + 1, deadline=items[k].deadline,
                                                       batch=int((~done).sum()),
                                                       load_factor=factor):
                        done |= mine
            else:
                done[:] = True
            out[active[done]] = logits[done]
            used[active[done]] = s
            active, feed = active[~done], (features[~done] if features is not None else None)
            if not len(active):
                break
        return BatchOutput(_split(out, items), _split(used, items), timings)

    def _on_batch(self, variant: str, items: list[Item], started: float, out: BatchOutput
                  ) -> None:
        """On the event loop after each batch: metrics and the latency model's online update."""
        m = self.metrics
        n = sum(i.n for i in items)
        m.child(m.batch_size, variant).observe(n)
        for i in items:
            m.child(m.queue_wait, variant).observe(max(started - i.enqueued, 0.0))
        for exits in out.exits:
            if exits is not None:
                for e, count in zip(*np.unique(exits, return_counts=True), strict=True):
                    m.child(m.early_exit, str(int(e))).inc(int(count))
        factor = self.latency.load_factor(self.load(), extra_batches=1)
        for unit, batch, ms in out.timings:
            self.latency.observe(unit, batch, ms, load_factor=factor)

    def _batch_ms(self, name: str) -> Callable[[int], float]:
        deepest = self._deepest(name)

        def predict(n: int) -> float:
            factor = self.latency.load_factor(self.load(), extra_batches=1)
            return self.router.compute(deepest, max(n, 1), factor).p95
        return predict

    def _timeout_s(self, name: str) -> Callable[[int], float]:
        """How long a batch of ``n`` may run before it counts as hung."""
        predict = self._batch_ms(name)
        floor = self.settings.batch_timeout_ms

        def timeout(n: int) -> float:
            return max(floor, 10.0 * predict(n)) / 1e3
        return timeout

    def _may_inline(self, name: str) -> bool:
        # a batch on the event loop cannot be timed out: never inline a fault-injected variant
        return self.settings.inline_below_ms > 0 and (self.faults is None
                                                      or name not in self.faults.faults)

    def _inline_ok(self, name: str) -> Callable[[int], bool]:
        """Typical (p50) cost of the variant's batch under the threshold: run it inline."""
        deepest = self._deepest(name)
        limit = self.settings.inline_below_ms

        def ok(n: int) -> bool:
            return self.router.compute(deepest, n, self._load_factor_now()).p50 <= limit
        return ok

    def _load_factor_now(self) -> float:
        return self.latency.load_factor(self.load(), extra_batches=1)

    def _deepest(self, variant: str) -> Candidate:
        return max((c for c in self.router.candidates if c.variant == variant),
                   key=lambda c: len(c.units))


def _run_graph(name: str, runner: Runner, items: list[Item]) -> BatchOutput:
    x = _concat(items)
    t = time.perf_counter()
    logits = runner(x)[LOGITS]
    ms = (time.perf_counter() - t) * 1e3
    return BatchOutput(_split(logits, items), [None] * len(items),
                       [(unit_name(name), x.shape[0], ms)])


def _split(a: np.ndarray, items: list[Item]) -> list[np.ndarray]:
    """Rows of a batch result back to the requests they came from."""
    bounds = np.cumsum([0, *[i.n for i in items]])
    return [a[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def _concat(items: list[Item]) -> np.ndarray:
    return items[0].x if len(items) == 1 else np.concatenate([i.x for i in items])


def _seed_from_manifest(latency: LatencyModel, v: Variant) -> None:
    """Build-host latencies until warm-up re-measures: early-exit stages as increments of the
    cumulative exit latencies."""
    if not v.exits:
        latency.seed(unit_name(v.name), v.latency_ms)
        return
    prev: dict[str, dict[str, float]] | None = None
    for e in sorted(v.exits, key=lambda e: e.index):
        inc = {b: {k: max(row[k] - (prev[b][k] if prev and b in prev else 0.0), 0.0)
                   for k in ("p50", "p95")} for b, row in e.latency_ms.items()}
        latency.seed(unit_name(v.name, e.index), inc)
        prev = e.latency_ms


def _log_decision(call: Call, d: Decision, met: bool) -> None:
    if log.isEnabledFor(logging.DEBUG):
        log.debug("request %r: %d samples, budget %s ms → %s (predicted %.3f ms, load x%.2f), %s",
                  call.request_id, call.x.shape[0],
                  "none" if call.budget_ms is None else f"{call.budget_ms:.3f}", d.candidate.name,
                  d.predicted_ms, d.load_factor, "met" if met else "missed")
