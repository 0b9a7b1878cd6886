"""Graceful shutdown of a real `adaptive-inference serve` process: with requests in flight,
SIGTERM (or SIGHUP, which used to kill the process at once) turns health NOT_SERVING and refuses
new requests with UNAVAILABLE at once, while every request that was in flight when the signal
came finishes successfully; then the process exits 0."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from client import AdaptiveClient, InferResult
from client.client import build_request
from client.process import METRICS, SERVING, ServerProcess
from client.synthetic import SHAPE
from protos.generated import grpc_service_pb2_grpc
from server.metrics import BUDGET_BUCKETS

log = logging.getLogger(__name__)

IN_FLIGHT = 8
IMAGES = 32  # one full batch each: the pinned slow variant runs them one after another


@contextlib.contextmanager
def _serving(family: Path) -> Iterator[tuple[ServerProcess, str, int]]:
    """`serve` with a 30 s grace, SERVING: (the process, its target, its metrics port); stopped
    on exit if the test has not ended it."""
    proc = ServerProcess([str(family), "--port", "0", "--metrics-port", "0", "--threads", "2",
                          "--grace-s", "30"])
    try:
        port = proc.port()
        mport = proc.port(METRICS)
        proc.wait_for(SERVING)
        yield proc, f"127.0.0.1:{port}", mport
    finally:
        proc.stop()


def _samples(metrics_port: int) -> list[Sample]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=5).read().decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def _arrived(metrics_port: int) -> tuple[float, float]:
    """(requests in flight, requests answered) from the server's /metrics."""
    samples = _samples(metrics_port)
    inflight = next(s.value for s in samples if s.name == "adaptive_inflight_requests")
    answered = sum(s.value for s in samples if s.name == "adaptive_requests_total")
    return inflight, answered


def _long_budgets(metrics_port: int) -> float:
    """Requests that reached the engine with a budget above the budget histogram's top bound
    (`BUDGET_BUCKETS`' last; counted on arrival)."""
    buckets = {s.labels["le"]: s.value for s in _samples(metrics_port)
               if s.name == "adaptive_latency_budget_seconds_bucket"}
    return buckets["+Inf"] - buckets[str(BUDGET_BUCKETS[-1])]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_drains_in_flight_requests_and_refuses_new_ones(
        serving_family: Path, sig: signal.Signals, record: Callable[..., None]) -> None:
    with _serving(serving_family) as (proc, target, mport):
        x = np.zeros((IMAGES, *SHAPE), np.float32)
        with AdaptiveClient(target, model="servetest") as c, \
                ThreadPoolExecutor(IN_FLIGHT) as pool:
            calls: list[Future[tuple[InferResult, float]]] = [
                pool.submit(lambda: (c.infer(x, variant="slow", timeout=60), time.monotonic()))
                for _ in range(IN_FLIGHT)]
            stop = time.monotonic() + 30
            # Every call has reached the server (in flight, or the first already answered: the
            # gauge is sampled, and a scrape may come after the first batch finished).
            while sum(_arrived(mport)) < IN_FLIGHT:
                assert time.monotonic() < stop, "the calls never all reached the server"
                time.sleep(0.01)  # polling the server's gauges; there is nothing to wait on
            signalled = time.monotonic()
            proc.proc.send_signal(sig)

            # While in-flight requests finish: health says NOT_SERVING, new requests are refused.
            with grpc.insecure_channel(target) as ch:  # no retry policy: see the first answer
                stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
                deadline = time.monotonic() + 10
                while (health := c.health(timeout=2)) == "SERVING":
                    assert time.monotonic() < deadline
                    time.sleep(0.01)  # the signal is delivered asynchronously
                assert health == "NOT_SERVING"
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ModelInfer(build_request("servetest", x[:1]), timeout=10)
                assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in refused.value.details()

            results = [f.result(timeout=60) for f in calls]  # raises if any in-flight call failed
        failed = IN_FLIGHT - sum(1 for r, _ in results if r.variant == "slow")
        finished_after = sum(1 for _, t in results if t > signalled)
        assert proc.proc.wait(timeout=30) == 0
        exited = time.monotonic() - signalled
        log.warning("shutdown: %d in flight at %s, %d failed, %d finished after the signal, "
                    "exit %.2f s after it", IN_FLIGHT, sig.name, failed, finished_after, exited)
        record(f"shutdown-{sig.name}", in_flight=IN_FLIGHT, failed=failed,
               finished_after=finished_after, exit_s=round(exited, 2))
        assert failed == 0
        assert finished_after >= 1  # they really were in flight when the signal came


