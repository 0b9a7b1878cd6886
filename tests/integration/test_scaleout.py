"""Local scale-out: two `serve` processes on loopback behind one `AdaptiveClient` with client-side
``round_robin`` (what a headless Kubernetes Service gives through ``dns:///``). Requests are spread
over both (each server's own request counter says so), and when one is stopped mid-stream every
request still succeeds: the draining replica's UNAVAILABLE refusals are retried on the other."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from client import AdaptiveClient, AdaptiveError
from client.process import METRICS, SERVING, ServerProcess
from client.synthetic import SHAPE
from tests.harness import scraped_total

log = logging.getLogger(__name__)


def _answered(metrics_port: int) -> float:
    """This server's count of requests it answered OK."""
    return scraped_total(metrics_port, "adaptive_requests_total", status="OK")


def test_round_robin_spreads_over_two_servers_and_survives_losing_one(
        serving_family: Path, record: Callable[..., None]) -> None:
    args = [str(serving_family), "--port", "0", "--metrics-port", "0", "--threads", "1"]
    a, b = ServerProcess(args), ServerProcess(args)
    try:
        ports = [a.port(), b.port()]
        mports = [a.port(METRICS), b.port(METRICS)]
        a.wait_for(SERVING)
        b.wait_for(SERVING)
        target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
        x = np.zeros((1, *SHAPE), np.float32)
        with AdaptiveClient(target, model="servetest", load_balancing="round_robin") as c:
            c.wait_ready(30)
            for _ in range(40):
                c.infer(x, variant="fast", timeout=10)
            spread = [_answered(m) for m in mports]
            assert sum(spread) == 40 and min(spread) >= 10, spread

            # Keep requests flowing while server a drains and exits.
            failures: list[str] = []
            answered = 0
            stop = threading.Event()

            def drive() -> None:
                nonlocal answered
                while not stop.is_set():
                    try:
                        c.infer(x, variant="fast", timeout=10)
                        answered += 1
                    except AdaptiveError as exc:
                        failures.append(f"{exc.code}: {exc}")

            driver = threading.Thread(target=drive)
            driver.start()
            try:
                assert a.stop() == 0  # SIGTERM: graceful
            finally:
                before = _answered(mports[1])
                for _ in range(20):  # and a while after it is gone
                    c.infer(x, variant="fast", timeout=10)
                stop.set()
                driver.join()
            after = _answered(mports[1])
        log.warning("scale-out: first 40 requests split %s; %d more while one server stopped, "
                    "%d failed", spread, answered + 20, len(failures))
        record("scaleout", spread=" / ".join(f"{n:.0f}" for n in spread), sent=answered + 20,
               failed=len(failures))
        assert failures == []
        assert answered > 0
        assert after - before >= 20  # the survivor answers everything now
    finally:
        a.stop()
        b.stop()
