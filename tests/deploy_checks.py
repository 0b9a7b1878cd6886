"""Reading the operator files for the tests: the Grafana dashboard's queries, the alert
expressions, the metric names a PromQL expression selects and the series an exposition carries;
the Prometheus adapter's rules with their queries rendered; the Deployment's pod settings as
`docker run` flags.

Shared by ``unit/test_deploy_prometheus.py`` and ``unit/test_deploy.py`` (against the metrics
registry and the manifests), ``integration/test_prometheus.py`` (against a real server and a real
Prometheus) and ``container/`` (the image run with the Deployment's settings). ``tests/`` is on
``sys.path`` because its ``conftest.py`` is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.memory import memory_bytes

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "adaptive-inference.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
K8S = DEPLOY / "k8s"
ADAPTER_RULES = DEPLOY / "prometheus-adapter" / "rules.yaml"


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


# --- the Prometheus adapter ------------------------------------------------------------------

def adapter_rules(path: Path = ADAPTER_RULES) -> list[dict[str, Any]]:
    """The custom-metrics rules of a prometheus-adapter config file."""
    import yaml  # the dev extra's; imported here so the dashboard helpers need only the base

    return list(yaml.safe_load(path.read_text())["rules"])


def render_metrics_query(rule: dict[str, Any], pods: tuple[str, ...] = ("p-0", "p-1")) -> str:
    """A rule's ``metricsQuery`` as the adapter sends it to Prometheus for ``pods`` in namespace
    ``default``: the series its ``seriesQuery`` selects, label matchers, grouping by pod."""
    m = re.match(r"\s*([A-Za-z_:][A-Za-z0-9_:]*)", rule["seriesQuery"])
    assert m, f"seriesQuery {rule['seriesQuery']!r} does not start with a metric name"
    matchers = f'namespace="default",pod=~"{"|".join(pods)}"'
    return (rule["metricsQuery"].replace("<<.Series>>", m.group(1))
            .replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", "pod"))


# --- the Deployment as `docker run` flags ----------------------------------------------------

def cpu_cores(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity (``2``, ``"1.5"``, ``"500m"``) in cores."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


@dataclass(frozen=True)
class RunSpec:
    """One Deployment container as `docker run` options: ``flags`` before the image, ``args``
    after it (appended to the ENTRYPOINT, as Kubernetes does), the stop timeout and the user."""

    flags: list[str]
    args: list[str]
    grace_s: int
    user: str


# Every security setting the Deployment uses must map to a docker flag here; one this does not
# know fails loudly, so the container test never silently runs with less than the pod would.
_POD_SECURITY = {"runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile"}
_CONTAINER_SECURITY = {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"}


def docker_run_spec(deployment: dict[str, Any], mounts: dict[str, Path],
                    container: str = "server") -> RunSpec:
    """The pod's security settings, resource limits, volumes and args for ``docker run``.
    ``mounts`` gives a host directory for each volume that is not an in-memory ``emptyDir``
    (the family); memory ``emptyDir`` volumes become a tmpfs of their ``sizeLimit``."""
    pod = deployment["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == container]
    psec, csec = pod.get("securityContext", {}), c.get("securityContext", {})
    unknown = (set(psec) - _POD_SECURITY) | (set(csec) - _CONTAINER_SECURITY)
    assert not unknown, f"security settings with no docker mapping here: {sorted(unknown)}"
    assert psec.get("seccompProfile", {"type": "RuntimeDefault"})["type"] == "RuntimeDefault"
    user = f"{psec['runAsUser']}:{psec.get('runAsGroup', psec['runAsUser'])}"
    if psec.get("runAsNonRoot"):
        assert psec["runAsUser"] != 0, "runAsNonRoot with runAsUser 0"
    flags = ["--user", user]  # docker's default seccomp profile is RuntimeDefault
    if csec.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    if csec.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    caps = csec.get("capabilities", {})
    flags += [f for cap in caps.get("drop", []) for f in ("--cap-drop", cap)]
    flags += [f for cap in caps.get("add", []) for f in ("--cap-add", cap)]
    limits = c["resources"]["limits"]
    flags += ["--cpus", f"{cpu_cores(limits['cpu']):g}", "--memory", str(memory_bytes(limits["memory"]))]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in c.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        empty = volume.get("emptyDir")
        if mount["name"] in mounts:
            mode = "ro" if mount.get("readOnly") else "rw"
            flags += ["-v", f"{mounts[mount['name']]}:{mount['mountPath']}:{mode}"]
        elif empty is not None and empty.get("medium") == "Memory":
            size = memory_bytes(empty.get("sizeLimit", "64Mi"))
            flags += ["--tmpfs", f"{mount['mountPath']}:rw,size={size}"]
        else:
            raise AssertionError(f"volume {mount['name']!r}: give a host directory in mounts")
    grace = int(pod.get("terminationGracePeriodSeconds", 30))
    return RunSpec(flags, [str(a) for a in c.get("args", [])], grace, user)
