"""Reading the operator files for the tests: the Grafana dashboard's queries, the alert
expressions, the metric names a PromQL expression selects and the series an exposition carries.

Shared by ``unit/test_deploy_prometheus.py`` (against the metrics registry) and
``integration/test_prometheus.py`` (against a real server and a real Prometheus). ``tests/`` is
on ``sys.path`` because its ``conftest.py`` is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "adaptive-inference.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"


def dashboard_queries(path: Path = DASHBOARD) -> list[str]:
    dash = json.loads(path.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def alert_exprs(path: Path = ALERTS) -> dict[str, str]:
    """alert name → its expression (a one-line ``expr:`` or a ``|`` block); the YAML is ours and
    there is no YAML parser among the dependencies, so a small reader suffices."""
    lines = path.read_text().splitlines()
    out: dict[str, str] = {}
    name = None
    for i, line in enumerate(lines):
        if m := re.match(r"\s*-\s*alert:\s*(\S+)", line):
            name = m.group(1)
        m = re.match(r"(\s*)expr:\s*(.*)$", line)
        if not m or name is None:
            continue
        if m.group(2).strip() != "|":
            out[name] = m.group(2).strip()
            continue
        body = []
        for nxt in lines[i + 1:]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= len(m.group(1)):
                break
            body.append(nxt.strip())
        out[name] = " ".join(b for b in body if b)
    return out


def names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (ours all start with ``adaptive_``)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
    return set(re.findall(r"\badaptive_[A-Za-z0-9_]+\b", expr))


def exported_series(text: str) -> set[str]:
    """Every series name an exposition can carry, from its metric families and their types:
    a counter ``x`` is the series ``x_total``; a histogram ``x`` is ``x_bucket``, ``x_sum`` and
    ``x_count`` (never bare ``x``); a gauge is its own name. Families with no samples yet
    (labelled, never used, e.g. the GPU gauges without a GPU) count: the server exports them."""
    out: set[str] = set()
    for fam in text_string_to_metric_families(text):
        if fam.type == "counter":
            out.add(f"{fam.name}_total")
        elif fam.type == "histogram":
            out |= {f"{fam.name}_bucket", f"{fam.name}_sum", f"{fam.name}_count"}
        else:
            out.add(fam.name)
        out |= {s.name for s in fam.samples}
    return out
