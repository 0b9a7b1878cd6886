"""What an unauthenticated peer can cost the server: /metrics attacks and token-less gRPC calls.

Runs `adaptive-inference serve` as its own process and reports, from ``/proc/<pid>/status``
(threads, VmRSS, VmHWM) and from timed inference requests:

* metrics: inference p50/p99 idle; with ``--half-open`` connections to /metrics that never finish
  their request (threads held, a fresh scrape still answered?); the worst latency while they are
  all closed at once; and while ``--flooders`` processes GET /metrics back to back.
* auth (``--auth-token-file``): an unknown method without a token; ``--bodies`` bodies of
  ``--body-mb`` MiB without a token, all at once (to a refused method, and to the open health
  Check); ``--watches`` health Watch streams without a
  token; Watch streams with the token up to past the server's cap.

    .venv/bin/python bench/attack.py [--family families/mnist5k] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import socket
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import AdaptiveClient
from client.process import METRICS, SERVING, ServerProcess
from client.results import host_info

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "bench-token-0123456789"


def status(pid: int) -> dict[str, int]:
    """Threads, VmRSS and VmHWM (MiB) of ``pid``."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return {"threads": int(fields["Threads"]), "rss_mib": int(fields["VmRSS"].split()[0]) // 1024,
            "hwm_mib": int(fields["VmHWM"].split()[0]) // 1024}


def timed(client: AdaptiveClient, x: np.ndarray, n: int) -> dict[str, float]:
    """p50/p99/max of ``n`` sequential requests, ms; failures counted."""
    ms: list[float] = []
    failed = 0
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            client.infer(x, timeout=30)
        except Exception:
            failed += 1
        ms.append((time.perf_counter() - t0) * 1e3)
    a = np.array(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3),
            "max_ms": round(float(a.max()), 1), "n": n, "failed": failed}


def scrape(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status == 200 and b"adaptive_requests_total" in r.read()
    except OSError:
        return False


def flood(url: str, until: float, counter: Any) -> None:
    """One flooder process: GET /metrics back to back until ``until`` (time.time())."""
    while time.time() < until:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=10).read()
            with counter.get_lock():
                counter.value += 1


def start(stack: contextlib.ExitStack, family: Path, flags: list[str]) -> tuple[ServerProcess,
                                                                                str, str]:
    proc = stack.enter_context(ServerProcess(
        [str(family), "--port", "0", "--metrics-port", "0", *flags]))
    target = f"127.0.0.1:{proc.port()}"
    url = f"http://127.0.0.1:{int(proc.wait_for(METRICS)[0].group(1))}/metrics"
    proc.wait_for(SERVING, timeout=300)
    return proc, target, url


