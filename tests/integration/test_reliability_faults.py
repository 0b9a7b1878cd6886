"""Faults at run time (``--inject-fault``): a variant that raises or hangs fails its batch, each of
its requests is retried once on the next-best candidate that fits the budget, the variant is
quarantined (the router skips it) and re-probed until it works again; nothing is lost and
``adaptive_variant_failures_total`` counts it."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from client import AdaptiveClient, InferResult, Unavailable
from client.synthetic import SHAPE
from server.faults import Fault
from server.settings import ServeOptions, Settings
from tests.harness import RunningServer, serve_in_thread

log = logging.getLogger(__name__)


def _sample(running: RunningServer, name: str, variant: str = "slow") -> float:
    value = running.server.engine.metrics.registry.get_sample_value(name, {"variant": variant})
    return float(value or 0.0)


def _wait_until(predicate: object, timeout: float, what: str) -> None:
    stop = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < stop, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling a server-side state the test cannot subscribe to


def _burst(target: str, n: int, budget_ms: float | None) -> list[InferResult]:
    """``n`` concurrent requests (so several share the failing batch); all must be answered."""
    x = np.zeros((1, *SHAPE), np.float32)  # dark: the early-exit network runs to its budget
    with AdaptiveClient(target, model="servetest") as c, ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda _: c.infer(x, budget_ms=budget_ms, timeout=30), range(n)))


def test_fault_spec_parsing() -> None:
    assert Fault.parse("slow:raise") == Fault("slow", "raise", 1.0)
    assert Fault.parse("early-exit:hang:0.25") == Fault("early-exit", "hang", 0.25)
    for bad in ("slow", "slow:explode", "slow:raise:0", "slow:raise:abc", ":raise"):
        with pytest.raises(ValueError, match="VARIANT:raise"):
            Fault.parse(bad)


def test_unknown_fault_variant_is_a_usage_error(serving_family: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "client.cli", "serve", str(serving_family),
                           "--port", "0", "--metrics-port", "-1", "--inject-fault", "int4:raise"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--inject-fault 'int4:raise': no variant 'int4'" in proc.stderr


def test_raising_variant_is_retried_quarantined_and_reprobed(serving_family: Path,
                                                             record: Callable[..., None]) -> None:
    opts = ServeOptions(threads=2, faults=("slow:raise",),
                        settings=Settings(quarantine_s=0.2, quarantine_max_s=0.4))
    with serve_in_thread(serving_family, options=opts) as running:
        results = _burst(running.target, 16, budget_ms=None)  # unbounded: `slow` is the choice
        assert len(results) == 16  # nothing lost
        retried = [r for r in results if r.retried_from == "slow"]
        assert retried and all(r.variant == "early-exit" and r.exit == 2 for r in retried)
        assert all(r.variant != "slow" for r in results)
        assert _sample(running, "adaptive_variant_failures_total") >= 1
        assert _sample(running, "adaptive_retries_total") == len(retried)
        assert _sample(running, "adaptive_variant_quarantined") == 1
        log.warning("raise: %d of 16 requests retried, %d failed batches", len(retried),
                    _sample(running, "adaptive_variant_failures_total"))
        raised = {"requests": len(results), "retried": len(retried),
                  "failures": _sample(running, "adaptive_variant_failures_total")}
        with AdaptiveClient(running.target, model="servetest") as c:
            x = np.zeros((1, *SHAPE), np.float32)
            quarantined = c.infer(x)  # skipped by the router: no failure, no retry
            assert quarantined.variant == "early-exit" and quarantined.retried_from is None
            with pytest.raises(Unavailable, match="'slow' is quarantined"):
                c.infer(x, variant="slow")  # a pin is not moved to another variant
            running.server.engine.faults.arm(False)  # the variant heals; a probe will notice
            _wait_until(lambda: not running.server.engine.breaker.variants, 15,
                        "the re-probe to clear the quarantine")
            assert _sample(running, "adaptive_variant_quarantined") == 0
            assert c.infer(x).variant == "slow"
    record("faults-raise", **raised)


def test_hanging_variant_times_out_and_requests_are_retried(serving_family: Path,
                                                           record: Callable[..., None]) -> None:
    opts = ServeOptions(threads=3, faults=("slow:hang",),
                        settings=Settings(batch_timeout_ms=300, quarantine_s=30))
    with serve_in_thread(serving_family, options=opts) as running:
        t0 = time.monotonic()
        results = _burst(running.target, 8, budget_ms=3000)  # slow fits; so does the retry
        elapsed = time.monotonic() - t0
        assert len(results) == 8 and all(r.variant == "early-exit" for r in results)
        assert any(r.retried_from == "slow" for r in results)
        assert elapsed < 20  # the hang is cut by the batch timeout, not waited out
        assert running.server.engine.batchers["slow"].wedged  # the thread is still stuck
        assert _sample(running, "adaptive_variant_failures_total") == 1
        log.warning("hang: %d of 8 requests retried after the batch timeout, %.2f s",
                    sum(r.retried_from == "slow" for r in results), elapsed)
        record("faults-hang", requests=len(results), seconds=round(elapsed, 2),
               retried=sum(r.retried_from == "slow" for r in results))
        # the hung thread holds one worker: the other variants keep answering meanwhile
        more = _burst(running.target, 8, budget_ms=3000)
        assert all(r.variant == "early-exit" and r.retried_from is None for r in more)
