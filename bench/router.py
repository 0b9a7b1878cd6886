"""Router decision time: `Router.choose` over a realistic candidate set, p50/p99 per call.

Twelve candidates (nine variants and three early-exit depths), seeded latency tables, live queue
state on half of them and a random budget per call, as the server sees it. Target: p99 ≤ 50 µs.

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
from server.latency import LatencyModel, Load, QueueState, unit_name
from server.router import Router, candidates_for


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
        if v.exits:
            for e in v.exits:
                lat.seed(unit_name(v.name, e.index), _table(0.1))
        else:
            lat.seed(unit_name(v.name), v.latency_ms)
    return Router(candidates_for(variants), lat, max_batch=32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--json", help="also write the figures to this file (for docs/results.md)")
    args = ap.parse_args()
    router = build()
    rng = random.Random(0)
    queues = {c.variant: QueueState(queued=rng.randrange(40), running=rng.randrange(2) * 8,
                                    running_for_ms=0.1)
              for c in router.candidates[::2]}
    load = Load(cores=2, cpu_other=0.3, executing=1, queues=queues)
    budgets = [rng.choice([None, 0.2, 0.5, 1.0, 2.0, 5.0]) for _ in range(1024)]
    now = time.monotonic
    for i in range(5000):  # warm-up
        b = budgets[i % 1024]
        router.choose(deadline=None if b is None else now() + b / 1e3, batch=1, load=load)
    ns = np.empty(args.calls, np.int64)
    clock = time.perf_counter_ns
    for i in range(args.calls):
        b = budgets[i % 1024]
        deadline = None if b is None else now() + b / 1e3
        t0 = clock()
        router.choose(deadline=deadline, batch=1 + (i & 3), load=load)
        ns[i] = clock() - t0
    us = ns / 1e3
    print(f"Router.choose over {len(router.candidates)} candidates, {args.calls} calls: "
          f"p50 {np.percentile(us, 50):.1f} µs, p99 {np.percentile(us, 99):.1f} µs, "
          f"max {us.max():.1f} µs (target p99 ≤ 50 µs)")
    if args.json:
        host = host_info()
        figures = {"candidates": len(router.candidates), "calls": args.calls,
                   "p50_us": round(float(np.percentile(us, 50)), 2),
                   "p99_us": round(float(np.percentile(us, 99)), 2),
                   "max_us": round(float(us.max()), 2), "cores": host["cpus"],
                   "load_average": host["load_average"][0]}
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
