"""``--grpc-io``: which threads of a process read its sockets (`server.grpc_io`), a server's
(``serve``) and a load generator's (``bench``).

With ``poller`` (the default) gRPC's asyncio poller thread reads them itself and gRPC's
``event_engine`` thread pool stays idle while calls go through; with ``event-engine`` (gRPC's
own default) that pool reads every connection. Seen from outside, through the context switches
Linux counts per thread. (What it saves is measured by `bench/ceiling.py` and `bench/overhead.py`.)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from client import AdaptiveClient
from client.process import SERVING, ServerProcess
from client.synthetic import SHAPE
from server import grpc_io
from tests.harness import RunningServer

CALLS = 300

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads the server's threads from /proc")


def _pool_switches(pid: int) -> int:
    """Context switches so far of the process's gRPC EventEngine pool threads."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().strip() != "event_engine":
                continue
            status = (task / "status").read_text().splitlines()
        except FileNotFoundError:  # a pool thread that exited meanwhile
            continue
        total += sum(int(line.split()[1]) for line in status
                     if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
    return total


@pytest.mark.parametrize("flags, pool_reads", [([], False),
                                               (["--grpc-io", "event-engine"], True)],
                         ids=["default", "event-engine"])
def test_the_default_reads_sockets_on_the_poller_thread_not_the_event_engine_pool(
        serving_family: Path, flags: list[str], pool_reads: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The test session's own setting (tests/conftest.py) must not reach the server: `serve`
    # has to make it.
    monkeypatch.delenv(grpc_io.ENV, raising=False)
    proc = ServerProcess([str(serving_family), "--port", "0", "--metrics-port", "-1",
                          "--threads", "1", *flags])
    try:
        target = f"127.0.0.1:{proc.port()}"
        proc.wait_for(SERVING)
        x = np.zeros((1, *SHAPE), np.float32)
        with AdaptiveClient(target) as client:
            client.infer(x)  # connected before counting
            before = _pool_switches(proc.proc.pid)
            for _ in range(CALLS):
                client.infer(x)
            per_call = (_pool_switches(proc.proc.pid) - before) / CALLS
    finally:
        proc.proc.terminate()
        proc.proc.wait(timeout=30)
    # Read by the pool, each call switches its threads about 4 times (measured); read by the
    # poller thread, they wake only for gRPC's timers (the call's deadline): about 0.25.
    if pool_reads:
        assert per_call > 2.0, f"{per_call:.2f} pool thread switches per call"
    else:
        assert per_call < 1.0, f"{per_call:.2f} pool thread switches per call"


@pytest.mark.parametrize("flags, pool_reads", [([], False),
                                               (["--grpc-io", "event-engine"], True)],
                         ids=["default", "event-engine"])
def test_the_load_generator_reads_its_connections_on_the_poller_thread_by_default(
        server: RunningServer, serving_family: Path, flags: list[str], pool_reads: bool,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`adaptive-inference bench` makes the same choice for its channels as `serve` for its
    listener; its pool's switches are counted per request the server answered meanwhile."""
    monkeypatch.delenv(grpc_io.ENV, raising=False)  # `bench` has to make the setting itself
    bench = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "bench", "--target", server.target, "--rate", "200",
         "--duration", "8", "--family", str(serving_family), "--data", "random", "--no-plots",
         "--out", str(tmp_path), "-q", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        start, deadline = server.handled(), time.monotonic() + 60
        while server.handled() < start + 50:  # sending: started up and connected
            assert bench.poll() is None and time.monotonic() < deadline, "bench never sent"
            time.sleep(0.1)
        before, n0 = _pool_switches(bench.pid), server.handled()
        time.sleep(2.0)
        per_request = (_pool_switches(bench.pid) - before) / max(server.handled() - n0, 1)
    finally:
        bench.kill()
        bench.wait(timeout=30)
    # Measured: about 4 switches per request read by the pool, 0.4 by the poller thread.
    if pool_reads:
        assert per_request > 2.0, f"{per_request:.2f} pool thread switches per request"
    else:
        assert per_request < 1.0, f"{per_request:.2f} pool thread switches per request"
