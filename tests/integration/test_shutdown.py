"""Graceful shutdown of a real `adaptive-inference serve` process: with requests in flight,
SIGTERM (or SIGHUP, which used to kill the process at once) turns health NOT_SERVING and refuses
new requests with UNAVAILABLE at once, while every request that was in flight when the signal
came finishes successfully; then the process exits 0."""

from __future__ import annotations

import logging
import signal
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import AdaptiveClient, InferResult
from client.client import build_request
from client.process import METRICS, SERVING, ServerProcess
from client.synthetic import SHAPE
from protos.generated import grpc_service_pb2_grpc

log = logging.getLogger(__name__)

IN_FLIGHT = 8
IMAGES = 32  # one full batch each: the pinned slow variant runs them one after another


def _inflight(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                  timeout=5).read().decode()
    return next(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "adaptive_inflight_requests")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_drains_in_flight_requests_and_refuses_new_ones(serving_family: Path,
                                                                  sig: signal.Signals) -> None:
    proc = ServerProcess([str(serving_family), "--port", "0", "--metrics-port", "0",
                          "--threads", "2", "--grace-s", "30"])
    try:
        port = proc.port()
        mport = proc.port(METRICS)
        proc.wait_for(SERVING)
        target = f"127.0.0.1:{port}"
        x = np.zeros((IMAGES, *SHAPE), np.float32)
        with AdaptiveClient(target, model="servetest") as c, \
                ThreadPoolExecutor(IN_FLIGHT) as pool:
            calls: list[Future[tuple[InferResult, float]]] = [
                pool.submit(lambda: (c.infer(x, variant="slow", timeout=60), time.monotonic()))
                for _ in range(IN_FLIGHT)]
            stop = time.monotonic() + 30
            while _inflight(mport) < IN_FLIGHT:  # every call has reached the server
                assert time.monotonic() < stop, "the calls never all reached the server"
                time.sleep(0.01)  # polling the server's gauge; there is nothing to wait on
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
        assert failed == 0
        assert finished_after >= 1  # they really were in flight when the signal came
    finally:
        proc.stop()
