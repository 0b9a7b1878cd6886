"""Prometheus metrics: names, labels and buckets in one place, served on ``--metrics-port``.

One `Metrics` per server, on its own registry (tests run several servers in one process). With
``--workers N`` every worker writes through prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set by the parent before it imports prometheus_client) and the
parent serves the aggregate; gauges say how they aggregate (``multiprocess_mode``).
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from server.monitor import HostSample

log = logging.getLogger(__name__)

# `*_created` timestamps double the exposition and no dashboard of ours reads them.
disable_created_metrics()

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0)
BUDGET_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Every metric the server exports (prefix ``adaptive_``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "adaptive_requests_total", "Inference requests by the variant that answered and the "
            "gRPC status they ended with.", ["model", "variant", "status"], registry=r)
        self.request_latency = Histogram(
            "adaptive_request_latency_seconds", "Time from request decoded to response ready.",
            ["model", "variant"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "adaptive_queue_wait_seconds", "Time a request waited in its variant's batch queue.",
            ["variant"], buckets=LATENCY_BUCKETS, registry=r)
        self.budget_misses = Counter(
            "adaptive_budget_misses_total", "Requests answered after their latency budget.",
            ["model", "variant"], registry=r)
        self.budget = Histogram(
            "adaptive_latency_budget_seconds", "Effective latency budgets of requests that had one.",
            ["model"], buckets=BUDGET_BUCKETS, registry=r)
        self.early_exit = Counter(
            "adaptive_early_exit_total", "Samples answered by each exit of the early-exit network.",
            ["exit"], registry=r)
        self.batch_size = Histogram(
            "adaptive_batch_size", "Samples per executed batch.", ["variant"],
            buckets=BATCH_BUCKETS, registry=r)
        self.cpu = Gauge(
            "adaptive_cpu_utilization_ratio", "CPU utilisation of the CPUs this server may run "
            "on (its affinity set), 0 to 1.",
            registry=r, multiprocess_mode="livemax")
        self.process_cpu = Gauge(
            "adaptive_process_cpu_utilization_ratio", "This server's CPU use as a share of the "
            "cores it may use (affinity, cgroup quota), 0 to 1.", registry=r, multiprocess_mode="livesum")
        self.memory = Gauge(
            "adaptive_memory_utilization_ratio", "System memory in use, 0 to 1.",
            registry=r, multiprocess_mode="livemax")
        self.gpu = Gauge(
            "adaptive_gpu_utilization_ratio", "GPU utilisation from NVML, 0 to 1 (no series "
            "without a GPU).", ["gpu"], registry=r, multiprocess_mode="livemax")
        self.gpu_memory = Gauge(
            "adaptive_gpu_memory_utilization_ratio", "GPU memory in use from NVML, 0 to 1.",
            ["gpu"], registry=r, multiprocess_mode="livemax")
        self.loop_busy = Gauge(
            "adaptive_event_loop_busy_ratio", "Share of the last monitor interval the event "
            "loop's thread spent on the CPU, 0 to 1; near 1 the process is saturated and new "
            "calls wait unread in gRPC's core, which no queue gauge counts.", registry=r,
            multiprocess_mode="livemax")
        self.inflight = Gauge(
            "adaptive_inflight_requests", "Inference requests being handled now.",
            registry=r, multiprocess_mode="livesum")
        self.queue_depth = Gauge(
            "adaptive_queue_depth", "Samples waiting in each variant's batch queue.",
            ["variant"], registry=r, multiprocess_mode="livesum")
        self.predicted_latency = Gauge(
            "adaptive_variant_predicted_latency_seconds", "Predicted compute of one sample on each "
            "candidate now (variant, or early-exit depth as variant@exit), CPU contention "
            "included.",
            ["variant"], registry=r, multiprocess_mode="livemax")
        self.shed = Counter(
            "adaptive_shed_total", "Requests refused at once because not even the fastest "
            "candidate could finish inside their budget under the load (DEADLINE_EXCEEDED).",
            ["model"], registry=r)
        self.refused = Counter(
            "adaptive_refused_total", "Requests refused unanswered, by what the server told the "
            "client refused them (trailer adaptive-refusal): load (shed for the wait it would "
            "have had, its deadline passed queued or unread, a full queue) or budget (stated "
            "below every candidate's own compute on an idle server). Clients throttle on load's.",
            ["model", "reason"], registry=r)
        self.router_factor = Gauge(
            "adaptive_router_safety_factor", "The router's proportional bound on lateness: "
            "a prediction of p gets a margin of at most (factor - 1) x p.", registry=r,
            multiprocess_mode="livemax")
        self.router_margin = Gauge(
            "adaptive_router_margin_seconds", "The router's additive bound on lateness: no "
            "prediction gets a larger margin (+Inf until enough answers are known).", registry=r,
            multiprocess_mode="livemax")
        self.router_miss = Gauge(
            "adaptive_router_miss_ratio", "Share of recent budgeted requests answered after "
            "their budget (EWMA over ~100 requests), to compare with --target-miss-rate.",
            registry=r, multiprocess_mode="livemax")
        self.late = Gauge(
            "adaptive_variant_late_ratio", "Share of each candidate's recent budgeted answers "
            "that missed although admitted on a prediction that they would make it (EWMA over "
            "~100 answers, pinned requests' included). Above --target-miss-rate its predictions "
            "are failing, and a request that would queue for it must fit with its margin.",
            ["variant"], registry=r, multiprocess_mode="livemax")
        self.router_overhead = Gauge(
            "adaptive_router_overhead_seconds", "Learned per-request time outside the model "
            "(routing, hand-offs, event-loop wake-ups).", registry=r, multiprocess_mode="livemax")
        self.router_cpu_share = Gauge(
            "adaptive_router_cpu_share_seconds", "Compute per request the CPU can sustain at the "
            "arrival rate now (the router prefers candidates within it); -1 when idle.",
            registry=r, multiprocess_mode="livemin")
        self.accuracy = Gauge(
            "adaptive_variant_accuracy_ratio", "Accuracy each candidate is ranked by (validation, "
            "from the manifest).",
            ["variant"], registry=r, multiprocess_mode="livemax")
        self.variant_failures = Counter(
            "adaptive_variant_failures_total", "Batches (and re-probes) of each variant whose "
            "runner raised or timed out.", ["variant"], registry=r)
        self.retries = Counter(
            "adaptive_retries_total", "Requests retried on another variant after the one "
            "they were routed to failed.", ["variant"], registry=r)
        self.quarantined = Gauge(
            "adaptive_variant_quarantined", "1 while a variant is quarantined after failures "
            "(skipped by the router until a probe succeeds).", ["variant"], registry=r,
            multiprocess_mode="livemax")
        self.auth_failures = Counter(
            "adaptive_auth_failures_total", "Requests refused UNAUTHENTICATED (missing or wrong "
            "bearer token).", registry=r)
        # One process serving its own endpoint is one worker; with --workers N the parent serves
        # the real counts (server.workers) and this registry of a worker is never exposed.
        r.register(WorkersCollector(lambda: WorkerCounts(live=1, configured=1, restarts=0)))

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, memoised: on the request path labels() costs a lock and a
        key build per call."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


    def publish(self, host: HostSample, queued: Mapping[str, int],
                predicted_s: Mapping[str, float],
                router: tuple[float, float, float, float, float],
                late: Mapping[str, float]) -> None:
        """The gauges sampled once per monitor interval: host load, queue depths (samples per
        variant), the predicted compute time of each candidate at batch 1, the router's
        (safety factor, margin ms, miss ratio, overhead ms, CPU share ms), and each
        candidate's late share."""
        factor, margin_ms, miss, overhead_ms, share_ms = router
        self.router_factor.set(factor)
        self.router_margin.set(margin_ms / 1e3)
        self.router_miss.set(miss)
        self.router_overhead.set(overhead_ms / 1e3)
        self.router_cpu_share.set(share_ms / 1e3 if share_ms != float("inf") else -1.0)
        self.cpu.set(host.cpu_system)
        self.process_cpu.set(host.cpu_process)
        self.memory.set(host.memory_system)
        for g in host.gpus:
            self.gpu.labels(str(g.index)).set(g.utilization)
            self.gpu_memory.labels(str(g.index)).set(g.memory_used)
        for name, n in queued.items():
            self.queue_depth.labels(name).set(n)
        for name, s in predicted_s.items():
            self.predicted_latency.labels(name).set(s)
        for name, share in late.items():
            self.late.labels(name).set(share)


