"""Policy comparison: adaptive routing against pinning `full` and pinning the fastest variant,
at offered loads from 0.5x to 4x the `full` variant's capacity on this host.

1. Serve the family (`adaptive-inference serve`, its own process, loopback) with ``--serve-args``
   (default ``--deadline-margin-ms 8``: on this oversubscribed 2-core host the reply and the
   client's own scheduling need more than the default 0.5 ms) and, beside it, a second server
   with default flags for an "adaptive, default flags" row.
2. Measure on this host, before any load: the idle round trip of pinned `full` with 32 images
   per request (enough that its compute, not the gRPC round trip, dominates; its p99, the median
   of three blocks of 100, sets the budget range: uniform over [p99, 2 x p99], which `full`
   just meets when idle) and `full`'s capacity (closed-loop throughput, 8 requests always in
   flight).
3. For each load, each policy in rotated order (so machine-load drift hits all alike):
   `adaptive-inference bench` as its own process with the gRPC deadline = the budget (so the
   server sees the time already spent in transport and queues), the same seed per load (same
   arrivals, budgets and images for every policy: a paired comparison); between runs, wait until
   the servers' queues are empty.
4. ``summary.json`` with every run's figures, the calibration and the host.

The calibration's load is `client.loadgen` (sequential, closed loop); each point's is the
`bench` command's open loop.

    .venv/bin/python bench/policies.py [--family families/mnist5k] [--loads 0.5,1,2,4]
        [--seconds 8] [--out results/bench/policies]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from client.client import AdaptiveClient
from client.loadgen import closed_loop, load_test_data, sequential_ms
from client.process import METRICS, ServerProcess
from client.results import host_info, host_span
from compression.core.family import load_family

log = logging.getLogger("bench.policies")
ROOT = Path(__file__).resolve().parents[1]
IMAGE_CHOICES = (1, 2, 4, 8, 16, 32)


def choose_images(client: AdaptiveClient, min_compute_ms: float) -> int:
    """Fewest images per request (a power of two, at most 32 = the server's batch limit) for
    which `full`'s predicted compute on this host reaches ``min_compute_ms``."""
    for b in IMAGE_CHOICES:
        full = next(v for v in client.variants(batch_size=b) if v.name == "full")
        if full.predicted_p50_ms >= min_compute_ms:
            return b
    return IMAGE_CHOICES[-1]


def server_busy(metrics_url: str) -> float:
    """Requests in flight plus samples queued, from the server's /metrics."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name in ("adaptive_inflight_requests", "adaptive_queue_depth"))


def wait_idle(metrics_url: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server_busy(metrics_url) == 0:
            return
        time.sleep(0.25)  # polling the server's gauges: there is no event to wait on
    log.warning("server still busy after %.0f s; going on", timeout)


def run_point(target: str, family: Path, out: Path, rate: float, seconds: float, budget: str,
              images: int, seed: int, variant: str | None, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "client.cli", "bench", "--target", target, "--rate", f"{rate:.3f}",
           "--duration", f"{seconds:g}", "--budget-ms", budget, "--images", str(images),
           "--family", str(family), "--seed", str(seed), "--out", str(out), "--no-plots",
           "--quiet", *extra]
    if variant is not None:
        cmd += ["--variant", variant]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=seconds + 300)
    if proc.returncode != 0:
        raise RuntimeError(f"bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads((out / "results.json").read_text())


def policy_dir(policy: str) -> str:
    return policy.replace(", ", "-").replace(" ", "-")


def start_server(stack: contextlib.ExitStack, family_dir: Path, flags: list[str]
                 ) -> tuple[str, str]:
    """`adaptive-inference serve` on free loopback ports until ``stack`` closes; returns its
    target and metrics URL once SERVING."""
    log_file = stack.enter_context(tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed by stack)
        "w", prefix="bench-serve-", suffix=".log", delete=False))
    server = stack.enter_context(ServerProcess(
        [str(family_dir), "--port", "0", "--metrics-port", "0", *flags], log=log_file))
    target = f"127.0.0.1:{server.port()}"
    metrics_url = f"http://127.0.0.1:{int(server.wait_for(METRICS)[0].group(1))}/metrics"
    with AdaptiveClient(target) as client:
        client.wait_ready(timeout=300)
    log.info("server %s ready (flags %r); its log: %s", target, " ".join(flags), log_file.name)
    return target, metrics_url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="families/mnist5k")
    ap.add_argument("--loads", default="0.5,1,1.5,2,3,4",
                    help="offered loads in multiples of full's capacity")
    ap.add_argument("--seconds", type=float, default=8.0, help="per load and policy")
    ap.add_argument("--images", type=int, default=32,
                    help="images per request (default 32, the server's batch limit: full's "
                         "compute, ~25 ms here, then outweighs the gRPC round trip); 0: the "
                         "fewest for which full's predicted compute reaches --min-compute-ms")
    ap.add_argument("--min-compute-ms", type=float, default=20.0)
    ap.add_argument("--budget-range", type=float, default=2.0,
                    help="budgets uniform over [p99, RANGE x p99] of full's idle round trip")
    ap.add_argument("--loose-deadline", action="store_true",
                    help="bench with gRPC deadline 2 x budget + 50 ms instead of = the budget")
    ap.add_argument("--serve-args", default="--deadline-margin-ms 8",
                    help="extra `adaptive-inference serve` flags, e.g. '--deadline-margin-ms 2'")
    ap.add_argument("--no-default-server", action="store_true",
                    help="with --serve-args, skip the 'adaptive, default flags' comparison")
    ap.add_argument("--out", default="results/bench/policies")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    family_dir = (ROOT / args.family).resolve()
    fam = load_family(family_dir)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    loads = [float(v) for v in args.loads.split(",")]
    extra = [] if args.loose_deadline else ["--deadline-is-budget"]
    data = load_test_data(None, family_dir)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_avg_start = host_info()["load_average"]
    t_start = time.perf_counter()

    tuned = shlex.split(args.serve_args)
    with contextlib.ExitStack() as stack:
        servers = {"tuned": start_server(stack, family_dir, tuned)}
        if tuned and not args.no_default_server:  # the same family with default flags, beside
            servers["default"] = start_server(stack, family_dir, [])
        target = servers["tuned"][0]
        with AdaptiveClient(target) as client:
            images = args.images or choose_images(client, args.min_compute_ms)
            x = data.x[:images]
            table = client.variants(batch_size=images)
            fastest = min(table, key=lambda v: v.predicted_p95_ms).name
            # Three blocks, the median block's p99: one burst of a neighbour's CPU use must not
            # set the budgets for the whole run.
            blocks = [sequential_ms(client, x, 100, variant="full", warmup=10) for _ in range(3)]
            idle_fastest = sequential_ms(client, x, 100, variant=fastest, warmup=10)
        idle = np.concatenate(blocks)
        p50, p95 = (float(np.percentile(idle, q)) for q in (50, 95))
        p99 = float(np.median([np.percentile(b, 99) for b in blocks]))
        lo, hi = p99, args.budget_range * p99
        budget = f"uniform:{lo:.3f}:{hi:.3f}"
        saturated = asyncio.run(closed_loop(target, fam.name, x, variant="full", concurrency=8,
                                            seconds=5.0, timeout_s=30.0))
        if saturated.errors:
            log.warning("capacity run: errors %s", saturated.errors)
        capacity = saturated.rps
        log.info("%d images/request; full idle round trip p50 %.2f / p95 %.2f / p99 %.2f ms; "
                 "capacity %.1f req/s; budgets %s ms; fastest %s (idle p50 %.2f ms)", images,
                 p50, p95, p99, capacity, budget, fastest, float(np.median(idle_fastest)))
        # policy → (server, pinned variant); the adaptive policy runs with the tuned flags, and
        # with the defaults on the second server when there is one.
        policies: dict[str, tuple[str, str | None]] = {
            "adaptive": ("tuned", None), "pinned full": ("tuned", "full"),
            f"pinned {fastest}": ("tuned", fastest)}
        if "default" in servers:
            policies["adaptive, default flags"] = ("default", None)
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in policies}
        names = list(policies)
        for i, load in enumerate(loads):
            order = names[i % len(names):] + names[:i % len(names)]
            for policy in order:
                srv, variant = policies[policy]
                for _, murl in servers.values():
                    wait_idle(murl)
                rate = load * capacity
                res = run_point(servers[srv][0], family_dir,
                                out / policy_dir(policy) / f"{load:g}x", rate, args.seconds,
                                budget, images, seed=i, variant=variant, extra=extra)
                run = res["runs"][0]
                run["load"] = load
                runs[policy].append(run)
                top = next(iter(run["share"].items()), ("-", 0))
                log.info("%4.1fx (%6.1f/s) %-24s attainment %5.1f%%  goodput %6.1f/s  p99 %s ms  "
                         "accuracy %s  errors %d  most used %s (%.0f%%)", load, rate, policy,
                         100 * run["attainment"], run["goodput_rps"], run["latency_ms"]["p99"],
                         "-" if run["accuracy"] is None else f"{100 * run['accuracy']:.2f}%",
                         run["errors"], top[0], 100 * top[1])
    for policy in runs:
        runs[policy].sort(key=lambda r: r["load"])
    summary = {
        "started": started, "seconds_total": round(time.perf_counter() - t_start, 1),
        "family": fam.name, "family_dir": os.path.relpath(family_dir, ROOT),
        "host": host_span(load_avg_start),
        "calibration": {"images_per_request": images, "full_idle_ms": {
            "p50": round(p50, 3), "p95": round(p95, 3), "p99": round(p99, 3)},
            "fastest": fastest, "fastest_idle_p50_ms": round(float(np.median(idle_fastest)), 3),
            "capacity_rps": round(capacity, 2), "budget_ms": budget,
            "seconds_per_point": args.seconds, "deadline_is_budget": not args.loose_deadline,
            "serve_args": args.serve_args,
            "server_variants": [
                {"name": v.name, "accuracy": v.accuracy, "predicted_p50_ms": v.predicted_p50_ms,
                 "predicted_p95_ms": v.predicted_p95_ms} for v in table]},
        "policies": {p: {"variant": v, "serve_args": args.serve_args if srv == "tuned" else "",
                         "dir": policy_dir(p)} for p, (srv, v) in policies.items()},
        "runs": runs,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("policy comparison written to %s (%.0f s)", out / "summary.json",
             summary["seconds_total"])


if __name__ == "__main__":
    main()
