"""The operator files: promtool validates the scrape config and the alert rules and runs the rules'
unit tests; the Grafana dashboard is well formed, covers what operators need, and its queries and
the alerts name only series the server's metrics registry exports."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from deploy_checks import DASHBOARD, DEPLOY, alert_exprs, dashboard_queries, exported_series, names_in
from prometheus_client import generate_latest

from server.metrics import Metrics

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not on PATH (Debian package `prometheus`; .ci/run "
                             "installs it)")


def _promtool(*args: str) -> str:
    assert PROMTOOL is not None
    proc = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60,
                          cwd=DEPLOY / "prometheus")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@needs_promtool
def test_promtool_checks_the_scrape_config() -> None:
    out = _promtool("check", "config", "prometheus.yml")
    assert "SUCCESS" in out and "1 rule files found" in out


@needs_promtool
def test_promtool_checks_the_alert_rules() -> None:
    assert "SUCCESS: 8 rules found" in _promtool("check", "rules", "alerts.yml")


@needs_promtool
def test_promtool_runs_the_alert_unit_tests() -> None:
    assert "SUCCESS" in _promtool("test", "rules", "alerts_test.yml")


def test_alerts_cover_the_eight_conditions() -> None:
    assert set(alert_exprs()) == {"AdaptiveBudgetMissRatioHigh", "AdaptiveCpuSaturated",
                                  "AdaptiveEventLoopSaturated", "AdaptiveVariantFailing",
                                  "AdaptiveVariantRunningLate",
                                  "AdaptiveServerDown", "AdaptiveWorkersDown",
                                  "AdaptiveWorkersRestarting"}


def test_dashboard_is_well_formed_and_covers_the_operator_views() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert {"h", "w", "x", "y"} <= p["gridPos"].keys() and p["gridPos"]["x"] + \
            p["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for view in ("request rate by variant", "against the requested budget", "budget-miss ratio",
                 "early-exit", "queue wait", "cpu / gpu", "event loop busy", "late answers",
                 "refused, by cause"):
        assert view in titles, view
    by_metric = {n for q in dashboard_queries() for n in names_in(q)}
    assert {"adaptive_requests_total", "adaptive_request_latency_seconds_bucket",
            "adaptive_latency_budget_seconds_bucket", "adaptive_budget_misses_total",
            "adaptive_early_exit_total", "adaptive_queue_wait_seconds_bucket",
            "adaptive_cpu_utilization_ratio", "adaptive_gpu_utilization_ratio",
            "adaptive_event_loop_busy_ratio", "adaptive_variant_late_ratio",
            "adaptive_refused_total"} <= by_metric


def test_queries_name_only_series_the_registry_exports() -> None:
    exported = exported_series(generate_latest(Metrics().registry).decode())
    assert "adaptive_requests_total" in exported and "adaptive_requests" not in exported
    assert "adaptive_request_latency_seconds_bucket" in exported
    for expr in dashboard_queries() + list(alert_exprs().values()):
        unknown = names_in(expr) - exported
        assert not unknown, f"{expr!r} names series the server does not export: {unknown}"


def test_names_in_reads_selectors_not_label_values() -> None:
    expr = ('sum by (le) (rate(adaptive_x_bucket{variant="adaptive_fake"}[5m])) '
            '/ adaptive_y_total')
    assert names_in(expr) == {"adaptive_x_bucket", "adaptive_y_total"}
