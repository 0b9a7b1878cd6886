"""The serving image, built from the repository's Dockerfile and run as the Deployment runs it.

Two replicas with the pod's security settings and limits (parsed from deploy/k8s/deployment.yaml:
non-root user, read-only root, tmpfs /tmp, no capabilities, no-new-privileges, CPU and memory
limits, the family mounted read-only, the Deployment's args) on host networking, each on its own
127.0.0.1 port. The test waits on the image's own HEALTHCHECK, spreads one client over both with
gRPC round_robin, then `docker stop`s one under load: every request must succeed (the draining
replica refuses with UNAVAILABLE, which the client retries on the other).

The image's HEALTHCHECK probes 127.0.0.1:8001. With host networking two replicas cannot both
listen there, so each keeps the image's command and timings with only the port in its --target
changed to the replica's own (`docker run --health-cmd`; the other health options are inherited).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from deploy_checks import K8S, cpu_cores, docker_run_spec

from client import AdaptiveClient, AdaptiveError
from client.cli import PORT_ENV
from client.synthetic import SHAPE, serving_family_at
from tests.container.localdocker import LocalDocker
from tests.harness import scraped_total

pytestmark = [pytest.mark.container, pytest.mark.timeout(2400)]

def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _answered(metrics_port: int) -> float:
    """A replica's own count of requests it answered OK."""
    return scraped_total(metrics_port, "adaptive_requests_total", status="OK")


def _until(what: str, ok: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.2)


@pytest.fixture
def family(tmp_path: Path) -> Path:
    """The synthetic serving family, readable by the image's user (tmp dirs are 0700)."""
    root = serving_family_at(tmp_path / "family")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def test_two_hardened_replicas_balance_and_survive_a_docker_stop_under_load(
        local_docker: LocalDocker, image: str, family: Path, record: Callable[..., None]
) -> None:
    docker = local_docker
    deployment = next(d for d in yaml.safe_load_all((K8S / "deployment.yaml").read_text())
                      if d and d["kind"] == "Deployment")
    spec = docker_run_spec(deployment, mounts={"family": family})
    config = docker.inspect(image, "image")["Config"]
    assert config["User"] == spec.user, "the image's user is not the Deployment's runAsUser"
    assert config["Healthcheck"]["Test"][0] == "CMD", config["Healthcheck"]

    ports = _free_ports(4)
    grpc_ports, metrics_ports = ports[:2], ports[2:]
    names = [f"adaptive-test-{os.getpid()}-{i}" for i in range(2)]
    try:
        for name, port, mport in zip(names, grpc_ports, metrics_ports, strict=True):
            # The port through the image's own setting: its unchanged health check follows.
            docker("run", "-d", "--name", name, "--network", "host", *spec.flags,
                   "--stop-timeout", str(spec.grace_s), "-e", f"{PORT_ENV}={port}",
                   image, *spec.args, "--host", "127.0.0.1", "--metrics-port", str(mport))
        for name in names:
            docker.wait_healthy(name, timeout=300)
        # The Deployment's limits.cpu reaches the server as a cgroup quota, which it sizes by.
        limit = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        started = docker("logs", names[0]).stdout
        assert f"cgroup quota {cpu_cores(limit['cpu']):g} CPUs" in started, started[-2000:]

        # The settings hold inside: the image's user, a read-only root, a writable tmpfs /tmp,
        # and no torch in the serving venv.
        probe = ("id -u; touch /opt/x 2>/dev/null && echo root-writable; touch /tmp/x && "
                 "echo tmp-writable; python -c 'import importlib.util as u; "
                 "print(\"torch\" if u.find_spec(\"torch\") else \"no-torch\")'")
        seen = docker("exec", names[1], "sh", "-c", probe).stdout.split()
        assert seen == [spec.user.split(":")[0], "tmp-writable", "no-torch"], seen

        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in grpc_ports)
        x = np.zeros((1, *SHAPE), np.float32)
        failures: list[str] = []
        answered = [0]
        stop = threading.Event()

        with AdaptiveClient(target, model="servetest", load_balancing="round_robin") as client:
            client.wait_ready(30)

            def drive() -> None:
                while not stop.is_set():
                    try:
                        client.infer(x, variant="fast", timeout=10)
                        answered[0] += 1
                    except AdaptiveError as exc:
                        failures.append(f"{exc.code}: {exc}")

            drivers = [threading.Thread(target=drive) for _ in range(3)]
            for d in drivers:
                d.start()
            try:
                _until("both replicas answering",
                       lambda: min(_answered(m) for m in metrics_ports) >= 50)
                spread = [_answered(m) for m in metrics_ports]
                docker("stop", "-t", str(spec.grace_s), names[0], timeout=spec.grace_s + 30)
                stopped = docker.inspect(names[0])["State"]
                before = _answered(metrics_ports[1])
                _until("the survivor answering", lambda: _answered(metrics_ports[1]) >= before + 200)
            finally:
                stop.set()
                for d in drivers:
                    d.join()
        print(f"\nrequests before the stop {spread}, {answered[0]} answered in all, "
              f"{len(failures)} failed")
        record("container", spread=" / ".join(f"{n:.0f}" for n in spread), answered=answered[0],
               failed=len(failures))
        assert failures == [], failures[:5]
        assert stopped["Status"] == "exited" and stopped["ExitCode"] == 0, stopped  # drained
        assert not stopped["OOMKilled"]
    finally:
        for name in names:
            if docker("inspect", name, check=False).returncode == 0:
                print(f"--- {name} log tail ---\n{docker.logs(name)}")
            docker("rm", "-f", name, check=False)
