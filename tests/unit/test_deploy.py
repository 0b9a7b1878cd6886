"""The deployment files, checked statically (tests/container/ builds and runs the image; no
Kubernetes runs here): the Dockerfile's stages, CPU-only installs, non-root user, ports and
HEALTHCHECK; every manifest under deploy/k8s/ against the real Kubernetes schemas (strict, the
oldest and newest version kubernetes-validate ships); the Deployment's gRPC probes and resources,
the headless Service, the HPA on CPU and on requests in flight, and the Prometheus adapter rules
behind it (their queries name series the server exports; promtool parses them). Commands are
parsed with the real `adaptive-inference` argument parser, so a renamed flag fails here."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_checks import (
    ADAPTER_RULES,
    adapter_rules,
    docker_run_spec,
    exported_series,
    memory_bytes,
    names_in,
    render_metrics_query,
)
from prometheus_client import generate_latest

from client.cli import PORT_ENV, default_port, parser
from server.metrics import Metrics

kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the dev extra)")
from kubernetes_validate.utils import all_versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.iterdir() if p.suffix in (".yaml", ".yml"))
# The oldest and the newest Kubernetes whose schemas kubernetes-validate ships (1.25 and 1.37 in
# its 1.37 release): a field removed or added between them shows up at one end.
VERSIONS = sorted({all_versions()[0], all_versions()[-1]})
PROMTOOL = shutil.which("promtool")


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
    # Both take the port from the image's environment: the check follows the server.
    (env,) = [i for i in _final(dockerfile, "ENV") if PORT_ENV in i.args]
    port = int(re.search(rf"{PORT_ENV}=(\d+)", env.args).group(1))  # type: ignore[union-attr]
    p = parser(default_port({PORT_ENV: str(port)}))
    args = p.parse_args(health[1:])
    assert args.command == "health" and args.target == f"127.0.0.1:{port}"
    entry = _entrypoint(dockerfile)
    assert entry[0] == "adaptive-inference" and "--port" not in entry
    serve = p.parse_args(entry[1:])
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


def test_every_file_under_k8s_is_a_manifest() -> None:
    others = {p.name for p in K8S.iterdir()} - {p.name for p in MANIFESTS} - {"README.md"}
    assert not others, f"not validated (only .yaml/.yml are): {sorted(others)}"
    assert {p.name for p in MANIFESTS} >= {"deployment.yaml", "service.yaml", "hpa.yaml"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_against_the_kubernetes_schema(manifest: Path, version: str) -> None:
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    assert docs, f"{manifest.name}: no documents"
    for doc in docs:
        try:
            checked = kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{manifest.name} ({doc['kind']}) against Kubernetes {version}: "
                        f"{exc.message} at {'.'.join(map(str, exc.path))}")
        assert checked == version.rsplit(".", 1)[0]  # that very schema, not an older fallback


@pytest.mark.parametrize("version", VERSIONS)
def test_strict_validation_rejects_a_misspelled_field_and_a_wrong_type(
        k8s: dict[str, dict[str, Any]], version: str) -> None:
    typo = copy.deepcopy(k8s["Deployment"])
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbes"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError, match="readinessProbes"):
        kv.validate(typo, version, strict=True)
    wrong = copy.deepcopy(k8s["HorizontalPodAutoscaler"])
    wrong["spec"]["minReplicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong, version, strict=True)


def test_hpa_scales_the_deployment_on_cpu(k8s: dict[str, dict[str, Any]]) -> None:
    hpa = k8s["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", k8s["Deployment"]["metadata"]["name"])
    cpu = [m for m in hpa["spec"]["metrics"]
           if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and 0 < cpu[0]["resource"]["target"]["averageUtilization"] <= 100
    assert hpa["spec"]["minReplicas"] >= 2


def _pods_metrics(k8s: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The HPA's per-pod custom metrics: name → target."""
    return {m["pods"]["metric"]["name"]: m["pods"]["target"]
            for m in k8s["HorizontalPodAutoscaler"]["spec"]["metrics"] if m["type"] == "Pods"}