HAMMERS = 4  # channels sending new calls back to back through the drain and the exit
HAMMER_TIMEOUT_S = BUDGET_BUCKETS[-1] - 1  # under the budget histogram's top bound: _long_budgets


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_calls_racing_the_drain_and_exit_are_refused_unavailable_never_cancelled(
        serving_family: Path, sig: signal.Signals, record: Callable[..., None]) -> None:
    """New calls sent without pause from before the signal until after the process is gone see
    OK (before the signal), then UNAVAILABLE (refused while draining, or the connection closed
    at the exit, or refused to connect): never CANCELLED, which clients do not retry. The calls
    in flight at the signal all finish."""
    with _serving(serving_family) as (proc, target, mport):
        x = np.zeros((IMAGES, *SHAPE), np.float32)
        codes: Counter[str] = Counter()
        stop = threading.Event()

        def hammer() -> None:
            # No retry policy: every answer as the server (or the connection) gave it.
            with grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as ch:
                stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
                request = build_request("servetest", x[:1], variant="fast")
                while not stop.is_set():
                    try:
                        stub.ModelInfer(request, timeout=HAMMER_TIMEOUT_S)
                        codes["OK"] += 1
                    except grpc.RpcError as exc:
                        codes[exc.code().name] += 1

        with AdaptiveClient(target, model="servetest") as c, \
                ThreadPoolExecutor(IN_FLIGHT + HAMMERS) as pool:
            hammers = [pool.submit(hammer) for _ in range(HAMMERS)]
            try:
                stop_at = time.monotonic() + 60
                while codes["OK"] < HAMMERS:  # the flood is on
                    assert time.monotonic() < stop_at, codes
                    time.sleep(0.01)  # polling the hammers' count; there is nothing to wait on
                # A budget longer than any hammer's deadline makes the slow calls' arrivals
                # countable: the hammers' calls, answered on the loop in the step that reads
                # them, are in flight only for an instant, and the slow ones may finish before
                # the last arrives, so no reading of the in-flight gauge need show them all.
                calls = [pool.submit(c.infer, x, variant="slow", budget_ms=60_000, timeout=60)
                         for _ in range(IN_FLIGHT)]
                while _long_budgets(mport) < IN_FLIGHT:
                    assert time.monotonic() < stop_at, "the calls never reached the server"
                    time.sleep(0.01)  # polling the server's counter
                proc.proc.send_signal(sig)
                assert proc.proc.wait(timeout=60) == 0
                time.sleep(0.3)  # and a while after it is gone: refused connections
            finally:
                stop.set()
            for h in hammers:
                h.result(timeout=30)
            results = [f.result(timeout=60) for f in calls]  # raises if an in-flight call failed
        log.warning("drain under a flood of new calls (%s): %s; %d in flight at the signal all "
                    "answered", sig.name, dict(codes), len(results))
        record(f"drain-{sig.name}", ok=codes["OK"], unavailable=codes["UNAVAILABLE"],
               cancelled=codes["CANCELLED"], other=sum(n for c, n in codes.items()
                                                      if c not in ("OK", "UNAVAILABLE",
                                                                   "CANCELLED")),
               in_flight=len(results))
        assert codes["CANCELLED"] == 0, codes
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
        assert codes["UNAVAILABLE"] > 0
        assert all(r.variant == "slow" for r in results)
