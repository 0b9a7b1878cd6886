"""The /metrics endpoint is not a way in: half-open connections hold no threads and starve no
inference (a real server in this process, and ``serve --workers 2`` as a process), requests that
never end are cut off, connections beyond the cap evict the oldest half-open one, only
``GET /metrics`` is answered, a flood of scrapes shares builds, and a forked child keeps none of
the endpoint's sockets."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from client import AdaptiveClient
from client.process import METRICS, SERVING, WORKERS, ServerProcess
from server.metrics_http import MAX_CONNECTIONS, MetricsHTTPServer
from server.settings import ServeOptions
from tests.harness import RunningServer, serve_in_thread

HEAD = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # never the blank line that ends it


def _wait_until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``cond`` (a wait for an event we cannot subscribe to, not a timing assertion)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def _half_open(port: int, n: int, host: str = "127.0.0.1") -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(HEAD)
        socks.append(s)
    return socks


def _ok_requests(text: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "adaptive_requests_total" and s.labels.get("status") == "OK")


def _infer_all(target: str, images: np.ndarray, n: int, during: Callable[[], None]) -> list[str]:
    """``n`` requests from 4 clients while ``during`` runs; the variants that answered."""
    def one(_i: int) -> str:
        with AdaptiveClient(target) as c:
            return c.infer(images[:1], timeout=30).variant

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        during()
        return [f.result() for f in futures]  # any failure raises here


def test_half_open_connections_hold_no_threads_and_starve_no_inference(
        server: RunningServer, images: np.ndarray, record: Callable[..., None]) -> None:
    mh = server.server.metrics_http
    threads_before = threading.active_count()
    socks = _half_open(server.server.metrics_port, 500)
    try:
        _wait_until(lambda: mh.connections + mh.evicted + mh.timed_out >= 500,
                    "the endpoint accepted all 500 connections")
        # The old endpoint held a thread per connection: 500 more here.
        threads_held = threading.active_count()
        assert threads_held <= threads_before + 4
        assert mh.connections <= MAX_CONNECTIONS

        def scrape_then_close() -> None:
            text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
            assert "adaptive_requests_total" in text  # a fresh scraper still gets through
            for s in socks:  # all at once, while requests run
                s.close()

        answered = _infer_all(server.target, images, 80, scrape_then_close)
        record("metrics-endpoint", half_open=len(socks), threads_before=threads_before,
               threads_held=threads_held, answered=len(answered))
        assert len(answered) == 80
    finally:
        for s in socks:
            s.close()
    assert threading.active_count() <= threads_before + 4


def test_workers_parent_stays_bounded_and_serves_the_aggregate(serving_family: Path,
                                                               images: np.ndarray) -> None:
    """``serve --workers 2 --metrics-host ::1``: the parent serves the multiprocess aggregate on
    the address asked for, and half-open connections do not add threads to it."""
    p = ServerProcess([str(serving_family), "--port", "0", "--metrics-port", "0",
                       "--metrics-host", "::1", "--workers", "2", "--threads", "2"])
    try:
        port = p.port(WORKERS)
        mport = p.port(METRICS)
        p.wait_for(SERVING, count=2)
        url = f"http://[::1]:{mport}/metrics"
        # --metrics-host: listening on that address only. (Not "connecting to 127.0.0.1 fails":
        # IPv4 and IPv6 ports are separate, and another server may hold that number on IPv4.)
        listening = {c.laddr.ip for c in psutil.Process(p.proc.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == mport}
        assert listening == {"::1"}, listening

        def threads() -> int:
            status = Path(f"/proc/{p.proc.pid}/status").read_text()
            return int(next(line.split()[1] for line in status.splitlines()
                            if line.startswith("Threads:")))

        before = threads()
        socks = _half_open(mport, 300, host="::1")
        try:
            with AdaptiveClient(f"127.0.0.1:{port}") as c:
                for _ in range(10):
                    c.infer(images[:1], timeout=30)
            assert threads() <= before + 2
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            assert _ok_requests(text) == 10  # both workers' counts, one endpoint
        finally:
            for s in socks:
                s.close()
        assert p.stop() == 0
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()


@pytest.fixture(scope="module")
def server(serving_family: Path) -> Iterator[RunningServer]:
    """A server of this module's own (overrides the shared one): the attacks here stall the host,
    and the stalls would stay in the shared server's latency model and margins for the tests
    that check which variant a budget buys."""
    with serve_in_thread(serving_family, options=ServeOptions(threads=2)) as running:
        yield running


@pytest.fixture
def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("probe_total", "A counter to find in the exposition.", registry=r).inc()
    return r


@pytest.fixture
def endpoint(registry: CollectorRegistry) -> Iterator[MetricsHTTPServer]:
    srv = MetricsHTTPServer(registry, "127.0.0.1", 0, read_timeout_s=0.5)
    srv.start()
    yield srv
    srv.stop()


def _raw(port: int, data: bytes) -> bytes:
    """Send ``data``, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_only_get_metrics_is_answered(endpoint: MetricsHTTPServer) -> None:
    base = f"http://127.0.0.1:{endpoint.port}"
    with urllib.request.urlopen(base + "/metrics?name[]=x", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        assert b"probe_total 1.0" in r.read()
    with urllib.request.urlopen(urllib.request.Request(
            base + "/metrics", headers={"Accept": "application/openmetrics-text"}),
            timeout=10) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text")
        assert r.read().endswith(b"# EOF\n")
    with urllib.request.urlopen(urllib.request.Request(base + "/metrics", method="HEAD"),
                                timeout=10) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) > 0 and r.read() == b""
    for path, method, code in (("/", "GET", 404), ("/metrics/x", "GET", 404),
                               ("/metrics", "POST", 405), ("/metrics", "DELETE", 405)):
        req = urllib.request.Request(base + path, method=method,
                                     data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == code, (path, method)
        if code == 405:
            assert err.value.headers["Allow"] == "GET, HEAD"
    assert _raw(endpoint.port, b"\x16\x03\x01 not http\r\n\r\n").startswith(
        b"HTTP/1.1 400 ")
    big = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * 20_000 + b"\r\n\r\n"
    assert _raw(endpoint.port, big).startswith(b"HTTP/1.1 431 ")


def test_a_request_that_never_ends_is_closed_after_the_read_timeout(
        endpoint: MetricsHTTPServer) -> None:
    with socket.create_connection(("127.0.0.1", endpoint.port), timeout=10) as s:
        s.sendall(HEAD)
        assert s.recv(100) == b""  # closed by the server (0.5 s), not by our 10 s timeout
    assert endpoint.timed_out == 1


def test_connections_beyond_the_cap_evict_the_oldest_half_open_one(
        registry: CollectorRegistry) -> None:
    srv = MetricsHTTPServer(registry, "127.0.0.1", 0, max_connections=4, read_timeout_s=30)
    srv.start()
    try:
        socks = _half_open(srv.port, 10)
        # (the eviction is counted before the newcomer takes the slot: wait for both)
        _wait_until(lambda: srv.evicted == 6 and srv.connections == 4,
                    "6 evictions, 4 connections kept")
        assert socks[0].recv(10) == b""  # the oldest were closed at once
        text = urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=10).read()
        assert b"probe_total" in text
        assert srv.evicted == 7  # the fresh scraper took the oldest remaining slot
        for s in socks:
            s.close()
    finally:
        srv.stop()


