"""Client-side adaptive throttling against a real server: requests the server keeps refusing
are, in the share it refuses them, no longer sent — the server never sees them, so it keeps its
cycles for answers — and a client built with ``throttle=None`` sends every one. The load
generator throttles the same way when asked, and its counts still add up."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import numpy as np

from client import AdaptiveClient, BudgetExceeded, Throttled
from client.budgets import BudgetSpec
from client.loadgen import THROTTLED, RunConfig, fixed_images, run_open_loop
from client.results import summarize_run
from client.synthetic import SHAPE
from client.throttle import ThrottleConfig
from tests.harness import RunningServer, scraped_total, serve_in_thread

CALLS = 400
TOO_TIGHT_MS = 0.001  # no candidate fits: the router sheds every request at once


def _handled(server: RunningServer) -> float:
    """Requests the server's handler has counted, whatever their status."""
    return scraped_total(server.server.metrics_port, "adaptive_requests_total")


def _send(client: AdaptiveClient, x: np.ndarray) -> collections.Counter[str]:
    """``CALLS`` requests the server sheds. The gRPC deadline is long and the channel connected
    first, so every BudgetExceeded is the server's refusal, never the client's own deadline
    (2 x budget + 50 ms by default: a slow first connection could pass it unseen by the server)."""
    client.wait_ready(timeout=30)
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(CALLS):
        try:
            client.infer(x, budget_ms=TOO_TIGHT_MS, timeout=10)
            outcomes["answered"] += 1
        except Throttled:
            outcomes["throttled"] += 1
        except BudgetExceeded:
            outcomes["shed"] += 1
    return outcomes


def test_requests_the_server_sheds_stop_reaching_it(serving_family: Path) -> None:
    x = np.zeros((1, *SHAPE), np.float32)
    with serve_in_thread(serving_family) as server:
        before = _handled(server)
        with AdaptiveClient(server.target) as client:
            throttled = _send(client, x)
        middle = _handled(server)
        with AdaptiveClient(server.target, throttle=None) as client:
            unthrottled = _send(client, x)
            answer = client.infer(x, budget_ms=1000)  # the server itself is fine
        after = _handled(server)
    # All shed by the server: past the first 100 (ThrottleConfig.min_requests) 80 % of them (the
    # default cap) are kept in the client.
    assert throttled["shed"] + throttled["throttled"] == CALLS, throttled
    assert throttled["throttled"] >= (CALLS - 100) // 2, throttled
    assert middle - before == throttled["shed"], "a throttled request reached the server"
    assert unthrottled == {"shed": CALLS}
    assert after - middle == CALLS + 1
    assert answer.classes.shape == (1,)


def test_the_load_generator_throttles_itself_when_asked(server: RunningServer,
                                                        serving_family: Path) -> None:
    data = fixed_images(np.zeros((8, *SHAPE), np.float32))
    counts = {}
    for throttle in (None, ThrottleConfig()):
        cfg = RunConfig(rate=800, seconds=1.0, budget=BudgetSpec.parse(str(TOO_TIGHT_MS)),
                        variant="slow", deadline_is_budget=True, throttle=throttle)
        out = asyncio.run(run_open_loop(server.target, "servetest", data, cfg))
        fig = summarize_run(out.records, cfg, out.wall_s)
        assert fig["offered"] == fig["sent"] + fig["client_dropped"] + fig["client_throttled"]
        assert fig["sent"] == fig["answered"] + fig["errors"]
        counts[throttle is not None] = fig
    assert counts[False]["client_throttled"] == 0
    assert counts[True]["client_throttled"] >= (counts[True]["offered"] - 100) // 2
    assert sum(r.status == THROTTLED for r in out.records) == counts[True]["client_throttled"]
