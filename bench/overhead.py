"""Serving overhead: end-to-end p50 of the fastest variant over gRPC minus its in-process ONNX
Runtime time, beside a bare gRPC echo with the same payloads, measured in the same run.

Every server runs as its own process (`adaptive-inference serve`, bench/echo_server.py); one
client sends sequential requests, alternating between them in blocks so all see the same machine
load. Target: overhead ≤ 1.5 × echo p50. Besides the defaults: a server with every batch in the
thread pool (``--inline-below-ms 0``), one reading its sockets on gRPC's EventEngine pool
(``--grpc-io event-engine``, gRPC's own default), and a second echo reading them as ``serve``'s
default does (`server.grpc_io`). (The timing loop is its own, not `client.loadgen`'s: it
alternates raw stubs, some of them not KServe, and times nothing but the call.)

    .venv/bin/python bench/overhead.py [--family DIR] [--requests 3000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from client.client import build_request
from client.process import SERVING, ServerProcess
from client.results import host_info
from compression.core.family import load_family
from compression.core.ort import session, time_ms
from protos.generated import grpc_service_pb2_grpc
from server import grpc_io
from server.settings import ServeOptions, Settings

ROOT = Path(__file__).resolve().parents[1]


def start_echo(response_bytes: int, io: str | None = None) -> tuple[subprocess.Popen[str], int]:
    """bench/echo_server.py and its port: bare gRPC, or reading its sockets as ``serve
    --grpc-io IO`` does (`server.grpc_io`)."""
    env = dict(os.environ)
    env.pop(grpc_io.ENV, None)  # bare: gRPC's defaults, whatever this process was given
    if io is not None:
        env[grpc_io.ENV] = grpc_io.experiments(io, None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "echo_server.py"),
                             str(response_bytes)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    m = re.match(r"port (\d+)", proc.stdout.readline())
    if m is None:
        raise RuntimeError("echo server did not print its port")
    return proc, int(m.group(1))


def ort_p50_ms(family_dir: Path, variant: str, x: np.ndarray, n: int) -> float:
    """The bare ONNX Runtime call, as the server's runners make it (`compression.core.ort`)."""
    sess = session(load_family(family_dir).graph(variant))
    name = sess.get_inputs()[0].name
    return time_ms(lambda: sess.run(None, {name: x}), warmup=50, iters=n, max_seconds=60.0)["p50"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="families/quick",
                    help="family dir (built from configs/quick.toml if missing)")
    ap.add_argument("--requests", type=int, default=3000, help="per server")
    ap.add_argument("--block", type=int, default=250, help="requests per alternation block")
    ap.add_argument("--json", help="also write the figures to this file (for docs/results.md)")
    args = ap.parse_args()
    family_dir = ROOT / args.family
    if not (family_dir / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "client.cli", "build", "configs/quick.toml",
                        "--out", str(family_dir), "--no-progress"], cwd=ROOT, check=True)
    fam = load_family(family_dir)
    fastest = fam.fastest().name
    x = np.random.default_rng(0).random((1, *fam.input_shape), dtype=np.float32)
    request = build_request(fam.name, x, variant=fastest, budget_ms=1000.0)

    serve = [str(family_dir), "--port", "0", "--metrics-port", "-1"]
    # The thread pool for every batch, the defaults (small batches on the event loop:
    # `--inline-below-ms`), and the defaults with sockets read as gRPC's own default does.
    procs = {"pool": ServerProcess([*serve, "--inline-below-ms", "0"]),
             "inline": ServerProcess(serve),
             "event_engine": ServerProcess([*serve, "--grpc-io", "event-engine"])}
    ports = {k: p.port() for k, p in procs.items()}
    for p in procs.values():
        p.wait_for(SERVING)
    with grpc.insecure_channel(f"127.0.0.1:{ports['pool']}") as ch:
        probe = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request)
    # The bare echo is the baseline; the second reads its sockets as `serve`'s default does.
    echoes = {"echo": start_echo(probe.ByteSize()),
              "echo_poller": start_echo(probe.ByteSize(), ServeOptions.grpc_io)}
    raw = request.SerializeToString()
    channels = {k: grpc.insecure_channel(f"127.0.0.1:{port}") for k, port in ports.items()}
    calls = {k: (grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer, request)
             for k, ch in channels.items()}
    for k, (_, port) in echoes.items():
        channels[k] = grpc.insecure_channel(f"127.0.0.1:{port}")
        calls[k] = (channels[k].unary_unary("/bench.Echo/Call"), raw)
    times: dict[str, list[float]] = {k: [] for k in calls}
    try:
        for fn, payload in calls.values():  # warm every connection
            for _ in range(200):
                fn(payload)
        while len(times["echo"]) < args.requests:  # blocks in turn: same machine load for all
            for k, (fn, payload) in calls.items():
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    resp = fn(payload)
                    times[k].append(time.perf_counter() - t0)
                if k in procs:
                    assert resp.model_version == fastest
    finally:
        for ch in channels.values():
            ch.close()
        for p in procs.values():
            p.stop()
        for proc, _ in echoes.values():
            proc.terminate()
            proc.wait(timeout=30)
    ort_ms = ort_p50_ms(family_dir, fastest, x, args.requests)
    echo_p50 = float(np.percentile(times["echo"], 50) * 1e3)
    host = host_info()
    print(f"family {fam.name!r}, fastest variant {fastest!r}, batch 1, "
          f"{args.requests} sequential requests per server, {host['cpus']} cores, "
          f"load average {host['load_average'][0]:.1f} at the end")
    print(f"  in-process ORT p50            {ort_ms:8.3f} ms")
    print(f"  bare gRPC echo p50            {echo_p50:8.3f} ms  (p99 "
          f"{np.percentile(times['echo'], 99) * 1e3:.3f} ms)")
    echo_poller_p50 = float(np.percentile(times["echo_poller"], 50) * 1e3)
    print(f"  echo, --grpc-io {ServeOptions.grpc_io:<14}{echo_poller_p50:8.3f} ms  (p99 "
          f"{np.percentile(times['echo_poller'], 99) * 1e3:.3f} ms)")
    figures: dict[str, object] = {
        "family": fam.name, "variant": fastest, "requests": args.requests,
        "cores": host["cpus"], "load_average": host["load_average"][0],
        "ort_p50_ms": round(ort_ms, 4), "echo_p50_ms": round(echo_p50, 4),
        "echo_p99_ms": round(float(np.percentile(times["echo"], 99) * 1e3), 4),
        "echo_poller_p50_ms": round(echo_poller_p50, 4),
        "inline_below_ms": Settings().inline_below_ms, "grpc_io": ServeOptions.grpc_io}
    for k, label in (("pool", "server, --inline-below-ms 0"),
                     ("inline", f"server, defaults ({Settings().inline_below_ms:g})"),
                     ("event_engine", "server, --grpc-io event-engine")):
        p50 = float(np.percentile(times[k], 50) * 1e3)
        overhead = p50 - ort_ms
        print(f"  {label:<30}{p50:8.3f} ms  (p99 {np.percentile(times[k], 99) * 1e3:.3f} ms)"
              f"  overhead {overhead:.3f} ms = {overhead / echo_p50:.2f}x echo (target ≤ 1.5x)")
        figures[k] = {"p50_ms": round(p50, 4),
                      "p99_ms": round(float(np.percentile(times[k], 99) * 1e3), 4),
                      "overhead_ms": round(overhead, 4), "ratio": round(overhead / echo_p50, 3)}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