class _Huge:
    """A collector whose exposition (32 MiB) outgrows the socket buffers of a peer not reading."""

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("huge", "Padding.", labels=["pad"])
        g.add_metric(["x" * (32 << 20)], 1.0)
        yield g


def test_when_every_slot_is_answering_a_new_connection_is_closed_at_once() -> None:
    registry = CollectorRegistry()
    registry.register(_Huge())
    srv = MetricsHTTPServer(registry, "127.0.0.1", 0, max_connections=2, write_timeout_s=60,
                            max_busy_share=1.0)
    srv.start()
    readers = []
    try:
        for _ in range(2):  # ask, then never read: both slots stay busy writing
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(HEAD + b"\r\n")
            readers.append(s)
            n = len(readers)
            _wait_until(lambda: srv.served == n, "the response started")  # noqa: B023
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as late:
            assert late.recv(10) == b""  # closed by the server at once, before any request
        assert srv.refused == 1 and srv.connections == 2
    finally:
        for s in readers:
            s.close()
        srv.stop()


class _Slow:
    """A collector that takes 50 ms and reports how many times it was collected."""

    def __init__(self) -> None:
        self.builds = 0

    def collect(self) -> Iterator[Metric]:
        self.builds += 1
        time.sleep(0.05)
        yield GaugeMetricFamily("builds", "Expositions built so far.", value=self.builds)


def test_a_flood_of_scrapes_waits_for_one_fresh_build() -> None:
    """With at most 2% of the time spent building, the 10 scrapes that arrive after one build
    wait (≥ 2.45 s) and share the next: one build, and what it says is new, not the old bytes."""
    slow = _Slow()
    registry = CollectorRegistry()
    registry.register(slow)
    srv = MetricsHTTPServer(registry, "127.0.0.1", 0, max_busy_share=0.02)
    srv.start()
    url = f"http://127.0.0.1:{srv.port}/metrics"
    try:
        assert b"builds 1.0" in urllib.request.urlopen(url, timeout=10).read()
        with ThreadPoolExecutor(10) as pool:
            bodies = list(pool.map(lambda _: urllib.request.urlopen(url, timeout=30).read(),
                                   range(10)))
        assert all(b"builds 2.0" in b for b in bodies)
        assert slow.builds == 2
    finally:
        srv.stop()


FORK_CHECK = """
import os, socket, sys, time
from prometheus_client import CollectorRegistry
from server.metrics_http import MetricsHTTPServer
srv = MetricsHTTPServer(CollectorRegistry(), "127.0.0.1", 0)
srv.start()
peer = socket.create_connection(("127.0.0.1", srv.port))
peer.sendall(b"GET /")
while srv.connections < 1:
    time.sleep(0.01)
fds = [srv._listener.fileno(), srv._wake_r.fileno(), srv._wake_w.fileno(), srv._sel.fileno(),
       *(c.sock.fileno() for c in srv._conns)]
pid = os.fork()
if pid == 0:
    held = 0
    for fd in fds:
        try:
            os.fstat(fd)
            held += 1
        except OSError:
            pass
    os._exit(held)
held = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
srv.stop()
print(f"{held} of {len(fds)}")
"""


def test_a_forked_child_keeps_none_of_the_endpoint_sockets() -> None:
    """``--workers`` forks replacement workers after the endpoint started: a child that kept
    the listener or a connection would hold the port, or a scraper's connection, open."""
    out = subprocess.run([sys.executable, "-c", FORK_CHECK], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0 of 5"
