"""The private Docker daemon for the container tests, through ``deploy/container/local-docker.sh``
(the same script `make image` uses): start it, build the image, run and inspect containers with
Debian's ``docker`` client, stop it. Every call has a timeout; a script that runs past it is
killed with its whole process group (the wheel index it started included)."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "container" / "local-docker.sh"

log = logging.getLogger(__name__)


class CommandFailed(AssertionError):
    """A docker or script command exited non-zero (its output is in the message)."""


def run(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    """``cmd`` in its own session; on timeout its process group is killed, not just the child."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise CommandFailed(f"{shlex.join(cmd)}: still running after {timeout:g} s\n"
                            f"{out[-4000:]}") from None
    if check and proc.returncode != 0:
        raise CommandFailed(f"{shlex.join(cmd)}: exit {proc.returncode}\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


class LocalDocker:
    """The daemon ``local-docker.sh start`` runs; ``stop`` ends it only if this object started
    it (a daemon someone already had running is left as it was)."""

    def __init__(self) -> None:
        self.env = {**os.environ}
        self.started = False
        line = run([str(SCRIPT), "env"], timeout=10).stdout.strip()
        self.env["DOCKER_HOST"] = line.split("=", 1)[1]
        self.bin = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"

    def start(self) -> None:
        out = run([str(SCRIPT), "start"], timeout=120, env=self.env).stdout
        self.started = out.strip().splitlines()[-1] == "started"

    def stop(self) -> None:
        if self.started:
            run([str(SCRIPT), "stop"], timeout=120, env=self.env)
            self.started = False

    def build(self, tag: str, timeout: float = 1800) -> float:
        """Build the repository's Dockerfile as ``tag``; returns the seconds it took."""
        t0 = time.monotonic()
        out = run([str(SCRIPT), "build", tag], timeout=timeout, env=self.env).stdout
        log.info("docker build tail:\n%s", out[-1500:])
        return time.monotonic() - t0

    def __call__(self, *args: str, timeout: float = 120, check: bool = True
                 ) -> subprocess.CompletedProcess[str]:
        return run([self.bin, *args], timeout=timeout, env=self.env, check=check)

    def inspect(self, name: str, kind: str = "container") -> dict[str, Any]:
        (obj,) = json.loads(self(kind, "inspect", name).stdout)
        return dict(obj)

    def logs(self, name: str) -> str:
        return self("logs", "--tail", "60", name, check=False).stdout

    def wait_healthy(self, name: str, timeout: float) -> None:
        """Until the container's health check reports ``healthy``; a container that exits or
        turns ``unhealthy`` fails at once, with its logs."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.inspect(name)["State"]
            health = (state.get("Health") or {}).get("Status")
            if health == "healthy":
                return
            if state["Status"] != "running" or health == "unhealthy":
                raise AssertionError(f"{name}: {state['Status']}, health {health}, exit "
                                     f"{state.get('ExitCode')}\n{json.dumps(state)[-1500:]}\n"
                                     f"{self.logs(name)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: not healthy after {timeout:g} s (health {health})"
                                     f"\n{self.logs(name)}")
            time.sleep(1)