def metrics_attack(family: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    x = np.random.default_rng(0).random((1, 1, 28, 28), dtype=np.float32)
    with contextlib.ExitStack() as stack:
        proc, target, url = start(stack, family, [])
        pid = proc.proc.pid
        client = stack.enter_context(AdaptiveClient(target))
        timed(client, x, 200)  # warm the channel
        out["idle"] = {**timed(client, x, args.requests), **status(pid)}
        port = int(url.split(":")[2].split("/")[0])
        socks = []
        for _ in range(args.half_open):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
            socks.append(s)
        time.sleep(1.0)
        held = status(pid)
        fresh = scrape(url)
        out["half_open"] = {"connections": args.half_open, "fresh_scrape_ok": fresh,
                            **timed(client, x, args.requests), **held}
        # Close them all at once while requests run: the worst single request is the stall.
        window: dict[str, float] = {}
        closer = threading.Timer(0.3, lambda: [s.close() for s in socks])
        closer.start()
        window = timed(client, x, args.requests)
        closer.join()
        out["close_all"] = {**window, **status(pid)}
        ctx = mp.get_context("spawn")
        counter = ctx.Value("i", 0)
        until = time.time() + 600
        floods = [ctx.Process(target=flood, args=(url, until, counter), daemon=True)
                  for _ in range(args.flooders)]
        for p in floods:
            p.start()
        time.sleep(1.0)
        t0, c0 = time.perf_counter(), counter.value
        res = timed(client, x, args.requests)
        rate = (counter.value - c0) / (time.perf_counter() - t0)
        for p in floods:
            p.terminate()
            p.join()
        out["get_flood"] = {"flooders": args.flooders, "scrapes_per_s": round(rate, 1), **res,
                            **status(pid)}
    return out


def auth_attack(family: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        tok = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "token"
        tok.write_text(TOKEN)
        proc, target, _ = start(stack, family, ["--auth-token-file", str(tok)])
        pid = proc.proc.pid
        ch = stack.enter_context(grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", -1)]))
        try:
            ch.unary_unary("/no.Such/Method")(b"", timeout=10)
            out["unknown_method"] = "OK"
        except grpc.RpcError as exc:
            out["unknown_method"] = exc.code().name
        before = status(pid)
        body = b"\0" * (args.body_mb << 20)
        infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        t0 = time.perf_counter()
        futs = [infer.future(body, timeout=60) for _ in range(args.bodies)]
        codes = Counter(f.exception().code().name if f.exception() else "OK" for f in futs)
        out["bodies"] = {"n": args.bodies, "mib_each": args.body_mb, "codes": dict(codes),
                         "seconds": round(time.perf_counter() - t0, 2),
                         "before": before, "after": status(pid)}
        # Health Check stays open without a token, and is unary: what its bodies cost.
        before = status(pid)
        check = ch.unary_unary("/grpc.health.v1.Health/Check")
        futs = [check.future(body, timeout=60) for _ in range(args.bodies)]
        codes = Counter(f.exception().code().name if f.exception() else "OK" for f in futs)
        out["check_bodies"] = {"n": args.bodies, "mib_each": args.body_mb, "codes": dict(codes),
                               "before": before, "after": status(pid)}
        out["watch_no_token"] = watches(target, pid, args.watches, ())
        out["watch_token"] = watches(target, pid, args.watches_token,
                                     (("authorization", f"Bearer {TOKEN}"),))
    return out


def watches(target: str, pid: int, n: int, metadata: tuple[tuple[str, str], ...]
            ) -> dict[str, Any]:
    """Open ``n`` Watch streams (100 per channel) and hold them; how many ended at once, how."""
    before = status(pid)
    chans = [grpc.insecure_channel(target) for _ in range((n + 99) // 100)]
    calls = [health_pb2_grpc.HealthStub(chans[i // 100]).Watch(
        health_pb2.HealthCheckRequest(), timeout=120, metadata=metadata) for i in range(n)]
    time.sleep(3.0)
    held = status(pid)
    ended = Counter(c.code().name for c in calls if c.done())
    for c in calls:
        c.cancel()
    for ch in chans:
        ch.close()
    return {"n": n, "refused": dict(ended), "open": n - sum(ended.values()),
            "before": before, "held": held}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="families/mnist5k")
    ap.add_argument("--requests", type=int, default=1000, help="timed requests per phase")
    ap.add_argument("--half-open", type=int, default=1000)
    ap.add_argument("--flooders", type=int, default=2, help="processes GETting /metrics")
    ap.add_argument("--bodies", type=int, default=8)
    ap.add_argument("--body-mb", type=int, default=60)
    ap.add_argument("--watches", type=int, default=10000, help="Watch streams without a token")
    ap.add_argument("--watches-token", type=int, default=1200, help="Watch streams with it")
    ap.add_argument("--only", choices=["metrics", "auth"])
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    family = ROOT / args.family
    res: dict[str, Any] = {"host": host_info()}
    if args.only in (None, "metrics"):
        res["metrics"] = metrics_attack(family, args)
    if args.only in (None, "auth"):
        res["auth"] = auth_attack(family, args)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
