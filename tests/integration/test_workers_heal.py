"""`serve --workers N` as a real process: a worker killed with SIGKILL under load is restarted by
the parent (``adaptive_workers`` back to N, ``adaptive_worker_restarts_total`` 1) and every request
sent once it is back succeeds; a second ``--workers`` server (or any other listener) on the same
port is refused with exit status 2 and one line. The back-off and exit reasons are pure
functions, checked first."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import AdaptiveClient, AdaptiveError
from client.process import METRICS, SERVING, WORKERS, ServerProcess
from client.synthetic import SHAPE
from server.workers import MAX_BACKOFF_S, PORT_IN_USE, backoff_s, exit_reason

log = logging.getLogger(__name__)

CLI = [sys.executable, "-m", "client.cli"]
DRIVERS = 4  # client threads, each with its own channel (so its own connection)


def test_backoff_starts_at_once_doubles_and_is_capped() -> None:
    assert [backoff_s(n) for n in range(1, 6)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert backoff_s(40) == MAX_BACKOFF_S


def test_exit_reasons_name_the_signal_or_status() -> None:
    killed = subprocess.Popen(["sleep", "30"])
    killed.kill()
    _, status = os.waitpid(killed.pid, 0)
    assert exit_reason(status) == "killed by SIGKILL"
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    _, status = os.waitpid(failed.pid, 0)
    assert exit_reason(status) == "exit status 3"


def _worker_metrics(mport: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name in ("adaptive_workers", "adaptive_workers_configured",
                          "adaptive_worker_restarts_total")}


def test_a_killed_worker_is_restarted_and_serves_again(serving_family: Path,
                                                       record: Callable[..., None]) -> None:
    proc = ServerProcess([str(serving_family), "--port", "0", "--metrics-port", "0",
                          "--workers", "2", "--threads", "2"])
    try:
        port = proc.port(WORKERS)
        mport = proc.port(METRICS)
        proc.wait_for(SERVING, count=2)
        workers = [c.pid for c in psutil.Process(proc.proc.pid).children()]
        assert len(workers) == 2
        # A worker logs SERVING a moment before the parent reads its "ready" from the pipe.
        deadline = time.monotonic() + 10
        while _worker_metrics(mport)["adaptive_workers"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the parent's gauge; there is nothing to wait on
        assert _worker_metrics(mport) == {"adaptive_workers": 2.0,
                                          "adaptive_workers_configured": 2.0,
                                          "adaptive_worker_restarts_total": 0.0}

        # Load from several channels while a worker is killed: (sent at, status) per call.
        x = np.zeros((1, *SHAPE), np.float32)
        calls: list[tuple[float, str]] = []
        stop = threading.Event()

        def drive() -> None:
            with AdaptiveClient(f"127.0.0.1:{port}", model="servetest",
                                options=[("grpc.use_local_subchannel_pool", 1)]) as c:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        c.infer(x, variant="fast", timeout=10)
                        calls.append((sent, "OK"))
                    except AdaptiveError as exc:
                        calls.append((sent, exc.code))

        drivers = [threading.Thread(target=drive) for _ in range(DRIVERS)]
        for d in drivers:
            d.start()
        try:
            end = time.monotonic() + 30
            while sum(1 for _, code in calls if code == "OK") < 20:  # the load is flowing
                assert time.monotonic() < end, Counter(code for _, code in calls)
                time.sleep(0.01)  # polling the drivers' record; nothing to wait on
            victim = workers[0]
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            end = time.monotonic() + 120  # generous on a shared machine; the time is measured
            while ((m := _worker_metrics(mport))["adaptive_workers"] < 2
                   or m["adaptive_worker_restarts_total"] < 1):  # noticed, restarted, SERVING
                assert proc.proc.poll() is None, "the parent exited"
                assert time.monotonic() < end, m
                time.sleep(0.05)  # polling the parent's /metrics, as Prometheus would
            back = time.monotonic()
            assert m == {"adaptive_workers": 2.0, "adaptive_workers_configured": 2.0,
                         "adaptive_worker_restarts_total": 1.0}
            # Fresh connections after the restart, so the kernel spreads them over both workers.
            for _ in range(8):
                with AdaptiveClient(f"127.0.0.1:{port}", model="servetest",
                                    options=[("grpc.use_local_subchannel_pool", 1)]) as c:
                    for _ in range(3):
                        assert c.infer(x, variant="fast", timeout=10).variant == "fast"
            time.sleep(0.5)  # the drivers keep sending for a while after the worker is back
        finally:
            stop.set()
            for d in drivers:
                d.join()
        now = [c.pid for c in psutil.Process(proc.proc.pid).children()]
        after_back = Counter(code for sent, code in calls if sent >= back)
        during = Counter(code for sent, code in calls if killed <= sent < back)
        log.warning("worker restart: SIGKILL to SERVING again (the parent's /metrics) %.2f s; "
                    "calls while it was down %s, after %s", back - killed, dict(during),
                    dict(after_back))
        record("workers-heal", back_s=round(back - killed, 2),
               during=", ".join(f"{c} {n}" for c, n in sorted(during.items())) or "none",
               after=", ".join(f"{c} {n}" for c, n in sorted(after_back.items())))
        assert victim not in now and len(now) == 2 and workers[1] in now
        assert after_back["OK"] > 0 and set(after_back) == {"OK"}, after_back
        exit_line = proc.wait_for(rf"\(pid {victim}\) killed by SIGKILL", timeout=10)[0].string
        assert "restarting it now" in exit_line, exit_line  # the first restart: no back-off
        proc.wait_for(rf"is serving again, [\d.]+ s after pid {victim} exited", timeout=10)
        assert proc.stop() == 0
    finally:
        proc.stop()


def test_a_second_workers_server_on_the_port_is_refused(serving_family: Path) -> None:
    first = ServerProcess([str(serving_family), "--port", "0", "--metrics-port", "-1",
                           "--workers", "2", "--threads", "2"])
    try:
        port = first.port(WORKERS)
        first.wait_for(SERVING, count=2)
        second = subprocess.run([*CLI, "serve", str(serving_family), "--port", str(port),
                                 "--metrics-port", "-1", "--workers", "2"],
                                capture_output=True, text=True, timeout=120)
        refusals = [line for line in second.stderr.splitlines() if "already served" in line]
        assert second.returncode == PORT_IN_USE, second.stderr
        assert len(refusals) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"port {port} " in refusals[0] and f"(pid {first.proc.pid})" in refusals[0]
        # One process (no SO_REUSEPORT) is refused as before, by the bind itself.
        single = subprocess.run([*CLI, "serve", str(serving_family), "--port", str(port),
                                 "--metrics-port", "-1"], capture_output=True, text=True,
                                timeout=120)
        assert single.returncode == 1 and "cannot listen on" in single.stderr, single.stderr
        # Every request still reaches the first server, which is unaffected.
        x = np.zeros((1, *SHAPE), np.float32)
        for _ in range(4):
            with AdaptiveClient(f"127.0.0.1:{port}", model="servetest",
                                options=[("grpc.use_local_subchannel_pool", 1)]) as c:
                assert c.infer(x, variant="fast", timeout=10).variant == "fast"
        assert first.stop() == 0
    finally:
        first.stop()


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "SO_REUSEPORT"])
def test_workers_refuse_a_port_another_program_listens_on(serving_family: Path,
                                                          reuse_port: bool) -> None:
    with socket.socket() as other:
        # With SO_REUSEPORT the kernel would let the workers join this socket's group silently.
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1 if reuse_port else 0)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        proc = subprocess.run([*CLI, "serve", str(serving_family), "--port", str(port),
                               "--metrics-port", "-1", "--workers", "2"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == PORT_IN_USE, proc.stderr
    assert f"port {port} on 127.0.0.1 is already in use by another process" in proc.stderr
    assert "Traceback" not in proc.stderr
