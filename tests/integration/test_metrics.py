"""Prometheus metrics scraped over HTTP from a real server, parsed, and linted by promtool."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import AdaptiveClient, InvalidArgument
from tests.harness import RunningServer, serve_in_thread

REQUIRED = {  # family names as the parser reports them (counters without `_total`)
    "adaptive_requests", "adaptive_request_latency_seconds", "adaptive_queue_wait_seconds",
    "adaptive_budget_misses", "adaptive_latency_budget_seconds", "adaptive_early_exit",
    "adaptive_batch_size", "adaptive_cpu_utilization_ratio", "adaptive_gpu_utilization_ratio",
    "adaptive_inflight_requests", "adaptive_variant_predicted_latency_seconds",
    "adaptive_variant_accuracy_ratio", "adaptive_event_loop_busy_ratio",
    "adaptive_variant_late_ratio",
}


def _scrape(url: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def _total(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == val for k, val in labels.items()))


def test_metrics_count_what_happened(server: RunningServer, client: AdaptiveClient,
                                     images: np.ndarray) -> None:
    _, before = _scrape(server.metrics_url)
    client.infer(images[:1], budget_ms=500)  # slow
    # Pinned: at 0.3 ms the router may pick fast or early-exit@0 (both ~0.03 ms) on a busy host.
    client.infer(images[:2], variant="fast", budget_ms=0.3)  # 2 samples
    client.infer(np.ones((1, 1, 28, 28), np.float32), variant="early-exit")  # exit 0
    client.infer(images[:1])  # no budget
    with pytest.raises(InvalidArgument):
        client.infer(images[:1, :, :14], budget_ms=5)
    text, after = _scrape(server.metrics_url)

    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert names >= REQUIRED

    def delta(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    assert delta("adaptive_requests_total", status="OK") == 4
    assert delta("adaptive_requests_total", variant="slow", status="OK") == 2
    assert delta("adaptive_requests_total", variant="early-exit", status="OK") == 1
    assert delta("adaptive_requests_total", status="INVALID_ARGUMENT") == 1
    assert delta("adaptive_request_latency_seconds_count", model="servetest") == 4
    assert delta("adaptive_latency_budget_seconds_count") == 2  # the bad one never got routed
    assert delta("adaptive_early_exit_total", exit="0") == 1
    assert delta("adaptive_batch_size_sum") == 5  # samples in executed batches
    assert delta("adaptive_queue_wait_seconds_count") == 4
    assert _total(after, "adaptive_variant_accuracy_ratio", variant="slow") == pytest.approx(0.99)
    assert _total(after, "adaptive_variant_predicted_latency_seconds", variant="fast") \
        < _total(after, "adaptive_variant_predicted_latency_seconds", variant="slow")
    cpu = _total(after, "adaptive_cpu_utilization_ratio")
    assert 0.0 <= cpu <= 1.0
    assert _total(after, "adaptive_inflight_requests") == 0


def test_event_loop_busy_ratio_rises_while_the_server_is_kept_busy(
        serving_family: Path, images: np.ndarray) -> None:
    """``adaptive_event_loop_busy_ratio`` (the loop thread's CPU over wall time, per monitor
    interval) stays low while the server idles and rises while closed-loop clients keep it busy:
    the saturation signal for calls that wait unread in gRPC's core, which no queue gauge sees.
    A server of its own: the load would teach the shared one's latency model a contended host."""
    with serve_in_thread(serving_family) as server:
        interval = 2 * server.server.monitor.interval_s + 0.2  # two full samples

        def busy() -> float:
            return _total(_scrape(server.metrics_url)[1], "adaptive_event_loop_busy_ratio")

        time.sleep(interval)
        idle = busy()
        stop = threading.Event()
        answering = threading.Barrier(5)  # the 4 callers and this thread

        def caller() -> None:
            with AdaptiveClient(server.target) as c:
                c.infer(images[:1], variant="fast")
                answering.wait(timeout=60)
                while not stop.is_set():
                    c.infer(images[:1], variant="fast")

        callers = [threading.Thread(target=caller) for _ in range(4)]
        for t in callers:
            t.start()
        try:
            # Sampled only once every caller has connected and been answered, so that the two
            # samples cover the load and not its start (a full local run once read 0.02).
            answering.wait(timeout=60)
            time.sleep(interval)
            loaded = busy()
        finally:
            stop.set()
            for t in callers:
                t.join(timeout=30)
    assert 0.0 <= idle < loaded <= 1.0, (idle, loaded)
    assert loaded > 0.1, loaded


def test_exposition_passes_promtool(server: RunningServer, client: AdaptiveClient,
                                    images: np.ndarray) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not on PATH (Debian package `prometheus`; .ci/run installs it)")
    client.infer(images[:1], budget_ms=5)
    text, _ = _scrape(server.metrics_url)
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
