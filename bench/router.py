"""Router decision time: `Router.choose` over a realistic candidate set, p50/p99 per call.

Twelve candidates (nine variants and three early-exit depths), seeded latency tables, queues that
change between calls on half of the variants, a random budget per call (some too small: the shed
path, which formats its message, is timed too), and after every call what the server does after
every answer: the latency model folds in an observed batch time (which drops its memoised sums,
so the next call takes the cache-miss path) and the router's calibration takes the feedback.
Target: p99 ≤ 50 µs.

    .venv/bin/python bench/router.py [--calls 200000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import numpy as np

from client.results import host_info
from compression.core.family import Exit, Variant
from server.errors import Shed
from server.latency import LatencyModel, Load, QueueState
from server.router import Decision, Router, candidates_for
from server.warmup import seed_from_manifest


def _table(ms: float) -> dict[str, dict[str, float]]:
    return {str(b): {"p50": ms * b ** 0.7, "p95": 1.2 * ms * b ** 0.7} for b in (1, 8, 32)}


def build() -> Router:
    names = ["full", "pruned", "int8", "distilled", "depthwise", "low-rank", "clustered",
             "binary", "pruned-int8"]
    variants = [Variant(name=n, method=n, params={}, artifacts=[], accuracy=0.99 - 0.01 * i,
                        params_count=0, macs=0, size_bytes=0, latency_ms=_table(0.4 / (1 + i)))
                for i, n in enumerate(names)]
    exits = [Exit(i, 0.95 + 0.015 * i, _table(0.1 * (i + 1)), 0.9, 0.3) for i in range(3)]
    variants.append(Variant(name="early-exit", method="early-exit", params={}, artifacts=[],
                            accuracy=0.98, params_count=0, macs=0, size_bytes=0,
                            latency_ms=_table(0.3), exits=exits))
    lat = LatencyModel()
    for v in variants:
        seed_from_manifest(lat, v)
    return Router(candidates_for(variants), lat, max_batch=32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--json", help="also write the figures to this file (for docs/results.md)")
    args = ap.parse_args()
    router = build()
    rng = random.Random(0)
    busy = [c.variant for c in router.candidates[::2]]
    # 64 queue snapshots to cycle through: the live queues change between requests
    loads = [Load(cores=2, cpu_other=0.3, executing=1, threads=2, queues={
        v: QueueState(queued=rng.randrange(40), running=rng.randrange(2) * 8,
                      running_for_ms=rng.random(), waiting=rng.random() < 0.2) for v in busy})
        for _ in range(64)]
    budgets = [rng.choice([None, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0]) for _ in range(1024)]
    now = time.monotonic
    clock = time.perf_counter_ns
    ns = np.empty(args.calls, np.int64)
    shed = 0
    for i in range(-5000, args.calls):  # the first 5,000 warm up
        b = budgets[i % 1024]
        deadline = None if b is None else now() + b / 1e3
        load = loads[i % 64]
        t0 = clock()
        try:
            d: Decision | None = router.choose(deadline=deadline, batch=1 + (i & 3), load=load)
        except Shed:
            d = None
        t1 = clock()
        if i >= 0:
            ns[i] = t1 - t0
            shed += d is None
        if d is not None:  # what the server does once the answer is back
            unit = d.candidate.units[-1]
            router.latency.observe(unit, 1 + (i & 3), d.compute_ms * (0.8 + 0.4 * rng.random()))
            router.observe(d, d.predicted_ms * (0.8 + 0.4 * rng.random()), missed=False,
                           outside_ms=0.05)
    us = ns / 1e3
    print(f"Router.choose over {len(router.candidates)} candidates, {args.calls} calls: "
          f"p50 {np.percentile(us, 50):.1f} µs, p99 {np.percentile(us, 99):.1f} µs, "
          f"max {us.max():.1f} µs (target p99 ≤ 50 µs); {shed} calls shed")
    if args.json:
        host = host_info()
        figures = {"candidates": len(router.candidates), "calls": args.calls,
                   "p50_us": round(float(np.percentile(us, 50)), 2),
                   "p99_us": round(float(np.percentile(us, 99)), 2),
                   "max_us": round(float(us.max()), 2), "shed_calls": shed,
                   "observations": "latency model and calibration after every call",
                   "cores": host["cpus"],
                   "load_average": host["load_average"][0]}
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
