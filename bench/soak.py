"""Overload soak: a `serve` process offered several times its capacity for a minute.

Measures, against one `adaptive-inference serve --on-miss reject` process:

1. idle latency (median of sequential requests) and capacity (answers/s of a closed loop with a
   few concurrent clients) for one request shape;
2. a soak: open-loop arrivals at ``--factor`` × capacity for ``--seconds``, each request with its
   budget and a gRPC deadline of 2 × budget + 50 ms (as `AdaptiveClient`); meanwhile health checks
   every 0.5 s and the server's RSS every second;
3. recovery: sequential requests after the load stops until the median of the last five is back
   within 1.5 × the idle latency.

By default it builds the integration tests' serving family (untrained; its ``slow`` variant costs
milliseconds per image, so compute, not the gRPC stack, is what saturates) and pins ``slow`` with
8 images per request. Prints a markdown report (``--json FILE`` for the raw figures).

    .venv/bin/python bench/soak.py [--family DIR --variant NAME] [--seconds 60] [--factor 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.integration.families builds the default family

from client import AdaptiveClient  # noqa: E402
from client.client import build_request  # noqa: E402
from client.process import LISTENING, SERVING, ServerProcess  # noqa: E402
from compression.core.family import load_family  # noqa: E402
from protos.generated import grpc_service_pb2_grpc  # noqa: E402


def closed_loop_rps(target: str, req: Any, workers: int, seconds: float, timeout: float) -> float:
    """Answers per second with ``workers`` clients each sending the next request on an answer."""
    done = Counter[str]()
    stop = time.perf_counter() + seconds

    def work() -> None:
        with grpc.insecure_channel(target) as ch:
            infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer
            while time.perf_counter() < stop:
                try:
                    infer(req, timeout=timeout)
                    done["OK"] += 1
                except grpc.RpcError as exc:
                    done[exc.code().name] += 1

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done["OK"] / seconds


def sequential_ms(c: AdaptiveClient, x: np.ndarray, variant: str | None, n: int) -> list[float]:
    return [c.infer(x, variant=variant, budget_ms=5000).latency_ms for _ in range(n)]


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


def soak(target: str, req: Any, rate: float, seconds: float, timeout: float
         ) -> list[tuple[str, float]]:
    """Open-loop arrivals at ``rate`` for ``seconds``; returns (status, ms) per request."""
    outcomes: list[tuple[str, float]] = []

    def recorder(started: float) -> Any:
        def done(call: grpc.Future) -> None:
            outcomes.append((call.code().name, (time.perf_counter() - started) * 1e3))
        return done

    with grpc.insecure_channel(target) as ch:
        infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer
        calls = []
        t0 = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            call = infer.future(req, timeout=timeout)
            call.add_done_callback(recorder(time.perf_counter()))
            calls.append(call)
        for call in calls:
            call.exception()  # wait for every answer
    return outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", help="family dir (default: the tests' serving family, built)")
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
            from tests.integration.families import serving_family_at

            family = serving_family_at(Path(tmp) / "family")
        name = load_family(family).name
        proc = ServerProcess([str(family), "--port", "0", "--metrics-port", "-1", "--threads",
                              "2", "--on-miss", "reject", "--max-queue", str(args.max_queue)])
        try:
            port = proc.port(LISTENING)
            proc.wait_for(SERVING)
            target = f"127.0.0.1:{port}"
            shape = load_family(family).input_shape
            x = np.zeros((args.images, *shape), np.float32)
            req = build_request(name, x, budget_ms=args.budget_ms, variant=variant)
            timeout = 2 * args.budget_ms / 1e3 + 0.05
            with AdaptiveClient(target, model=name) as c:
                sequential_ms(c, x, variant, 20)  # warm-up
                idle = statistics.median(sequential_ms(c, x, variant, 30))
            capacity = closed_loop_rps(target, req, workers=4, seconds=5.0, timeout=timeout)
            rate = args.factor * capacity
            sampler = Sampler(target, proc.proc.pid)
            rss_start = sampler.proc.memory_info().rss
            sampler.start()
            t_soak = time.perf_counter()
            outcomes = soak(target, req, rate, args.seconds, timeout)
            soak_s = time.perf_counter() - t_soak
            load_end = time.perf_counter()
            recovery_s: float | None = None
            recent: list[float] = []
            with AdaptiveClient(target, model=name) as c:
                while time.perf_counter() - load_end < 60:
                    recent = (recent + sequential_ms(c, x, variant, 1))[-5:]
                    if len(recent) == 5 and statistics.median(recent) <= 1.5 * idle:
                        recovery_s = time.perf_counter() - load_end
                        break
                after = statistics.median(sequential_ms(c, x, variant, 30))
            sampler.stop.set()
            sampler.join()
            rss_end = sampler.proc.memory_info().rss
        finally:
            proc.stop()

    codes = Counter(code for code, _ in outcomes)
    ok_ms = [ms for code, ms in outcomes if code == "OK"]
    refused_ms = [ms for code, ms in outcomes if code == "RESOURCE_EXHAUSTED"]
    health_ok = sum(1 for s, _ in sampler.health if s == "SERVING")
    figures = {
        "variant": variant or "router", "images": args.images, "budget_ms": args.budget_ms,
        "idle_p50_ms": idle, "capacity_rps": capacity, "offered_rps": rate,
        "soak_s": soak_s, "requests": len(outcomes), "codes": dict(codes),
        "answered_rps": codes["OK"] / soak_s,
        "ok_p50_ms": float(np.percentile(ok_ms, 50)) if ok_ms else None,
        "ok_p99_ms": float(np.percentile(ok_ms, 99)) if ok_ms else None,
        "refused_p50_ms": float(np.percentile(refused_ms, 50)) if refused_ms else None,
        "health_checks": len(sampler.health), "health_serving": health_ok,
        "health_max_ms": max(ms for _, ms in sampler.health) if sampler.health else None,
        "rss_start_mib": rss_start / 2**20, "rss_end_mib": rss_end / 2**20,
        "rss_max_mib": max([*sampler.rss, rss_end]) / 2**20,
        "rss_growth": rss_end / rss_start - 1,
        "recovery_s": recovery_s, "after_p50_ms": after,
        "load_average": list(psutil.getloadavg()),
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
        ("capacity (closed loop, 4 clients)", f"{f['capacity_rps']:.1f} requests/s"),
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
        ("load average (1, 5, 15 min)", ", ".join(f"{v:.1f}" for v in f["load_average"])),
    ]
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])

if __name__ == "__main__":
    main()
