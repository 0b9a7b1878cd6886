"""The deployment files, checked statically (docker and kubectl cannot run here): the Dockerfile's
stages, CPU-only installs, non-root user, ports and HEALTHCHECK; the Kubernetes Deployment's gRPC
probes and resources, the headless Service, the CPU HPA and the custom-metrics notes. Commands in
them are parsed with the real `adaptive-inference` argument parser, so a renamed flag fails here."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from client.cli import parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int  # index of the FROM it belongs to


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage = -1
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        keyword, _, args = logical.strip().partition(" ")
        keyword = keyword.upper()
        stage += keyword == "FROM"
        out.append(Instruction(keyword, args.strip(), stage))
        logical = ""
    return out


def exec_form(args: str) -> list[str]:
    """A JSON exec-form argument list (``["a", "b"]``)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    """Every manifest under deploy/k8s by kind."""
    docs = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return {d["kind"]: d for d in docs}


def _final(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last and i.keyword == keyword]


def _entrypoint(dockerfile: list[Instruction]) -> list[str]:
    (entry,) = _final(dockerfile, "ENTRYPOINT")
    return exec_form(entry.args)


def test_the_parser_sees_through_continuations_and_comments() -> None:
    parsed = parse_dockerfile("FROM a AS b\n# c\nRUN x \\\n  && y\nFROM d\nUSER 1\n")
    assert [(i.keyword, i.stage) for i in parsed] == [("FROM", 0), ("RUN", 0), ("FROM", 1),
                                                      ("USER", 1)]
    assert parsed[1].args == "x    && y"


def test_dockerfile_is_multi_stage_and_cpu_only(dockerfile: list[Instruction]) -> None:
    froms = [i for i in dockerfile if i.keyword == "FROM"]
    assert len(froms) >= 2
    build_stage = froms[0].args.split()[-1]
    assert any(i.keyword == "COPY" and f"--from={build_stage}" in i.args
               for i in _final(dockerfile, "COPY"))
    runs = " ".join(i.args for i in dockerfile if i.keyword in ("RUN", "ARG"))
    torch = re.search(r'--index-url \S+ "?torch==[\d.]+', runs)
    assert torch, "torch must be pinned and installed from an index first"
    assert "download.pytorch.org/whl/cpu" in runs  # the CPU wheel index
    # the venv the runtime stage copies is the serving install: no build extra, so no torch
    serving = re.search(r"/opt/venv/bin/pip install (\S+)", runs)
    assert serving and "build" not in serving.group(1), "the serving venv must not carry torch"
    assert any(i.keyword == "COPY" and "/opt/venv" in i.args and "/opt/build" not in i.args
               for i in _final(dockerfile, "COPY"))
    assert "onnxruntime-gpu" not in runs and "nvidia" not in runs.lower()
    deps = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"onnxruntime>=', deps) and "onnxruntime-gpu" not in deps


def test_dockerfile_runs_unprivileged_and_exposes_both_ports(
        dockerfile: list[Instruction]) -> None:
    users = _final(dockerfile, "USER")
    assert users, "the runtime stage must switch user"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "a numeric user lets Kubernetes verify runAsNonRoot"
    assert any(f"--uid {user}" in i.args for i in _final(dockerfile, "RUN"))
    exposed = {p for i in _final(dockerfile, "EXPOSE") for p in i.args.split()}
    assert {"8001", "8002"} <= exposed


def test_healthcheck_and_entrypoint_are_valid_commands(dockerfile: list[Instruction]) -> None:
    (check,) = _final(dockerfile, "HEALTHCHECK")
    options, _, cmd = check.args.partition("CMD")
    assert "--interval" in options and "--start-period" in options
    health = exec_form(cmd.strip())
    assert health[0] == "adaptive-inference"
    args = parser().parse_args(health[1:])
    assert args.command == "health" and args.target.endswith(":8001")
    entry = _entrypoint(dockerfile)
    assert entry[0] == "adaptive-inference"
    serve = parser().parse_args(entry[1:])
    assert (serve.command, serve.family, serve.host, serve.port, serve.metrics_port) == \
        ("serve", "/family", "0.0.0.0", 8001, 8002)
    assert _final(dockerfile, "STOPSIGNAL")[0].args == "SIGTERM"


def test_dockerfile_documents_both_ways_to_get_the_family(dockerfile: list[Instruction]) -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"docker run -v \S+:/family", text)  # mounted
    assert "--build-arg FAMILY_CONFIG=" in text  # built at image build time
    assert any(i.keyword == "ARG" and i.args.startswith("FAMILY_CONFIG") for i in dockerfile)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "families"} <= set(ignored)


def test_deployment_probes_resources_and_grace(k8s: dict[str, dict[str, Any]],
                                               dockerfile: list[Instruction]) -> None:
    spec = k8s["Deployment"]["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 8001, probe
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert {p["containerPort"] for p in container["ports"]} == {8001, 8002}
    # args are appended to the image's ENTRYPOINT: together they must parse
    serve = parser().parse_args([*_entrypoint(dockerfile)[1:], *container.get("args", [])])
    assert serve.command == "serve"
    assert spec["terminationGracePeriodSeconds"] > serve.grace_s


def test_headless_service_for_round_robin(k8s: dict[str, dict[str, Any]]) -> None:
    svc = k8s["Service"]["spec"]
    assert svc["clusterIP"] == "None"  # DNS returns every pod: client-side round_robin
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= pod_labels.items()
    assert any(p["port"] == 8001 and p["name"] == "grpc" for p in svc["ports"])


def test_hpa_scales_the_deployment_on_cpu(k8s: dict[str, dict[str, Any]]) -> None:
    hpa = k8s["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", k8s["Deployment"]["metadata"]["name"])
    cpu = [m for m in hpa["spec"]["metrics"]
           if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and 0 < cpu[0]["resource"]["target"]["averageUtilization"] <= 100
    assert hpa["spec"]["minReplicas"] >= 2


def test_readme_covers_dns_round_robin_and_custom_metrics() -> None:
    text = (K8S / "README.md").read_text()
    assert "dns:///" in text and "round_robin" in text
    assert "prometheus-adapter" in text
    rules = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert rules, "the adapter rule example"
    parsed = yaml.safe_load(rules.group(1))
    assert parsed["rules"][0]["seriesQuery"].startswith("adaptive_")
    for cmd in re.findall(r"`(adaptive-inference (?:serve|health)[^`]*)`", text):
        parser().parse_args(shlex.split(cmd)[1:] + (["/family"] if "serve" in cmd else []))
