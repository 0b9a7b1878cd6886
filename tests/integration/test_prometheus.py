"""A real Prometheus (Debian's `prometheus`) scraping a real server under load from the real client.

The shipped ``deploy/prometheus/prometheus.yml`` (scrape interval and target rewritten for the
test) and ``alerts.yml`` are loaded as they are. Prometheus's answers are checked against what
the client counted: totals by status and variant exactly, ``rate()`` within the extrapolation
Prometheus applies at the window's edges, and ``histogram_quantile`` between bounds the client's
own per-request times imply. The Grafana dashboard's queries and the alert expressions run against
the same API, and every metric they name must be one the server exports.
"""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from deploy_checks import DEPLOY, alert_exprs, dashboard_queries, exported_series, names_in

from client import AdaptiveClient, AdaptiveError
from server.metrics import LATENCY_BUCKETS
from server.settings import ServeOptions, Settings
from tests.harness import RunningServer, serve_in_thread

SCRAPE_S = 1.0
PROMETHEUS = shutil.which("prometheus")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="the `prometheus` binary is not on PATH (Debian package "
                               "`prometheus`; .ci/run installs it)")


# --- a Prometheus server ------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    """``prometheus`` on 127.0.0.1 with the shipped config pointed at ``target``."""

    def __init__(self, tmp: Path, target: str) -> None:
        config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
        for old, new in (("scrape_interval: 5s", f"scrape_interval: {SCRAPE_S:g}s"),
                         ("evaluation_interval: 15s", f"evaluation_interval: {SCRAPE_S:g}s"),
                         ('"127.0.0.1:8002"', f'"{target}"')):
            assert config.count(old) == 1, f"prometheus.yml changed: {old!r} not found once"
            config = config.replace(old, new)
        (tmp / "prometheus.yml").write_text(config)
        shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp / "alerts.yml")  # rule_files: relative
        self.log = (tmp / "prometheus.log").open("w")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"], stdout=self.log, stderr=subprocess.STDOUT, cwd=tmp)

    def wait_ready(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, f"prometheus exited: {self.proc.returncode}"
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)  # polling an HTTP endpoint: no event to wait on
        raise AssertionError("prometheus not ready")

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.api("query", **params)["result"]

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        res = self.query(expr, at)
        return float(res[0]["value"][1]) if res else None

    def wait_for(self, expr: str, want: float, timeout: float = 20) -> float:
        """Poll until ``expr`` evaluates to ``want`` (a scrape has caught up); returns when."""
        end = time.monotonic() + timeout
        got = None
        while time.monotonic() < end:
            got = self.scalar(expr)
            if got == want:
                return time.time()
            time.sleep(SCRAPE_S / 4)  # polling for the next scrape
        raise AssertionError(f"{expr} = {got}, expected {want} within {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def fresh_server(serving_family: Path) -> Iterator[RunningServer]:
    """Its own server, so the counters start at zero; best-effort, so that how many requests end
    OK does not depend on how fast this machine is (a shed request would end DEADLINE_EXCEEDED)."""
    opts = ServeOptions(threads=2, settings=Settings(on_miss="best-effort"))
    with serve_in_thread(serving_family, options=opts) as running:
        yield running


@pytest.fixture(scope="module")
def prometheus(fresh_server: RunningServer, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Prometheus]:
    prom = Prometheus(tmp_path_factory.mktemp("prometheus"),
                      f"127.0.0.1:{fresh_server.server.metrics_port}")
    try:
        prom.wait_ready()
        prom.wait_for('up{job="adaptive-inference"}', 1.0)
        yield prom
    finally:
        prom.stop()


# --- load, counted by the client ----------------------------------------------------------------

class Tally:
    """What the client saw: statuses, variants, and per-request times (ms)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.status: Counter[str] = Counter()
        self.variant: Counter[str] = Counter()
        self.rtt: list[float] = []
        self.server_floor: list[float] = []  # queue + compute reported by the server

    def drive(self, target: str, n: int, threads: int = 3) -> None:
        rng = np.random.default_rng(0)
        x = rng.random((8, 1, 28, 28), dtype=np.float32)
        budgets = [0.3, 2.0, 20.0, None]
        # Pinned variants (and no budget: the most accurate, `slow`) keep the set of
        # (variant, status) series fixed, so the warm-up creates every one before the rate
        # window opens: Prometheus cannot know a series' value before its first scrape.
        pins = ["fast", "mid", "slow", "early-exit", None]

        def worker(k: int) -> None:
            with AdaptiveClient(target) as c:
                for i in range(k, n, threads):
                    try:
                        if i % 25 == 0:  # a malformed request: counted as INVALID_ARGUMENT
                            c.infer(x[:1, :, :14], timeout=60.0)
                            raise AssertionError("a malformed request was answered")
                        pin = pins[i % len(pins)]
                        # A generous gRPC deadline: a call the client gave up on could still
                        # be answered (and counted OK) by the server.
                        r = c.infer(x[i % 8:i % 8 + 1], variant=pin, timeout=60.0,
                                    budget_ms=None if pin is None else budgets[i % len(budgets)])
                    except AdaptiveError as exc:
                        with self.lock:
                            self.status[exc.code] += 1
                        continue
                    with self.lock:
                        self.status["OK"] += 1
                        self.variant[r.variant] += 1
                        self.rtt.append(r.latency_ms)
                        self.server_floor.append((r.queue_ms or 0.0) + (r.compute_ms or 0.0))

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    @property
    def total(self) -> int:
        return sum(self.status.values())


def _bucket_bounds(ms: float) -> tuple[float, float]:
    """The latency histogram bucket (seconds) holding ``ms``: (lower, upper] edges."""
    s = ms / 1e3
    edges = [0.0, *LATENCY_BUCKETS, float("inf")]
    for lo, hi in itertools.pairwise(edges):
        if s <= hi:
            return lo, hi
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def loaded(fresh_server: RunningServer, prometheus: Prometheus) -> dict[str, Any]:
    """Warm-up (every series exists and has been scraped), then the measured load."""
    warm = Tally()
    warm.drive(fresh_server.target, 10, threads=1)
    prometheus.wait_for("sum(adaptive_requests_total)", warm.total)
    time.sleep(1.5 * SCRAPE_S)  # a flat stretch before the load, inside the rate window
    t_before = time.time()
    load = Tally()
    load.drive(fresh_server.target, 300)
    t_end = prometheus.wait_for("sum(adaptive_requests_total)", warm.total + load.total)
    time.sleep(1.5 * SCRAPE_S)  # and a flat stretch after
    t_end = max(t_end, time.time())
    return {"warm": warm, "load": load, "t_before": t_before, "t_end": t_end}


# --- the checks ---------------------------------------------------------------------------------

def test_counters_equal_what_the_client_counted(prometheus: Prometheus,
                                                loaded: dict[str, Any]) -> None:
    warm, load, t_end = loaded["warm"], loaded["load"], loaded["t_end"]
    by_status = {r["metric"]["status"]: float(r["value"][1]) for r in prometheus.query(
        "sum by (status) (adaptive_requests_total)", t_end)}
    assert by_status == {k: float(v) for k, v in (warm.status + load.status).items()}
    assert load.status["INVALID_ARGUMENT"] == 12 and load.status["OK"] == 288
    by_variant = {r["metric"]["variant"]: float(r["value"][1]) for r in prometheus.query(
        'sum by (variant) (adaptive_requests_total{status="OK"})', t_end)}
    assert by_variant == {k: float(v) for k, v in (warm.variant + load.variant).items()}
    assert prometheus.scalar("sum(adaptive_request_latency_seconds_count)", t_end) \
        == warm.status["OK"] + load.status["OK"]


def test_rate_matches_the_count_sent(prometheus: Prometheus, loaded: dict[str, Any]) -> None:
    load, t_before, t_end = loaded["load"], loaded["t_before"], loaded["t_end"]
    window = int(np.ceil(t_end - t_before)) + 1
    rate = prometheus.scalar(f"sum(rate(adaptive_requests_total[{window}s]))", t_end)
    assert rate is not None
    increase = rate * window
    # The window holds every load request; Prometheus extrapolates the first-to-last sample
    # delta to the window's edges, by at most ~1.1 scrape intervals at each end.
    slack = window / (window - 2 * 1.1 * SCRAPE_S - 0.5)
    assert load.total * 0.999 <= increase <= load.total * slack + 1, (increase, load.total)


def test_histogram_quantiles_fit_the_client_times(prometheus: Prometheus,
                                                  loaded: dict[str, Any]) -> None:
    warm, load, t_before, t_end = (loaded["warm"], loaded["load"], loaded["t_before"],
                                   loaded["t_end"])
    rtt = warm.rtt + load.rtt
    floor = warm.server_floor + load.server_floor
    window = int(np.ceil(t_end - t_before)) + 1
    for q in (0.5, 0.95, 0.99):
        est = prometheus.scalar(
            f"histogram_quantile({q}, sum by (le) (adaptive_request_latency_seconds_bucket))",
            t_end)
        windowed = prometheus.scalar(
            f"histogram_quantile({q}, sum by (le) "
            f"(rate(adaptive_request_latency_seconds_bucket[{window}s])))", t_end)
        assert est is not None and windowed is not None
        # Each request's server-side latency lies between the queue + compute it reported and its
        # round trip; histogram_quantile answers inside the bucket of the true quantile.
        lo = _bucket_bounds(float(np.quantile(floor, q, method="lower")))[0]
        hi = _bucket_bounds(float(np.quantile(rtt, q, method="higher")))[1]
        assert lo <= est <= hi, (q, lo, est, hi)
        # rate() extrapolates each bucket series to the window's edges, not always by the same
        # factor (a counter is never extrapolated below zero): one bucket of leeway each side.
        lo_load = _bucket_bounds(float(np.quantile(load.server_floor, q, method="lower")))[0]
        hi_load = _bucket_bounds(float(np.quantile(load.rtt, q, method="higher")))[1]
        lo_load = _bucket_bounds(lo_load * 1e3)[0] if lo_load > 0 else 0.0
        hi_load = _bucket_bounds(hi_load * 1e3 * 1.0001)[1]
        assert lo_load <= windowed <= hi_load, (q, lo_load, windowed, hi_load)


def test_dashboard_and_alert_queries_are_valid_and_name_exported_metrics(
        prometheus: Prometheus, fresh_server: RunningServer, loaded: dict[str, Any]) -> None:
    text = urllib.request.urlopen(fresh_server.metrics_url, timeout=10).read().decode()
    exported = exported_series(text)
    queries = dashboard_queries()
    assert len(queries) >= 10
    for expr in queries + list(alert_exprs().values()):
        unknown = names_in(expr) - exported
        assert not unknown, f"{expr!r} names metrics the server does not export: {unknown}"
        # Grafana substitutes $__rate_interval; any valid duration does for a syntax check.
        prometheus.query(expr.replace("$__rate_interval", "10s"), loaded["t_end"])
    # The panels whose metrics this load must have produced show data.
    for expr in queries:
        if names_in(expr) & {"adaptive_requests_total", "adaptive_request_latency_seconds_bucket",
                             "adaptive_queue_wait_seconds_bucket",
                             "adaptive_cpu_utilization_ratio"}:
            assert prometheus.query(expr.replace("$__rate_interval", "30s"), loaded["t_end"]), expr


def test_alert_rules_load_and_evaluate(prometheus: Prometheus, loaded: dict[str, Any]) -> None:
    groups = prometheus.api("rules")["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert {"AdaptiveBudgetMissRatioHigh", "AdaptiveCpuSaturated", "AdaptiveVariantFailing",
            "AdaptiveServerDown"} <= set(rules)
    for name, rule in rules.items():
        assert rule["health"] in ("ok", "unknown"), (name, rule.get("lastError"))
    # After a few evaluation rounds every rule has been evaluated without error.
    end = time.monotonic() + 10
    while time.monotonic() < end:
        groups = prometheus.api("rules")["groups"]
        health = {r["name"]: r["health"] for g in groups for r in g["rules"]}
        if all(h == "ok" for h in health.values()):
            break
        time.sleep(SCRAPE_S / 2)  # waiting for the next evaluation round
    assert all(h == "ok" for h in health.values()), health
    firing = [a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]]
    assert "AdaptiveServerDown" not in firing