def test_hpa_also_scales_on_requests_in_flight_per_pod(k8s: dict[str, dict[str, Any]]) -> None:
    pods = _pods_metrics(k8s)
    assert "adaptive_inflight_requests" in pods
    target = pods["adaptive_inflight_requests"]
    assert target["type"] == "AverageValue" and float(target["averageValue"]) > 0
    served = {r["name"]["as"] for r in adapter_rules()}
    assert set(pods) <= served, f"HPA metrics no adapter rule provides: {set(pods) - served}"


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_series(generate_latest(Metrics().registry).decode())


def test_adapter_rules_query_series_the_server_exports(exported: set[str]) -> None:
    rules = adapter_rules()
    assert rules
    for rule in rules:
        series = names_in(rule["seriesQuery"])
        assert len(series) == 1 and series <= exported, rule["seriesQuery"]
        assert re.fullmatch(rule["name"]["matches"], next(iter(series))), rule["name"]
        # what the adapter sends Prometheus: only exported series, grouped per pod
        query = render_metrics_query(rule)
        assert "<<" not in query and names_in(query) == series, query
        assert re.search(r"by \(pod\)", query), query
        # the adapter maps the namespace and pod labels to the objects the HPA averages over
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                                  "pod": {"resource": "pod"}}


def test_adapter_rules_reject_a_series_the_server_does_not_export(exported: set[str]) -> None:
    rule = {**adapter_rules()[0], "seriesQuery": 'adaptive_inflight_request{pod!=""}'}
    assert not names_in(render_metrics_query(rule)) <= exported


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (Debian package `prometheus`; "
                                             ".ci/run installs it)")
def test_promtool_parses_the_adapter_queries(tmp_path: Path) -> None:
    """Each rendered metricsQuery as a recording rule: `promtool check rules` parses the PromQL."""
    assert PROMTOOL is not None
    rules = [{"record": f"adapter:{r['name']['as']}", "expr": render_metrics_query(r)}
             for r in adapter_rules()]
    path = tmp_path / "adapter.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    proc = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and f"SUCCESS: {len(rules)} rules found" in proc.stdout, \
        proc.stdout + proc.stderr


def test_deployment_maps_to_hardened_docker_run_flags(k8s: dict[str, dict[str, Any]],
                                                      dockerfile: list[Instruction]) -> None:
    """What tests/container runs the image with: every pod setting has its docker flag."""
    spec = docker_run_spec(k8s["Deployment"], mounts={"family": Path("/srv/family")})
    flags = " ".join(spec.flags)
    for expected in ("--user 10001:10001", "--read-only", "--security-opt no-new-privileges",
                     "--cap-drop ALL", "--cpus 2", f"--memory {2 * 2**30}",
                     f"--tmpfs /tmp:rw,size={64 * 2**20}", "-v /srv/family:/family:ro"):
        assert expected in flags, (expected, flags)
    assert spec.user == _final(dockerfile, "USER")[-1].args
    assert spec.args == k8s["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert spec.grace_s == 30
    assert memory_bytes("512Mi") == 512 * 2**20 and memory_bytes("1G") == 10**9
    privileged = copy.deepcopy(k8s["Deployment"])
    privileged["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    with pytest.raises(AssertionError, match="privileged"):
        docker_run_spec(privileged, mounts={"family": Path("/srv/family")})


def test_readme_covers_dns_round_robin_and_custom_metrics() -> None:
    text = (K8S / "README.md").read_text()
    assert "dns:///" in text and "round_robin" in text
    assert "prometheus-adapter" in text
    assert str(ADAPTER_RULES.relative_to(ROOT)) in text  # points at the checked rule file
    assert "adaptive_inflight_requests" in text
    for cmd in re.findall(r"`(adaptive-inference (?:serve|health)[^`]*)`", text):
        parser().parse_args(shlex.split(cmd)[1:] + (["/family"] if "serve" in cmd else []))
