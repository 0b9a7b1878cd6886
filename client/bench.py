"""`adaptive-inference bench`: one open loop per offered rate against a running server, then
``results.json``, ``requests.csv`` and plots.

The load is `client.loadgen.run_open_loop` (Poisson arrivals that never wait for answers, images
from the dataset's test split so accuracy is measured, budgets from a `BudgetSpec`); the figures
are `client.results.summarize_run`; the plots `client.bench_plots`. This module checks the
request against what the server offers, runs the rates one after another and writes the files.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client.budgets import BudgetSpec
from client.client import AdaptiveClient
from client.loadgen import Record, RunConfig, TestData, run_open_loop
from client.results import host_info, host_span, summarize_run, write_records_csv
from client.throttle import ThrottleConfig

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchResult:
    results: dict[str, Any]  # what results.json holds
    records: list[Record]


def run_bench(target: str, rates: Sequence[float], seconds: float, budget: BudgetSpec,
              data: TestData, *, variant: str | None = None, images: int = 1, seed: int = 0,
              max_inflight: int = 4096, timeout_s: float | None = None,
              deadline_is_budget: bool = False, throttle: ThrottleConfig | None = None,
              wait_ready_s: float = 30.0,
              pause_s: float = 1.0, progress: Callable[[str], None] | None = None,
              progress_every_s: float = 0.5) -> BenchResult:
    """One run per offered rate against ``target`` (``pause_s`` of quiet between runs); with
    ``throttle`` the generator keeps back what `AdaptiveClient`'s throttle would. Raises
    ValueError when the images or the pinned variant do not fit what the server offers."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_start = host_info()["load_average"]
    with AdaptiveClient(target) as client:
        client.wait_ready(timeout=wait_ready_s)
        model = client.model
        shape = [int(d) for d in client.metadata().inputs[0].shape][1:]
        table = client.variants(batch_size=images)
    if list(data.x.shape[1:]) != shape:
        raise ValueError(f"test images have shape {list(data.x.shape[1:])!r}; model {model!r} "
                         f"takes {shape!r}")
    names = {v.name for v in table} | {v.variant for v in table}
    if variant is not None and variant not in names:
        raise ValueError(f"variant {variant!r}: the server offers {sorted(names)!r}")
    runs: list[dict[str, Any]] = []
    records: list[Record] = []
    for i, rate in enumerate(rates):
        if i and pause_s > 0:
            time.sleep(pause_s)  # let the server's queues drain between runs
        cfg = RunConfig(rate=rate, seconds=seconds, budget=budget, variant=variant, images=images,
                        seed=seed, max_inflight=max_inflight, timeout_s=timeout_s,
                        deadline_is_budget=deadline_is_budget, throttle=throttle)
        out = asyncio.run(run_open_loop(target, model, data, cfg, run_index=i, progress=progress,
                                        progress_every_s=progress_every_s))
        runs.append(summarize_run(out.records, cfg, out.wall_s, out.send_lag_ms))
        records.extend(out.records)
        log.info("bench: %g/s done: %d answered, %d errors, attainment %s", rate,
                 runs[-1]["answered"], runs[-1]["errors"], runs[-1]["attainment"])
    results = {
        "schema_version": SCHEMA_VERSION, "tool": "adaptive-inference bench",
        "started": started, "target": target, "model": model,
        "policy": "adaptive" if variant is None else f"pinned:{variant}", "variant": variant,
        "budget_ms": str(budget), "images_per_request": images, "seconds_per_rate": seconds,
        "seed": seed, "timeout_s": timeout_s, "deadline_is_budget": deadline_is_budget,
        "client_throttle": throttle is not None,
        "max_inflight": max_inflight,
        "data": data.description,
        "host": host_span(load_start),
        "server_variants": [{"name": v.name, "variant": v.variant, "exit": v.exit,
                             "accuracy": v.accuracy, "predicted_p50_ms": v.predicted_p50_ms,
                             "predicted_p95_ms": v.predicted_p95_ms} for v in table],
        "runs": runs,
    }
    return BenchResult(results, records)


def write_outputs(result: BenchResult, out: Path, *, plots: bool = True) -> list[Path]:
    """``results.json``, ``requests.csv`` (one row per arrival) and, with ``plots``, the PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "requests.csv"]
    paths[0].write_text(json.dumps(result.results, indent=2) + "\n")
    rates = [r["offered_rps"] for r in result.results["runs"]]
    write_records_csv(paths[1], result.records, rates)
    if plots:
        from client import bench_plots  # matplotlib: imported only when plotting

        by_rate = {f"{rate:g}/s": [r for r in result.records if r.phase == i]
                   for i, rate in enumerate(rates)}
        paths.append(bench_plots.latency_cdf(by_rate, out / "latency_cdf.png",
                                             title=f"{result.results['policy']}: latency CDF "
                                                   f"against budget {result.results['budget_ms']}"))
        paths.append(bench_plots.load_curves({result.results["policy"]: result.results["runs"]},
                                             out / "load.png"))
    return paths
