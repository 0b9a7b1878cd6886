"""`adaptive-inference demo`: build (or reuse) the demo family, serve it, load it, report.

1. ``families/demo`` is reused when it loads and verifies; otherwise ``configs/demo.toml`` is built
   into it (a lighter preset than the default family, so a fresh clone finishes in minutes).
2. ``adaptive-inference serve`` starts as a child process on free ports (its log goes to a file;
   the load generator must not share a GIL with the server it measures).
3. The load generator (`client.loadgen.run_phases`) offers phases of rising rate with mixed
   budgets, using the family's own held-out test images (`client.loadgen.load_test_data`) so
   accuracy is real. Budgets are judged on the client's round trip.
4. The tables (`client.results.summarize_phases`): per phase, per variant/exit used, per budget.
   Then the server stops (SIGTERM).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from client.loadgen import BudgetSpec, Phase, RunConfig, TestData, load_test_data, run_phases
from client.results import summarize_phases
from compression.core.errors import BuildError, FamilyError
from compression.core.family import Family, load_family

log = logging.getLogger(__name__)

DEFAULT_PHASES = (Phase(25, 4), Phase(50, 4), Phase(100, 4), Phase(200, 4), Phase(400, 4))
DEFAULT_BUDGETS: tuple[float | None, ...] = (1.0, 2.0, 5.0, 10.0, 25.0, None)
DEFAULT_BATCH = 8  # images per request: enough compute that the variants' costs differ
MAX_INFLIGHT = 512  # unanswered requests before arrivals are dropped (the client overloaded)
NO_BUDGET_TIMEOUT_S = 10.0  # deadline of requests without a budget, so a stuck server cannot hang us


def ensure_family(out: Path, config: Path) -> Family:
    """The demo family at ``out``: reused when valid, else built from ``config``."""
    try:
        family = load_family(out)
        log.info("demo family: reusing %s (%d variants)", out, len(family.variants))
        return family
    except FamilyError as exc:
        log.info("demo family: building %s from %s (%s)", out, config, exc)
    from compression.build import build, load_config

    build(load_config(config), out, progress=False)
    return load_family(out)


def test_images(family: Family) -> TestData:
    """The family's held-out test split (same data, seed and fractions as its build); random
    pixels, without labels, for a family whose dataset cannot be loaded here."""
    try:
        return load_test_data(None, family)
    except (BuildError, KeyError, ValueError, OSError) as exc:
        log.warning("demo: no test split for %r (%s); sending random images", family.name, exc)
        return load_test_data("random", family)


def run_demo(family_dir: Path, config: Path, *, phases: Sequence[Phase] = DEFAULT_PHASES,
             budgets: Sequence[float | None] = DEFAULT_BUDGETS, batch: int = DEFAULT_BATCH,
             max_queue_delay_ms: float = 1.0, family: Family | None = None) -> str:
    """Serve the family in a child process, drive the load, return the report text."""
    from client.client import AdaptiveClient
    from client.process import METRICS, ServerProcess

    family = family or ensure_family(family_dir, config)
    data = test_images(family)
    t0 = time.perf_counter()
    with tempfile.NamedTemporaryFile("w", prefix="adaptive-demo-serve-", suffix=".log",
                                     delete=False) as log_file, \
            ServerProcess([str(family.root), "--port", "0", "--metrics-port", "0",
                           "--max-queue-delay-ms", str(max_queue_delay_ms)],
                          log=log_file) as server:
        port = server.port()
        metrics_port = int(server.wait_for(METRICS)[0].group(1))
        with AdaptiveClient(f"127.0.0.1:{port}") as client:
            client.wait_ready(timeout=120)
        log.info("demo: server ready on 127.0.0.1:%d (metrics http://127.0.0.1:%d/metrics) in "
                 "%.1f s; its log: %s", port, metrics_port, time.perf_counter() - t0,
                 log_file.name)
        offered = ", ".join(f"{p.rate:.0f}/s for {p.seconds:.0f} s" for p in phases)
        log.info("demo: offering %s, %d images per request; budgets %s", offered, batch,
                 ", ".join("none" if b is None else f"{b:g} ms" for b in budgets))
        # rate and seconds come from each phase; the rest holds for every request
        cfg = RunConfig(rate=phases[0].rate, seconds=phases[0].seconds,
                        budget=BudgetSpec.choice(budgets), images=batch,
                        max_inflight=MAX_INFLIGHT, no_budget_timeout_s=NO_BUDGET_TIMEOUT_S)
        out = asyncio.run(run_phases(f"127.0.0.1:{port}", family.name, data, cfg, phases))
    lines = [f"family {family.name!r}: {len(family.variants)} variants "
             f"({', '.join(family.variants)}); server log {log_file.name}", "",
             summarize_phases(out.records, phases)]
    return "\n".join(lines)
