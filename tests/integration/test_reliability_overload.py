"""Overload, the short version of ``bench/soak.py``: a `serve` process (shedding, the default) with
a bounded queue is offered requests far beyond its capacity for a few seconds. The router refuses
at once what cannot meet its budget (DEADLINE_EXCEEDED when the queue ahead is too long,
RESOURCE_EXHAUSTED when it is full) instead of queueing it, what it admits meets its budget,
health checks keep answering throughout, and afterwards latency returns to its idle level."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import AdaptiveClient
from client.client import build_request
from client.process import SERVING, ServerProcess
from client.synthetic import SHAPE
from protos.generated import grpc_service_pb2_grpc

log = logging.getLogger(__name__)

IMAGES = 8  # samples per request: the slow variant then costs tens of ms, so compute is the limit
BUDGET_MS = 250.0
RATE = 120.0  # requests/s offered: several times what the pinned slow variant serves here
SECONDS = 5.0
REFUSED = ("DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")


@pytest.fixture(scope="module")
def server(serving_family: Path) -> Iterator[str]:
    proc = ServerProcess([str(serving_family), "--port", "0", "--metrics-port", "-1",
                          "--threads", "2", "--on-miss", "shed", "--max-queue", "64"])
    try:
        port = proc.port()
        proc.wait_for(SERVING)
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()


def _latency_ms(c: AdaptiveClient, x: np.ndarray, n: int) -> float:
    """Median round trip of ``n`` sequential requests on the pinned variant."""
    return statistics.median(c.infer(x, variant="slow", budget_ms=5000).latency_ms
                             for _ in range(n))


def _recorder(outcomes: list[tuple[str, float]], started: float) -> Callable[[grpc.Future], None]:
    def done(call: grpc.Future) -> None:  # on a gRPC thread, as the answer arrives
        outcomes.append((call.code().name, (time.perf_counter() - started) * 1e3))
    return done


class Health(threading.Thread):
    """Asks the health service every 100 ms on its own channel; records what came back."""

    def __init__(self, target: str) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.answers: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with AdaptiveClient(self.target) as c:
            while not self.stop.wait(0.1):
                self.answers.append(c.health(timeout=2.0))


def test_overload_is_refused_at_once_health_answers_and_latency_recovers(
        server: str, record: Callable[..., None]) -> None:
    x = np.zeros((IMAGES, *SHAPE), np.float32)
    with AdaptiveClient(server, model="servetest") as c:
        _latency_ms(c, x, 5)  # warm the connection
        idle = _latency_ms(c, x, 15)
    req = build_request("servetest", x, budget_ms=BUDGET_MS, variant="slow")
    outcomes: list[tuple[str, float]] = []  # (code, ms)
    health = Health(server)
    health.start()
    with grpc.insecure_channel(server) as ch:
        infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer
        calls = []
        t0 = time.perf_counter()
        for i in range(int(RATE * SECONDS)):  # open loop: arrivals do not wait for answers
            delay = t0 + i / RATE - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            call = infer.future(req, timeout=10)
            call.add_done_callback(_recorder(outcomes, time.perf_counter()))
            calls.append(call)
        for call in calls:
            call.exception()  # wait for every answer (its outcome is recorded by the callback)
    load_end = time.perf_counter()
    with AdaptiveClient(server, model="servetest") as c:
        recovered_s = None
        while time.perf_counter() - load_end < 15:
            if _latency_ms(c, x, 3) <= 2 * idle + 20:  # generous: a shared, loaded machine
                recovered_s = time.perf_counter() - load_end
                break
    health.stop.set()
    health.join()
    codes = {k: sum(1 for c, _ in outcomes if c == k) for k in {c for c, _ in outcomes}}
    log.warning("overload: %d requests at %.0f/s: %s; health %d/%d SERVING; idle p50 %.1f ms, "
                "recovered in %s s", len(outcomes), RATE, codes,
                health.answers.count("SERVING"), len(health.answers), idle,
                "never" if recovered_s is None else f"{recovered_s:.2f}")
    record("overload", requests=len(outcomes), rate=RATE, seconds=SECONDS,
           ok=codes.get("OK", 0), refused=sum(n for c, n in codes.items() if c != "OK"),
           health_serving=health.answers.count("SERVING"), health=len(health.answers),
           recovered_s=None if recovered_s is None else round(recovered_s, 2))
    assert set(codes) <= {"OK", *REFUSED}, codes
    refused = [ms for c, ms in outcomes if c in REFUSED]
    answered = [ms for c, ms in outcomes if c == "OK"]
    assert answered and len(refused) > len(outcomes) / 4
    # refusals are answered at once, not after waiting in a queue; what was admitted made it
    assert statistics.median(refused) < BUDGET_MS / 10
    assert sum(ms <= BUDGET_MS for ms in answered) >= 0.9 * len(answered)
    assert len(health.answers) >= SECONDS * 5 and set(health.answers) == {"SERVING"}
    assert recovered_s is not None
