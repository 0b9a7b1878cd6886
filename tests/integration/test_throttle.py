"""Client-side adaptive throttling against a real server: requests the server refuses for
load are, increasingly, no longer sent — the server never sees them, so it keeps its cycles for
answers — while refusals it says are the budget's own fault never throttle, and a client built
with ``throttle=None`` sends every one. The load generator throttles the same way when asked,
and its counts still add up."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from pathlib import Path

import numpy as np

from client import AdaptiveClient, BudgetExceeded, Overloaded, Throttled
from client.budgets import BudgetSpec
from client.loadgen import THROTTLED, RunConfig, fixed_images, run_open_loop
from client.results import summarize_run
from client.synthetic import SHAPE
from client.throttle import ThrottleConfig
from server.settings import ServeOptions, Settings
from tests.harness import RunningServer, scraped_total, serve_in_thread

CALLS = 400
TOO_TIGHT_MS = 0.001  # no candidate fits: the router sheds every request at once


def _refused(server: RunningServer, reason: str) -> float:
    """Requests the server refused for ``reason`` (its adaptive_refused_total)."""
    return scraped_total(server.server.metrics_port, "adaptive_refused_total", reason=reason)


def _send(client: AdaptiveClient, x: np.ndarray, budget_ms: float, calls: int = CALLS,
          ) -> collections.Counter[str]:
    """``calls`` requests, one after another. The gRPC deadline is long and the channel
    connected first, so every error is the server's, never the client's own deadline. Counted by
    outcome, refusals by the cause the server gave."""
    client.wait_ready(timeout=30)
    outcomes: collections.Counter[str] = collections.Counter()
    for _ in range(calls):
        try:
            client.infer(x, budget_ms=budget_ms, timeout=10)
            outcomes["answered"] += 1
        except Throttled:
            outcomes["throttled"] += 1
        except (BudgetExceeded, Overloaded) as err:
            outcomes[f"refused for {err.refusal}"] += 1
    return outcomes


def test_a_budget_no_server_could_meet_is_refused_as_such_and_never_throttled(
        serving_family: Path) -> None:
    """Shed because the budget the request states is below every variant's own compute: the
    server says so (trailer ``adaptive-refusal: budget``) and the client keeps sending — its
    other requests may well fit, and sending less would not make these."""
    x = np.zeros((1, *SHAPE), np.float32)
    with serve_in_thread(serving_family) as server:
        before = server.handled()
        with AdaptiveClient(server.target) as client:
            outcomes = _send(client, x, TOO_TIGHT_MS)
            answer = client.infer(x, budget_ms=1000)
        after = server.handled()
        refused = {reason: _refused(server, reason) for reason in ("budget", "load")}
        assert client.throttle is not None and client.throttle.rejected == 0
    assert outcomes == {"refused for budget": CALLS}
    assert after - before == CALLS + 1
    assert refused == {"budget": CALLS, "load": 0}  # what an operator's dashboard shows
    assert answer.classes.shape == (1,)


def test_requests_the_server_refuses_for_load_stop_reaching_it(serving_family: Path) -> None:
    """Eight threads share a client and pin the ~4 ms `slow` variant of a server whose queues
    hold one sample: one runs, one waits, the rest are refused for load (a full queue, trailer
    ``adaptive-refusal: load``). Past the first 100 outcomes (ThrottleConfig.min_requests) the
    client keeps a growing share of new requests back, and none of those reaches the server;
    a client built with ``throttle=None`` sends every one."""
    x = np.zeros((1, *SHAPE), np.float32)
    opts = ServeOptions(threads=1, settings=Settings(max_queue=1))
    counts: dict[bool, collections.Counter[str]] = {}
    handled: dict[bool, float] = {}
    with serve_in_thread(serving_family, options=opts) as server:
        for throttled in (True, False):
            before = server.handled()
            with AdaptiveClient(server.target, throttle=ThrottleConfig() if throttled else None
                                ) as client:
                client.wait_ready(timeout=30)

                def pinned(client: AdaptiveClient = client) -> collections.Counter[str]:
                    outcomes: collections.Counter[str] = collections.Counter()
                    for _ in range(CALLS // 8):
                        try:
                            client.infer(x, budget_ms=1000, variant="slow", timeout=10)
                            outcomes["answered"] += 1
                        except Throttled:
                            outcomes["throttled"] += 1
                        except Overloaded as err:
                            outcomes[f"refused for {err.refusal}"] += 1
                    return outcomes
                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    counts[throttled] = sum(pool.map(lambda _: pinned(), range(8)),
                                            collections.Counter())
            handled[throttled] = server.handled() - before
        refused_for_load = _refused(server, "load")
    on, off = counts[True], counts[False]
    assert refused_for_load == on["refused for load"] + off["refused for load"]
    assert sum(on.values()) == sum(off.values()) == CALLS
    assert set(off) <= {"answered", "refused for load"} and off["refused for load"] > CALLS // 2
    assert off["throttled"] == 0 and handled[False] == CALLS
    assert on["throttled"] >= (CALLS - 100) // 4, on
    assert handled[True] == CALLS - on["throttled"], "a throttled request reached the server"


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
