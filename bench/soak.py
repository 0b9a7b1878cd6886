"""Overload soak: a `serve` process offered several times its capacity for a minute.

Measures, against one `adaptive-inference serve --on-miss reject` process:

1. idle latency (median of sequential requests) and capacity (answers/s of a closed loop with a
   few concurrent clients) for one request shape;
2. a soak: open-loop arrivals at ``--factor`` × capacity for ``--seconds``, evenly spaced, each
   request with its budget and a gRPC deadline of 2 × budget + 50 ms (as `AdaptiveClient`);
   meanwhile health checks every 0.5 s and the server's RSS every second;
3. recovery: sequential requests after the load stops until the median of the last five is back
   within 1.5 × the idle latency.

The load comes from `client.loadgen` (closed loop, open loop, sequential). By default it builds
the synthetic family of `client.synthetic` (the serving tests' family: untrained; its ``slow``
variant costs milliseconds per image, so compute, not the gRPC stack, is what saturates) and
pins ``slow`` with 8 images per request. Prints a markdown report (``--json FILE`` for the raw
figures).

    .venv/bin/python bench/soak.py [--family DIR --variant NAME] [--seconds 60] [--factor 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from client import AdaptiveClient
from client.budgets import BudgetSpec
from client.loadgen import OK, RunConfig, closed_loop, fixed_images, run_open_loop, sequential_ms
from client.process import LISTENING, SERVING, ServerProcess
from client.results import host_info
from compression.core.family import load_family
from compression.report import markdown_table

CAPACITY_CLIENTS = 4  # the closed loop's concurrency
CAPACITY_S = 5.0
# Sequential (idle, recovery) requests carry a generous budget: with --on-miss reject a lone
# request must never be refused, only timed.
IDLE_BUDGET_MS = 5000.0


def idle_ms(c: AdaptiveClient, x: np.ndarray, variant: str | None, n: int) -> float:
    """Median round trip of ``n`` sequential requests."""
    return float(statistics.median(sequential_ms(c, x, n, variant=variant,
                                                 budget_ms=IDLE_BUDGET_MS)))


class Sampler(threading.Thread):
    """Health checks (status, ms) every 0.5 s and the server's RSS every second, until stopped."""

    def __init__(self, target: str, pid: int) -> None:
        super().__init__(daemon=True)
        self.target, self.proc = target, psutil.Process(pid)
        self.health: list[tuple[str, float]] = []
        self.rss: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with AdaptiveClient(self.target) as c:
            tick = 0
            while not self.stop.wait(0.5):
                t0 = time.perf_counter()
                self.health.append((c.health(timeout=2.0), (time.perf_counter() - t0) * 1e3))
                if tick % 2 == 0:
                    self.rss.append(self.proc.memory_info().rss)
                tick += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", help="family dir (default: client.synthetic's family, built)")
    ap.add_argument("--variant", default="slow", help="pinned variant ('none': the router picks)")
    ap.add_argument("--images", type=int, default=8, help="images per request (default 8)")
    ap.add_argument("--budget-ms", type=float, default=250.0, help="per-request budget")
    ap.add_argument("--seconds", type=float, default=60.0, help="soak length (default 60)")
    ap.add_argument("--factor", type=float, default=5.0, help="offered load ÷ capacity")
    ap.add_argument("--max-queue", type=int, default=256, help="server --max-queue (samples)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    variant = None if args.variant == "none" else args.variant

    with tempfile.TemporaryDirectory() as tmp:
        if args.family:
            family = Path(args.family)
        else:
            from client.synthetic import serving_family_at  # torch: only when building it

            family = serving_family_at(Path(tmp) / "family")
        name = load_family(family).name
        proc = ServerProcess([str(family), "--port", "0", "--metrics-port", "-1", "--threads",
                              "2", "--on-miss", "shed", "--max-queue", str(args.max_queue)])
        try:
            port = proc.port(LISTENING)
            proc.wait_for(SERVING)
            target = f"127.0.0.1:{port}"
            shape = load_family(family).input_shape
            x = np.zeros((args.images, *shape), np.float32)
            with AdaptiveClient(target, model=name) as c:
                idle_ms(c, x, variant, 20)  # warm-up
                idle = idle_ms(c, x, variant, 30)
            capacity = asyncio.run(closed_loop(
                target, name, x, concurrency=CAPACITY_CLIENTS, seconds=CAPACITY_S,
                variant=variant, budget_ms=args.budget_ms)).rps
            rate = args.factor * capacity
            # Evenly spaced arrivals (a steady push, not Poisson bursts), every one sent: the
            # server's admission control is what is measured, so the client drops nothing.
            cfg = RunConfig(rate=rate, seconds=args.seconds,
                            budget=BudgetSpec.choice([args.budget_ms]), variant=variant,
                            images=args.images, max_inflight=1 << 30, poisson=False)
            sampler = Sampler(target, proc.proc.pid)
            rss_start = sampler.proc.memory_info().rss
            sampler.start()
            out = asyncio.run(run_open_loop(target, name, fixed_images(x), cfg))
            load_end = time.perf_counter()
            recovery_s: float | None = None
            recent: list[float] = []
            with AdaptiveClient(target, model=name) as c:
                while time.perf_counter() - load_end < 60:
                    recent = [*recent, idle_ms(c, x, variant, 1)][-5:]
                    if len(recent) == 5 and statistics.median(recent) <= 1.5 * idle:
                        recovery_s = time.perf_counter() - load_end
                        break
                after = idle_ms(c, x, variant, 30)
            sampler.stop.set()
            sampler.join()
            rss_end = sampler.proc.memory_info().rss
        finally:
            proc.stop()

    codes = Counter(r.status for r in out.records)
    ok_ms = [r.latency_ms for r in out.records if r.status == OK]
    refused_ms = [r.latency_ms for r in out.records if r.status == "RESOURCE_EXHAUSTED"]
    health_ok = sum(1 for s, _ in sampler.health if s == "SERVING")
    figures = {
        "variant": variant or "router", "images": args.images, "budget_ms": args.budget_ms,
        "idle_p50_ms": idle, "capacity_rps": capacity, "offered_rps": rate,
        "soak_s": out.wall_s, "requests": len(out.records), "codes": dict(codes),
        "answered_rps": codes[OK] / out.wall_s,
        "ok_p50_ms": float(np.percentile(ok_ms, 50)) if ok_ms else None,
        "ok_p99_ms": float(np.percentile(ok_ms, 99)) if ok_ms else None,
        "refused_p50_ms": float(np.percentile(refused_ms, 50)) if refused_ms else None,
        "health_checks": len(sampler.health), "health_serving": health_ok,
        "health_max_ms": max(ms for _, ms in sampler.health) if sampler.health else None,
        "rss_start_mib": rss_start / 2**20, "rss_end_mib": rss_end / 2**20,
        "rss_max_mib": max([*sampler.rss, rss_end]) / 2**20,
        "rss_growth": rss_end / rss_start - 1,
        "recovery_s": recovery_s, "after_p50_ms": after,
        "host": host_info(),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(report(figures, args.factor))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def report(f: dict[str, Any], factor: float) -> str:
    """The figures as a markdown table."""
    recovery = f["recovery_s"]
    rows = [
        ("request", f"{f['images']} images, `{f['variant']}`, budget {f['budget_ms']:.0f} ms"),
        ("idle latency (p50, sequential)", _ms(f["idle_p50_ms"])),
        (f"capacity (closed loop, {CAPACITY_CLIENTS} clients)",
         f"{f['capacity_rps']:.1f} requests/s"),
        ("offered (open loop)", f"{f['offered_rps']:.1f} requests/s for {f['soak_s']:.0f} s "
                                f"({factor:g}x)"),
        ("outcomes", ", ".join(f"{k} {v}" for k, v in sorted(f["codes"].items()))),
        ("answered", f"{f['answered_rps']:.1f} requests/s, p50 {_ms(f['ok_p50_ms'])}, "
                     f"p99 {_ms(f['ok_p99_ms'])}"),
        ("refused (RESOURCE_EXHAUSTED)", f"p50 {_ms(f['refused_p50_ms'])} after sending"),
        ("health checks", f"{f['health_serving']}/{f['health_checks']} SERVING, slowest "
                          f"{_ms(f['health_max_ms'])}"),
        ("server RSS", f"{f['rss_start_mib']:.1f} → {f['rss_end_mib']:.1f} MiB "
                       f"({f['rss_growth']:+.1%}), max {f['rss_max_mib']:.1f} MiB"),
        ("recovery to idle latency", ("not within 60 s" if recovery is None else
                                      f"{recovery:.2f} s") + f" (p50 after: {_ms(f['after_p50_ms'])})"),
        ("load average (1, 5, 15 min)", ", ".join(f"{v:.1f}" for v in f["host"]["load_average"])),
    ]
    return markdown_table(["figure", "value"], rows)


if __name__ == "__main__":
    main()
