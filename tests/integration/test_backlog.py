"""``serve --backlog N``: past N calls that the server has not yet read, gRPC's core refuses new
calls on arrival (CANCELLED), before any of the server's Python runs; every call it takes is
answered, and the server goes on serving. Without the flag a burst of the same size is queued and
answered whole. (What the bound buys past saturation is measured by `bench/scaleout.py`, not
asserted here.)"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import AdaptiveClient
from client.client import build_request, error_from
from client.process import SERVING, ServerProcess
from client.synthetic import SHAPE
from protos import wire
from server.errors import Cancelled

BURST = 300  # calls sent at once: far more than the loop takes in one turn


async def _burst(target: str, payload: bytes) -> collections.Counter[str]:
    """Send ``BURST`` copies of ``payload`` at once; count the outcomes by status code name, the
    refusals also by what the client library makes of them."""
    outcomes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(target, wire.channel_options()) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        await call(payload, timeout=30)  # connected before the burst

        async def one() -> None:
            try:
                await call(payload, timeout=30)
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                outcomes[exc.code().name] += 1
                err = error_from(exc)
                if isinstance(err, Cancelled) and "backlog" in str(err):
                    outcomes["refused: backlog"] += 1

        await asyncio.gather(*(one() for _ in range(BURST)))
    return outcomes


@pytest.mark.parametrize("backlog", [0, 2])
def test_a_bounded_backlog_refuses_the_surplus_and_answers_the_rest(
        serving_family: Path, backlog: int) -> None:
    proc = ServerProcess([str(serving_family), "--port", "0", "--metrics-port", "-1",
                          "--threads", "1", "--backlog", str(backlog)])
    try:
        target = f"127.0.0.1:{proc.port()}"
        proc.wait_for(SERVING)
        x = np.zeros((1, *SHAPE), np.float32)
        payload = build_request("servetest", x, variant="fast").SerializeToString()
        outcomes = asyncio.run(_burst(target, payload))
        assert set(outcomes) <= {"OK", "CANCELLED", "refused: backlog"}, outcomes
        assert outcomes["OK"] + outcomes["CANCELLED"] == BURST
        if backlog:
            assert outcomes["CANCELLED"] > 0, outcomes  # refused by gRPC's core ...
            assert outcomes["refused: backlog"] == outcomes["CANCELLED"]  # ... and said so
            assert outcomes["OK"] > 0
        else:
            assert outcomes["OK"] == BURST, outcomes
        with AdaptiveClient(target, model="servetest") as c:  # and it goes on serving
            assert c.infer(x, variant="fast", timeout=10).variant == "fast"
    finally:
        proc.stop()


def test_a_negative_backlog_is_refused_in_one_line(serving_family: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "client.cli", "serve", str(serving_family),
                           "--port", "0", "--metrics-port", "-1", "--backlog", "-1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("error: INVALID_ARGUMENT: --backlog -1: a number of calls, "
                                   "0 (unbounded) or more"), proc.stderr