@dataclass(frozen=True)
class WorkerCounts:
    """The server processes behind one metrics endpoint."""

    live: int  # workers up and SERVING now
    configured: int  # --workers
    restarts: int  # crashed workers the parent restarted, since it started


class WorkersCollector:
    """``adaptive_workers``, ``adaptive_workers_configured`` and
    ``adaptive_worker_restarts_total``, read from ``counts`` at each scrape.

    A collector, not Gauge/Counter objects: the parent of ``--workers N`` serves the multiprocess
    registry, whose metric objects would be written to (and summed from) the per-process files;
    these numbers belong to the parent alone and are only ever read live."""

    def __init__(self, counts: Callable[[], WorkerCounts]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        c = self._counts()
        yield GaugeMetricFamily("adaptive_workers", "Server processes up and SERVING behind this "
                                "endpoint (a restarted worker counts once it is warmed up).",
                                value=c.live)
        yield GaugeMetricFamily("adaptive_workers_configured", "Server processes this endpoint "
                                "should have (--workers).", value=c.configured)
        yield CounterMetricFamily("adaptive_worker_restarts", "Worker processes that exited "
                                  "unexpectedly (signal or status) and were restarted.",
                                  value=c.restarts)

    def describe(self) -> Iterator[Metric]:
        # Names only, for the registry's duplicate check; no call to ``counts`` at registration.
        yield GaugeMetricFamily("adaptive_workers", "", value=0)
        yield GaugeMetricFamily("adaptive_workers_configured", "", value=0)
        yield CounterMetricFamily("adaptive_worker_restarts", "", value=0)


class WorkerFilesCollector(MultiProcessCollector):
    """The workers' metric files, summed (prometheus_client's multiprocess collector), skipping a
    file that is still empty: a starting worker creates each file and only then sizes it, and
    one empty file made the whole exposition fail (a 500 for every scrape in that window, e.g.
    while a killed worker was being restarted). An empty file holds no values yet, so skipping
    it loses nothing."""

    def collect(self) -> Iterable[Metric]:
        files = []
        for f in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(f):  # files only grow: sized now, readable from here on
                    files.append(f)
            except FileNotFoundError:  # a dead worker's live gauges, removed meanwhile
                continue
        return self.merge(files, accumulate=True)


def serve_http(port: int, addr: str, registry: CollectorRegistry) -> tuple[Any, int]:
    """Serve ``registry`` on http://addr:port/metrics in a daemon thread; returns (server, port).
    The server is bounded (threads, connections, timeouts): see `server.metrics_http`."""
    from server.metrics_http import MetricsHTTPServer

    httpd = MetricsHTTPServer(registry, addr, port)
    httpd.start()
    log.info("metrics on http://%s:%d/metrics", addr, httpd.port)
    return httpd, httpd.port


def stop_http(httpd: Any) -> None:
    httpd.stop(timeout=5)
