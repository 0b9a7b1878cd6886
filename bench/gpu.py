"""The GPU device check (issue 13, item 5): one run on a machine with an NVIDIA GPU that measures
the bare model on CUDA, the bare gRPC round trip, the served GPU lanes and the router's placement
between CPU and GPU under load, and writes every figure to one JSON that ``bench/report.py``
renders as the "GPU serving" section of ``docs/results.md``.

On the device machine (repo root, PYTHONPATH = the repo root plus the carried wheels, the family
carried under families/):

    PYTHONUNBUFFERED=1 python3 bench/gpu.py --family families/mnist5k --json "$OUT/gpu.json" \\
        --logs "$OUT"

Here, on the CPU, every phase for a few seconds (the GPU lanes run the same torch runner on the
CPU): ``.venv/bin/python bench/gpu.py --quick --accelerator cpu --json /tmp/gpu-quick.json``.

Phases, in this order, each in its own try/except (a failure is recorded in the JSON under
``phases`` and the run goes on), the JSON rewritten after each so a run cut short still leaves
what it measured; ``--max-seconds`` (default 390) skips phases that no longer fit:

1. ``host``: `client.results.host_info`, nvidia-smi's name/driver/memory, torch and CUDA versions,
   ONNX Runtime's providers, `server.torch_runner.cuda_problem()`.
2. ``bare``: `full`'s graph in torch (`compression.core.torch_form.to_torch`), one CUDA graph per
   batch (1, 32, 256) captured here and replayed, fp32 and fp16 (median of blocks of replays,
   timed with torch.cuda.synchronize at both ends of a block); the same batches through
   `server.torch_runner.TorchGraphRunner` (numpy in, numpy out: what one served batch costs on
   the device, copies included); eager batch 1. The issue's anchor (fp32): batch 1 0.090 ms,
   batch 32 0.186 ms, batch 256 0.83 ms (308k images/s).
3. ``echo``: bench/echo_server.py answering a batch-1-sized response; p50 of sequential calls.
4. ``cuda`` (``serve --device cuda``, ``--workers 1``): batch-1 latency pinned to the GPU lane of
   `full` (``cuda:full``, found in the server's candidate table), sequential, in blocks that
   alternate with the echo server so both see the same machine; then served images/s at 32 and
   256 images per request pinned to that lane, closed loop from ``--clients`` client processes
   (spawned once, each with its own connections: `client.loadgen.closed_loop`; each error
   code's first message is kept). The server's own queue and compute p50 split the batch-1
   round trip. ``--profile``: py-spy records the server through 3 s of batch-1 calls and 3 s
   of 256-image load (``profile-cuda-*.txt`` in ``--logs``, collapsed stacks).
5. ``placement``: a rate that saturates the CPU lanes (``--rate``, else: on a ``serve --device
   cpu`` of its own, its capacity without budgets, then open loops doubling from there until
   fewer than 75 % of the requests end in budget); then fresh ``serve --device auto`` and
   ``serve --device cpu`` (default flags otherwise; ``--placement-workers`` processes each),
   the same open loop against each (Poisson, budgets uniform 5-20 ms,
   ``--placement-images`` test images per request (8), gRPC deadline = budget;
   `client.loadgen.run_open_loop` in as many client processes as the rate needs): in-budget
   share, accuracy and the share of answers per device (a ``cuda:`` candidate answered on a GPU
   lane).
6. ``cuda-workers`` (``serve --device cuda --workers N``, the last of ``--workers-list``): the
   throughput of phase 4 again. After placement: it only raises a figure phase 4 already gives.
7. ``targets``: the issue's targets evaluated by ``bench/report.py``'s `gpu_targets` and printed.

Servers listen on 127.0.0.1 only and are always stopped (SIGTERM, then SIGKILL) when their phase
ends, also on failure or Ctrl-C; client processes are terminated with their pool.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import multiprocessing
import multiprocessing.pool
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from client.budgets import BudgetSpec
from client.loadgen import (
    Record,
    RunConfig,
    RunOutput,
    TestData,
    closed_loop,
    run_open_loop,
)
from client.process import LISTENING, METRICS, SERVING, WORKERS, ServerProcess
from protos import wire

# A sibling under bench/ (a script's own folder is on sys.path), not a package.
from overhead import start_echo  # isort: skip

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 1
# The anchor, measured on the device machine: `full` in torch with CUDA graphs, fp32.
ANCHOR_GRAPH_MS = {"1": 0.090, "32": 0.186, "256": 0.83}
ECHO_METHOD = "/bench.Echo/Call"  # bench/echo_server.py's one method
PLACEMENT_IMAGES = 8
PLACEMENT_BUDGET = "uniform:5:20"
RAMP_STOP = 0.75  # the ramp stops at the first rate where CPU-only keeps less in budget (< 80 %)
OPEN_LOOP_RATE_PER_PROCESS = 600.0  # one asyncio client keeps its arrivals on time below this


@dataclass(frozen=True)
class Plan:
    """How long and how hard each phase measures (``--quick``: seconds on a CPU)."""

    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    bare_seconds: float  # per (dtype, batch) measurement
    sequential: int  # batch-1 requests per server (and as many to the echo)
    block: int  # sequential requests per alternation block
    throughput_seconds: float
    warm_seconds: float  # closed loop before each measured window, unmeasured
    capacity_seconds: float
    ramp_seconds: float  # per step of the ramp that finds a rate saturating the CPU lanes
    ramp_steps: int
    open_loop_seconds: float
    clients: int
    concurrency: int  # requests in flight per client process (throughput)
    capacity_concurrency: int
    start_timeout: float  # for one server to be SERVING


FULL = Plan(batches=(1, 32, 256), dtypes=("fp32", "fp16"), bare_seconds=1.0, sequential=2000,
            block=250, throughput_seconds=4.0, warm_seconds=1.0, capacity_seconds=3.0,
            ramp_seconds=3.0, ramp_steps=6, open_loop_seconds=8.0, clients=6, concurrency=4,
            capacity_concurrency=8, start_timeout=240.0)
QUICK = Plan(batches=(1, 32), dtypes=("fp32", "fp16"), bare_seconds=0.3, sequential=200,
             block=50, throughput_seconds=1.5, warm_seconds=0.3, capacity_seconds=1.5,
             ramp_seconds=1.5, ramp_steps=3, open_loop_seconds=2.0, clients=2, concurrency=2,
             capacity_concurrency=4, start_timeout=240.0)


# --- output -------------------------------------------------------------------------------------

class Run:
    """The JSON being built: every phase's figures, its status and time; rewritten after each."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        self.path = path
        self.t0 = time.monotonic()
        self.max_seconds = float(args.max_seconds)
        self.data: dict[str, Any] = {
            "schema": SCHEMA,
            "command": shlex.join(["python3", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "quick": bool(args.quick), "family_dir": args.family,
            "accelerator": args.accelerator, "served_dtype": args.gpu_dtype,
            "phases": {}}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.max_seconds - self.elapsed()

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)

    def write(self) -> None:
        self.data["seconds_total"] = round(self.elapsed(), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)  # never a half-written JSON, even if the run is killed here

    def phase(self, name: str, needs_s: float, fn: Callable[[], None]) -> None:
        """Run one phase: skipped when fewer than ``needs_s`` seconds are left, any exception
        recorded (last lines of its traceback) and the run goes on; the JSON written after."""
        record: dict[str, Any] = {"status": "skipped"}
        self.data["phases"][name] = record
        if self.left() < needs_s:
            record["reason"] = f"{self.left():.0f} s left of --max-seconds, this phase needs " \
                               f"about {needs_s:.0f} s"
            self.say(f"{name}: SKIPPED ({record['reason']})")
            self.write()
            return
        self.say(f"{name}: start")
        t = time.monotonic()
        try:
            fn()
            record["status"] = "ok"
        except BaseException as exc:  # KeyboardInterrupt/SystemExit too: record, then re-raise
            record["status"] = "error"
            record["error"] = f"{type(exc).__name__}: {exc}"[:4000]
            record["traceback"] = traceback.format_exc().splitlines()[-12:]
            self.say(f"{name}: ERROR {record['error'][:600]}")
            if not isinstance(exc, Exception):
                raise
        finally:
            record["seconds"] = round(time.monotonic() - t, 1)
            self.write()
        self.say(f"{name}: done in {record['seconds']} s")


def attempt(out: dict[str, Any], key: str, fn: Callable[[], Any]) -> None:
    """``out[key] = fn()``, or ``{"error": ...}``: one failed measurement does not lose the
    others of its phase."""
    try:
        out[key] = fn()
    except Exception as exc:
        out[key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(f"    {key}: ERROR {type(exc).__name__}: {str(exc)[:400]}", flush=True)


def device_shares(records: Sequence[Record]) -> dict[str, Any]:
    """Answers per device, as counts and as shares of the answered requests."""
    answered = [r for r in records if r.status == "OK"]
    counts = collections.Counter(wire.device_of(r.candidate) if r.candidate else "?"
                                 for r in answered)
    return {"answers": dict(counts.most_common()),
            "share": {d: round(n / len(answered), 5) for d, n in counts.most_common()}
            if answered else {}}


def ms_stats(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "mean_ms": round(float(ms.mean()), 4), "requests": len(ms)}


# --- phase 1: the host --------------------------------------------------------------------------

def nvidia_smi() -> dict[str, Any]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not on PATH"}
    fields = "name,driver_version,memory.total"
    out = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip()[:500]}
    gpus = [dict(zip(fields.split(","), (c.strip() for c in line.split(",")), strict=False))
            for line in out.stdout.strip().splitlines()]
    return {"gpus": gpus}


def phase_host(run: Run) -> None:
    from client.results import host_info

    host: dict[str, Any] = host_info()
    run.data["host"] = host
    attempt(host, "nvidia_smi", nvidia_smi)

    def torch_info() -> dict[str, Any]:
        import torch

        info: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda,
                                "cuda_available": torch.cuda.is_available()}
        if info["cuda_available"]:
            info["device_name"] = torch.cuda.get_device_name(0)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        return info

    def ort_info() -> dict[str, Any]:
        import onnxruntime

        return {"version": onnxruntime.__version__,
                "providers": onnxruntime.get_available_providers()}

    def grpc_version() -> str:
        import grpc

        return str(grpc.__version__)

    def problem() -> str | None:
        from server.torch_runner import cuda_problem

        return cuda_problem()

    attempt(host, "torch", torch_info)
    attempt(host, "onnxruntime", ort_info)
    attempt(host, "grpc", grpc_version)
    attempt(host, "cuda_problem", problem)
    gpu = host.get("torch", {}).get("device_name") or "no CUDA device"
    run.say(f"host: {host['cpus']} cores, {gpu}, torch {host.get('torch', {}).get('version')}, "
            f"cuda_problem={host.get('cuda_problem')!r}")


# --- phase 2: the bare model --------------------------------------------------------------------

def time_calls(fn: Callable[[], object], sync: Callable[[], object], seconds: float,
               warmup: int = 20) -> dict[str, float]:
    """Milliseconds per call of ``fn``: blocks of k calls with ``sync`` at the end of each (k
    such that a block lasts ≥ 2 ms, so the synchronise and the timer cost nothing per call);
    the median, p10 and p90 of the blocks' per-call times."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = time.perf_counter() - t0
    k = max(1, min(2000, int(0.002 / max(one, 1e-7))))
    per_call: list[float] = []
    end = time.perf_counter() + seconds
    while (time.perf_counter() < end or len(per_call) < 5) and len(per_call) < 5000:
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        sync()
        per_call.append((time.perf_counter() - t0) / k)
    ms = np.asarray(per_call) * 1e3
    return {"ms_p50": round(float(np.median(ms)), 5),
            "ms_p10": round(float(np.percentile(ms, 10)), 5),
            "ms_p90": round(float(np.percentile(ms, 90)), 5),
            "calls": k * len(per_call), "calls_per_block": k}


class Bare:
    """`full` on one device in torch: the model alone (a CUDA graph per batch, replayed) and the
    server's runner (numpy in, numpy out)."""

    def __init__(self, run: Run, family_dir: Path, accelerator: str, plan: Plan) -> None:
        import torch

        from compression.core.family import load_family

        self.torch, self.run, self.plan = torch, run, plan
        if accelerator == "cpu":
            # The CPU stand-in on one thread: a shared host's other work turns torch's default
            # thread pool into noise (80 ms instead of 1.3 ms for batch 1 on 2 busy cores).
            torch.set_num_threads(1)
        fam = load_family(family_dir)
        self.graph = fam.graph("full")
        self.shape = tuple(fam.input_shape)
        self.cuda = accelerator == "cuda"
        self.accelerator = accelerator
        self.dev = torch.device(accelerator)
        self.tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        self.out: dict[str, Any] = {
            "variant": "full", "device": accelerator,
            "mode": "cuda-graph replay (the runner's capture settings: cuDNN benchmark, fp32 "
                    "without TF32)" if self.cuda else "eager (no CUDA graphs: cpu, one thread)",
            "macs": fam.variant("full").macs, "anchor_ms": ANCHOR_GRAPH_MS}

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def graph_timing(self, module: Any, dtype: str, batch: int) -> dict[str, float]:
        """The model alone: captured once as a CUDA graph at this batch and replayed (on the
        CPU: the eager forward)."""
        torch = self.torch
        x = torch.rand((batch, *self.shape), device=self.dev).to(self.tdtype[dtype])
        with torch.no_grad():
            if not self.cuda:
                res = time_calls(lambda: module(x), self.sync, self.plan.bare_seconds, warmup=3)
            else:
                # The runner's capture settings (cuDNN autotuning; fp32 without TF32), so the
                # bare figure is the computation the GPU lanes serve, not a faster one.
                from server.torch_runner import _capture_flags

                with _capture_flags(ieee_fp32=dtype == "fp32"):
                    # warm-up on a side stream before the capture, as torch.cuda.graphs asks
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(3):
                            module(x)
                    torch.cuda.current_stream().wait_stream(side)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        module(x)
                res = time_calls(g.replay, self.sync, self.plan.bare_seconds)
        res["images_per_s"] = round(batch / (res["ms_p50"] / 1e3), 1)
        return res

    def eager_b1(self, module: Any) -> dict[str, float]:
        """Batch 1, eager, waiting for each call (the issue's "eager batch 1" figure)."""
        x = self.torch.rand((1, *self.shape), device=self.dev)

        def call() -> None:
            module(x)
            self.sync()

        with self.torch.no_grad():
            return time_calls(call, self.sync, self.plan.bare_seconds, warmup=5)

    def model(self, dtype: str) -> None:
        from compression.core.torch_form import to_torch

        per = self.out[dtype]
        module = to_torch(self.graph).to(self.dev).eval().to(self.tdtype[dtype])
        for b in self.plan.batches:
            def timing(b: int = b) -> dict[str, float]:
                return self.graph_timing(module, dtype, b)

            attempt(per["graph"], str(b), timing)
            r = per["graph"][str(b)]
            if "ms_p50" in r:
                self.run.say(f"  bare graph {dtype} batch {b}: {r['ms_p50']:.4f} ms, "
                             f"{r['images_per_s']:,.0f} images/s")
        if dtype == "fp32":
            attempt(self.out, "eager_b1_fp32", lambda: self.eager_b1(module))

    def runner(self, dtype: str) -> None:
        from server.torch_runner import TorchGraphRunner

        per = self.out[dtype]
        t = time.perf_counter()
        runner = TorchGraphRunner(self.graph, device=self.accelerator, dtype=dtype,
                                  max_batch=max(self.plan.batches))
        runner.warm()  # on cuda: captures one CUDA graph per batch bucket
        per["runner_warm_s"] = round(time.perf_counter() - t, 2)
        rng = np.random.default_rng(0)
        for b in self.plan.batches:
            xb = rng.random((b, *self.shape), dtype=np.float32)

            def timing(xb: np.ndarray = xb, b: int = b) -> dict[str, float]:
                res = time_calls(lambda: runner(xb), lambda: None, self.plan.bare_seconds,
                                 warmup=5)
                res["images_per_s"] = round(b / (res["ms_p50"] / 1e3), 1)
                return res

            attempt(per["runner"], str(b), timing)
            r = per["runner"][str(b)]
            if "ms_p50" in r:
                self.run.say(f"  runner {dtype} batch {b} (numpy in/out): {r['ms_p50']:.4f} ms, "
                             f"{r['images_per_s']:,.0f} images/s")

    def measure(self) -> None:
        self.run.data["bare"] = self.out
        for dtype in self.plan.dtypes:
            self.out[dtype] = {"graph": {}, "runner": {}}
            for part in (self.model, self.runner):
                try:
                    part(dtype)
                except Exception as exc:  # the other part, and the other dtype, still run
                    self.out[dtype][f"{part.__name__}_error"] = \
                        f"{type(exc).__name__}: {exc}"[:2000]
                    self.run.say(f"  {part.__name__} {dtype}: ERROR {type(exc).__name__}: "
                                 f"{str(exc)[:400]}")
                finally:
                    if self.cuda:
                        self.torch.cuda.empty_cache()
            self.run.write()


# --- servers, the echo and client processes -----------------------------------------------------

@dataclass(frozen=True)
class Served:
    proc: ServerProcess
    target: str  # 127.0.0.1:PORT
    label: str
    metrics_url: str | None = None  # http://127.0.0.1:PORT/metrics, where asked for


def start_server(stack: contextlib.ExitStack, run: Run, family_dir: Path, flags: Sequence[str],
                 *, label: str, workers: int, logs: Path, timeout: float,
                 metrics: bool = False) -> Served:
    """``adaptive-inference serve`` on a free loopback port until ``stack`` closes, its log in
    ``logs/gpu-serve-LABEL.log`` (its tail also kept in the JSON); returns once every worker
    said SERVING and the health service agrees. ``metrics``: also its /metrics endpoint."""
    from client.client import AdaptiveClient

    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"gpu-serve-{label}.log"
    args = [str(family_dir), "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", "0" if metrics else "-1",
            "--workers", str(workers), "--grace-s", "2", *flags]
    servers = run.data.setdefault("servers", {})
    info: dict[str, Any] = {"args": args, "log": str(log_path)}
    servers[label] = info
    log_file = stack.enter_context(log_path.open("w"))

    def keep_tail() -> None:  # runs after the server stopped (the stack unwinds in reverse)
        with contextlib.suppress(OSError):
            info["log_tail"] = log_path.read_text(errors="replace").splitlines()[-40:]

    stack.callback(keep_tail)
    t = time.monotonic()
    proc = stack.enter_context(ServerProcess(args, log=log_file, cwd=ROOT))
    port = int(proc.wait_for(WORKERS if workers > 1 else LISTENING, timeout=timeout)[0].group(1))
    metrics_url = (f"http://127.0.0.1:{int(proc.wait_for(METRICS, timeout=timeout)[0].group(1))}"
                   f"/metrics" if metrics else None)
    proc.wait_for(SERVING, count=workers, timeout=max(10.0, timeout - (time.monotonic() - t)))
    target = f"127.0.0.1:{port}"
    with AdaptiveClient(target) as client:
        client.wait_ready(timeout=60)
    info["ready_s"] = round(time.monotonic() - t, 1)
    run.say(f"  serve {label}: SERVING on {target} after {info['ready_s']} s "
            f"({shlex.join(args[1:])})")
    return Served(proc, target, label, metrics_url)


def stop_process(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def response_bytes(model: str, classes: int) -> int:
    """The size of a batch-1 answer from a GPU lane, as `server.codec.encode_infer` builds it: the
    echo server answers as many bytes."""
    from protos.generated import grpc_service_pb2 as pb

    resp = pb.ModelInferResponse(model_name=model, model_version="full")
    out = resp.outputs.add()
    out.name, out.datatype = "logits", "FP32"
    out.shape.extend([1, classes])
    resp.raw_output_contents.append(b"\0" * (4 * classes))
    resp.parameters["variant"].string_param = "full"
    resp.parameters["device"].string_param = "cuda"
    resp.parameters["queue_ms"].double_param = 0.01
    resp.parameters["compute_ms"].double_param = 0.1
    return resp.ByteSize()


def gpu_lane(target: str, variant: str = "full") -> tuple[str, list[str]]:
    """The name of ``variant``'s GPU lane in the server's candidate table (``cuda:full``), and
    the whole table's names; ``cuda:VARIANT`` when the table has none (the pin then fails and
    says so)."""
    from client.client import AdaptiveClient

    with AdaptiveClient(target) as client:
        names = [c.name for c in client.variants()]
    lanes = [n for n in names if wire.device_of(n) != wire.CPU
             and n.partition(wire.DEVICE_SEPARATOR)[2] == variant]
    return (lanes[0] if lanes else wire.placed_name(variant, "cuda")), names


class GpuSampler:
    """nvidia-smi's utilisation and memory every 0.5 s while a measurement runs (on a thread):
    whether the GPU or the front end limits a throughput figure."""

    def __init__(self, enabled: bool) -> None:
        self.exe = shutil.which("nvidia-smi") if enabled else None
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if self.exe is not None:
            self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        assert self.exe is not None
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run([self.exe, "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True,
                                     text=True, timeout=5)
                util, mem = out.stdout.strip().splitlines()[0].split(",")
                self.samples.append((float(util), float(mem)))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return  # no readings: the figure goes without them

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=6)

    def summary(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        util = [u for u, _ in self.samples]
        return {"util_mean_pct": round(statistics.fmean(util), 1), "util_max_pct": max(util),
                "memory_used_mib_max": max(m for _, m in self.samples)}


# What one client process does. Top-level functions: the pool is a spawn pool (no fork of a
# process that holds gRPC channels or a CUDA context), so they are found by import.

@dataclass(frozen=True)
class ClosedJob:
    target: str
    model: str
    images: int
    shape: tuple[int, ...]
    variant: str | None
    budget_ms: float | None
    concurrency: int
    warm_s: float
    start_at: float  # time.time() when every process starts its measured window
    seconds: float


def _closed_job(job: ClosedJob) -> dict[str, Any]:
    x = np.random.default_rng(os.getpid()).random((job.images, *job.shape), dtype=np.float32)
    timeout = 10.0 if job.budget_ms is None else None  # a stuck server cannot hang the run
    # Unmeasured load first: connections open, the lane's batches and caches warm.
    asyncio.run(closed_loop(job.target, job.model, x, concurrency=job.concurrency,
                            seconds=job.warm_s, variant=job.variant, budget_ms=job.budget_ms,
                            timeout_s=timeout))
    time.sleep(max(0.0, job.start_at - time.time()))
    r = asyncio.run(closed_loop(job.target, job.model, x, concurrency=job.concurrency,
                                seconds=job.seconds, variant=job.variant,
                                budget_ms=job.budget_ms, timeout_s=timeout))
    return {"answered": r.answered, "errors": r.errors, "details": r.details,
            "seconds": r.seconds}


def _pid(_: int) -> int:
    time.sleep(0.2)  # long enough that one process cannot take every ping
    return os.getpid()


@dataclass(frozen=True)
class OpenJob:
    target: str
    model: str
    data: TestData
    cfg: RunConfig
    start_at: float


def _open_job(job: OpenJob) -> RunOutput:
    time.sleep(max(0.0, job.start_at - time.time()))
    return asyncio.run(run_open_loop(job.target, job.model, job.data, job.cfg))


class Clients:
    """A pool of spawned client processes, reused by every load measurement of the run."""

    def __init__(self, stack: contextlib.ExitStack, processes: int) -> None:
        self.processes = processes
        ctx = multiprocessing.get_context("spawn")
        self.pool: multiprocessing.pool.Pool = stack.enter_context(ctx.Pool(processes))
        # The pool's __exit__ terminates the children, whatever state they are in. Wait until
        # every process has started (spawn imports take seconds): a job handed to a process that
        # is still importing would start after the others' window, not inside it.
        deadline = time.monotonic() + 120
        pids: set[int] = set()
        while len(pids) < processes and time.monotonic() < deadline:
            pids.update(self.pool.map(_pid, range(processes), chunksize=1))

    def closed(self, target: str, model: str, *, images: int, shape: Sequence[int],
               variant: str | None, budget_ms: float | None, concurrency: int, warm_s: float,
               seconds: float, processes: int | None = None) -> dict[str, Any]:
        """Every process closed-loop against ``target`` over one common window: requests/s
        summed over the processes (each its answers over its own window)."""
        n = processes or self.processes
        start_at = time.time() + warm_s + 2.0  # the processes' warm-ups end before this
        jobs = [ClosedJob(target, model, images, tuple(shape), variant, budget_ms, concurrency,
                          warm_s, start_at, seconds) for _ in range(n)]
        parts = self.pool.map_async(_closed_job, jobs, chunksize=1).get(timeout=warm_s + seconds + 120)
        errors: collections.Counter[str] = collections.Counter()
        details: dict[str, str] = {}
        for p in parts:
            errors.update(p["errors"])
            for code, text in p["details"].items():
                details.setdefault(code, text)
        rps = sum(p["answered"] / p["seconds"] for p in parts if p["seconds"] > 0)
        return {"requests_per_s": round(rps, 2), "images_per_s": round(rps * images, 1),
                "answered": sum(p["answered"] for p in parts), "errors": dict(errors),
                "error_details": details,
                "processes": n, "in_flight": n * concurrency, "seconds": seconds}

    def open(self, target: str, model: str, data: TestData, cfg: RunConfig) -> RunOutput:
        """One open loop at ``cfg.rate`` split over enough processes that each keeps its
        arrivals on time; the records of all, merged."""
        n = max(1, min(self.processes, math.ceil(cfg.rate / OPEN_LOOP_RATE_PER_PROCESS)))
        start_at = time.time() + 2.0
        jobs = [OpenJob(target, model, data,
                        replace(cfg, rate=cfg.rate / n, seed=cfg.seed * 1000 + k), start_at)
                for k in range(n)]
        parts = self.pool.map_async(_open_job, jobs, chunksize=1).get(timeout=cfg.seconds + 180)
        return RunOutput([r for p in parts for r in p.records], max(p.wall_s for p in parts),
                         [lag for p in parts for lag in p.send_lag_ms])


# --- phases 3-5: echo, served GPU lanes ---------------------------------------------------------

def sequential_pair(calls: dict[str, tuple[Callable[[Any], Any], Any]], n: int, block: int
                    ) -> dict[str, list[float]]:
    """Round trips (s) of ``n`` sequential calls to each of ``calls``, in blocks that alternate
    between them (the same machine load for all), after 200 unmeasured calls each."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn, payload in calls.values():
        for _ in range(200):
            fn(payload)
    while min(len(v) for v in times.values()) < n:
        for k, (fn, payload) in calls.items():
            for _ in range(block):
                t0 = time.perf_counter()
                fn(payload)
                times[k].append(time.perf_counter() - t0)
    return times


def phase_echo(run: Run, echo: tuple[subprocess.Popen[str], int], resp_bytes: int,
               request: bytes, plan: Plan) -> None:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{echo[1]}") as ch:
        call = ch.unary_unary(ECHO_METHOD)  # bytes in, bytes out: no (de)serialisation
        times = sequential_pair({"echo": (call, request)}, plan.sequential, plan.block)
    run.data["echo"] = {**ms_stats(times["echo"]), "request_bytes": len(request),
                        "response_bytes": resp_bytes}
    run.say(f"  echo: p50 {run.data['echo']['p50_ms']:.4f} ms (p99 "
            f"{run.data['echo']['p99_ms']:.4f}) over {plan.sequential} sequential calls")


def served_latency(run: Run, server: Served, model: str, lane: str, x1: np.ndarray,
                   echo: tuple[subprocess.Popen[str], int] | None, plan: Plan) -> dict[str, Any]:
    """Batch 1 pinned to ``lane``, sequential, alternating with the echo server."""
    import grpc

    from client.client import AdaptiveClient, build_request, parse_response
    from protos import wire
    from protos.generated import grpc_service_pb2_grpc

    request = build_request(model, x1, variant=lane)
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(grpc.insecure_channel(server.target, wire.channel_options()))
        infer = grpc_service_pb2_grpc.GRPCInferenceServiceStub(srv).ModelInfer
        answered_by = parse_response(infer(request, timeout=30), 0.0).candidate
        calls: dict[str, tuple[Callable[[Any], Any], Any]] = {"served": (infer, request)}
        if echo is not None:
            ch = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{echo[1]}"))
            calls["echo"] = (ch.unary_unary(ECHO_METHOD), request.SerializeToString())
        times = sequential_pair(calls, plan.sequential, plan.block)
    out: dict[str, Any] = {"pinned": lane, "answered_by": answered_by, **ms_stats(times["served"])}
    if "echo" in times:
        paired = ms_stats(times["echo"])
        out["echo_paired_p50_ms"], out["echo_paired_p99_ms"] = paired["p50_ms"], paired["p99_ms"]
    # Where the round trip goes: the server's own account of its queue wait and compute (the
    # rest is gRPC, decoding, routing and encoding: what exceeds the echo is the server's path).
    with AdaptiveClient(server.target) as client:
        parts = [client.infer(x1, variant=lane) for _ in range(300)]
    out["queue_ms_p50"] = round(float(np.median([p.queue_ms for p in parts])), 4)
    out["compute_ms_p50"] = round(float(np.median([p.compute_ms for p in parts])), 4)
    run.say(f"  batch 1 pinned {lane} (answered by {answered_by}): p50 {out['p50_ms']:.4f} ms, "
            f"p99 {out['p99_ms']:.4f} ms (the server's queue {out['queue_ms_p50']} + compute "
            f"{out['compute_ms_p50']}); echo alongside p50 {out.get('echo_paired_p50_ms')}")
    return out


@contextlib.contextmanager
def profiled(run: Run, pid: int, path: Path) -> Iterator[bool]:
    """py-spy samples ``pid`` while the block runs and writes them as collapsed stacks to
    ``path``; yields False, profiling nothing, where py-spy is missing. Python frames only, and
    without pausing the process: native unwinding stopped it for long enough to make a 4 s
    batch-1 run last 80 s (2 cores here)."""
    spy = shutil.which("py-spy")
    if spy is None:
        run.say("  py-spy not found: nothing profiled")
        yield False
        return
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "250", "--nonblocking",
                             "--format", "raw", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # attached before the load starts
    try:
        yield True
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        last = (err or "").strip().splitlines()[-1:] or ["done"]
        run.say(f"  py-spy -> {path.name}: {last[0]}")


def profile_served(run: Run, clients: Clients, server: Served, model: str, lane: str,
                   x1: np.ndarray, shape: Sequence[int], plan: Plan, logs: Path) -> dict[str, Any]:
    """The server under py-spy: sequential batch-1 calls pinned to ``lane``, then a closed loop
    of 256-image requests (figures of both are kept, but they are taken under the profiler)."""
    from client.client import AdaptiveClient

    out: dict[str, Any] = {}
    pid = server.proc.proc.pid
    with profiled(run, pid, logs / "profile-cuda-b1.txt"), AdaptiveClient(server.target) as c:
        times: list[float] = []
        stop = time.monotonic() + 3.0
        while time.monotonic() < stop:
            times.append(c.infer(x1, variant=lane).latency_ms)
        out["b1_p50_ms"], out["b1_calls"] = float(np.median(times)), len(times)
    with profiled(run, pid, logs / "profile-cuda-256.txt"):
        out["256"] = clients.closed(server.target, model, images=256, shape=shape, variant=lane,
                                    budget_ms=None, concurrency=plan.concurrency,
                                    warm_s=plan.warm_seconds, seconds=3.0)
    return out


def served_throughput(run: Run, clients: Clients, server: Served, model: str, lane: str,
                      shape: Sequence[int], workers: int, plan: Plan, sample_gpu: bool) -> None:
    served = run.data.setdefault("served", {})
    rows: list[dict[str, Any]] = served.setdefault("throughput", [])
    for images in (32, 256):
        row: dict[str, Any] = {"workers": workers, "images": images, "pinned": lane}
        rows.append(row)
        try:
            with GpuSampler(sample_gpu) as gpu:
                row.update(clients.closed(server.target, model, images=images, shape=shape,
                                          variant=lane, budget_ms=None,
                                          concurrency=plan.concurrency,
                                          warm_s=plan.warm_seconds,
                                          seconds=plan.throughput_seconds))
            row["gpu"] = gpu.summary()
            run.say(f"  workers {workers}, {images} images/request pinned {lane}: "
                    f"{row['images_per_s']:,.0f} images/s ({row['requests_per_s']:.1f} req/s, "
                    f"{row['processes']} client processes x {plan.concurrency} in flight, "
                    f"errors {row['errors'] or 'none'}, GPU {row['gpu']})")
            for code, text in row["error_details"].items():
                run.say(f"    first {code}: {text}")
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            run.say(f"  workers {workers}, {images} images/request: ERROR {row['error'][:400]}")
        run.write()


def device_flags(args: argparse.Namespace, device: str) -> list[str]:
    """``--device`` plus the GPU flags, each only when it differs from the server's default (so
    the script runs against a server without them where they are not needed)."""
    flags = ["--device", device]
    if args.accelerator != "cuda":
        flags += ["--accelerator", args.accelerator]
    if args.gpu_dtype != "fp32":
        flags += ["--gpu-dtype", args.gpu_dtype]
    return flags


# --- phase 6: placement under load --------------------------------------------------------------

def placement_images(family_dir: Path, shape: Sequence[int]) -> TestData:
    """The family's test split (labels: accuracy is measured), or random pixels if the dataset
    cannot be loaded on this machine (its loader's package missing)."""
    from client.loadgen import load_test_data

    try:
        return load_test_data(None, family_dir)
    except Exception as exc:
        print(f"    test split unavailable ({type(exc).__name__}: {exc}); random images, "
              "no accuracy", flush=True)
        x = np.random.default_rng(0).random((512, *shape), dtype=np.float32)
        return TestData(x, None, {"spec": "random", "images": len(x), "labels": False,
                                  "why": f"{type(exc).__name__}: {exc}"[:300]})


ROUTER_GAUGES = ("adaptive_router_safety_factor", "adaptive_router_margin_seconds",
                 "adaptive_router_miss_ratio", "adaptive_router_overhead_seconds",
                 "adaptive_router_cpu_share_seconds")


def router_state(metrics_url: str) -> dict[str, Any]:
    """The router's calibration after a run (its margins decide by how much a GPU candidate
    must beat a CPU one), the requests it shed and the late answers per lane, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[str, Any] = {"shed": 0.0, "misses": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ROUTER_GAUGES:
                out[sample.name.removeprefix("adaptive_router_")] = sample.value
            elif sample.name == "adaptive_shed_total":
                out["shed"] += sample.value
            elif sample.name == "adaptive_budget_misses_total" and sample.value:
                out["misses"][sample.labels["variant"]] = sample.value
    return out


def open_figures(clients: Clients, server: Served, model: str, data: TestData, cfg: RunConfig,
                 sample_gpu: bool) -> dict[str, Any]:
    """One open loop against ``server``: `summarize_run`'s figures plus answers per device."""
    from client.results import summarize_run

    with GpuSampler(sample_gpu) as gpu:
        out = clients.open(server.target, model, data, cfg)
    fig = summarize_run(out.records, cfg, out.wall_s, out.send_lag_ms)
    fig["devices"] = device_shares(out.records)
    fig["gpu"] = gpu.summary()
    return fig


def saturating_rate(run: Run, clients: Clients, server: Served, model: str, data: TestData,
                    shape: Sequence[int], plan: Plan, place: dict[str, Any], images: int
                    ) -> float:
    """A rate at which the CPU lanes fall behind: from the CPU-only server's capacity without
    budgets, doubled per open-loop step until fewer than `RAMP_STOP` of the requests end in
    budget. Open loops, not a closed loop with budgets: a closed loop against a server that
    sheds measures how fast it refuses (each refusal is at once the next arrival)."""
    ref = clients.closed(server.target, model, images=images, shape=shape,
                         variant=None, budget_ms=None, concurrency=plan.capacity_concurrency,
                         warm_s=plan.warm_seconds, seconds=plan.capacity_seconds)
    place["reference_capacity"] = ref
    run.say(f"  --device cpu without budgets (the most accurate variant, never shed): "
            f"{ref['requests_per_s']:.1f} requests/s ({images} images each)")
    rate = ref["requests_per_s"]
    if not rate > 0:
        raise RuntimeError(f"--device cpu answered nothing without budgets: {ref}")
    ramp: list[dict[str, Any]] = place.setdefault("ramp", [])
    for step in range(plan.ramp_steps):
        cfg = RunConfig(rate=rate, seconds=plan.ramp_seconds,
                        budget=BudgetSpec.parse(PLACEMENT_BUDGET), images=images,
                        seed=100 + step, deadline_is_budget=True)
        fig = open_figures(clients, server, model, data, cfg, sample_gpu=False)
        ramp.append({"rate_rps": round(rate, 2), "attainment": fig["attainment"],
                     "answered": fig["answered"], "offered": fig["offered"],
                     "send_lag_p99_ms": fig["send_lag_ms"]["p99"]})
        run.say(f"  ramp --device cpu at {rate:.0f}/s: in budget "
                f"{100 * (fig['attainment'] or 0):.1f}%")
        run.write()
        if (fig["attainment"] or 0.0) < RAMP_STOP:
            return rate
        rate *= 2
    return rate / 2  # the highest tried; the report says the CPU lanes were not saturated


def phase_placement(run: Run, args: argparse.Namespace, clients: Clients, family_dir: Path,
                    model: str, shape: Sequence[int], plan: Plan) -> None:
    data = placement_images(family_dir, shape)
    images, workers = args.placement_images, args.placement_workers
    place: dict[str, Any] = {"images": images, "workers": workers, "budget": PLACEMENT_BUDGET,
                             "data": data.description, "runs": {}}
    run.data["placement"] = place
    timeout = min(plan.start_timeout, max(30.0, run.left()))
    if args.rate:
        rate, place["rate_rule"] = float(args.rate), "--rate"
    else:
        # On a server of its own, stopped before the measured runs: whatever the ramp's
        # overload leaves in a router (margins, rates) must not carry into them.
        with contextlib.ExitStack() as stack:
            ramp_server = start_server(stack, run, family_dir, device_flags(args, "cpu"),
                                       label="placement-ramp", workers=workers,
                                       logs=args.logs, timeout=timeout)
            rate = saturating_rate(run, clients, ramp_server, model, data, shape, plan, place,
                                   images)
        place["rate_rule"] = (f"the first rate of the ramp (x2 per {plan.ramp_seconds:g} s step "
                              f"from the CPU-only capacity without budgets) at which --device "
                              f"cpu kept fewer than {100 * RAMP_STOP:.0f}% in budget")
    place["rate_rps"] = round(rate, 2)
    cfg = RunConfig(rate=rate, seconds=plan.open_loop_seconds,
                    budget=BudgetSpec.parse(PLACEMENT_BUDGET), images=images, seed=1,
                    deadline_is_budget=True)
    # auto first: if the CPU-only run leaves the machine hot, it is the CPU-only side that pays.
    for label in ("auto", "cpu"):
        with contextlib.ExitStack() as stack:
            try:
                server = start_server(stack, run, family_dir, device_flags(args, label),
                                      label=f"placement-{label}", workers=workers,
                                      logs=args.logs,
                                      timeout=min(plan.start_timeout, max(30.0, run.left())),
                                      metrics=True)
            except Exception as exc:  # the other server is still measured
                place.setdefault("errors", {})[label] = f"{type(exc).__name__}: {exc}"[:3000]
                run.say(f"  serve --device {label}: ERROR {str(exc)[:600]}")
                continue

            def measured(server: Served = server) -> dict[str, Any]:
                # the same arrivals, budgets and images against both servers (same seed)
                return open_figures(clients, server, model, data, cfg,
                                    sample_gpu=args.accelerator == "cuda")

            attempt(place["runs"], label, measured)
            if server.metrics_url is not None and "error" not in place["runs"][label]:
                # Why the router placed what it did: the next device session reads this.
                attempt(place["runs"][label], "router",
                        lambda url=server.metrics_url: router_state(url))
        fig = place["runs"][label]
        if "attainment" in fig:
            run.say(f"  open loop {rate:.0f}/s against --device {label}: in budget "
                    f"{100 * (fig['attainment'] or 0):.1f}%, answered {fig['answered']}/"
                    f"{fig['offered']}, devices {fig['devices']['share']}, p99 "
                    f"{fig['latency_ms']['p99']} ms, send lag p99 {fig['send_lag_ms']['p99']} ms")
        run.write()
    if not place["runs"]:
        raise RuntimeError("neither placement server started: " + "; ".join(
            f"{k}: {v[:300]}" for k, v in place.get("errors", {}).items()))


# --- main ---------------------------------------------------------------------------------------

def evaluate(run: Run) -> None:
    """The issue's targets, by the report's own rule (bench/report.py, a sibling script)."""
    from report import gpu_targets  # bench/ is on sys.path: this file runs as a script

    rows = gpu_targets(run.data)
    run.data["targets"] = rows
    for r in rows:
        verdict = {True: "MET", False: "NOT MET", None: "n/a"}[r["passed"]]
        run.say(f"  {verdict:8} {r['target']}: wanted {r['wanted']}; measured {r['measured']}")


@contextlib.contextmanager
def terminate_is_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit, so the `finally`s stop every server and client process."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="families/mnist5k", help="family directory")
    ap.add_argument("--json", default="results/bench/gpu.json", help="where the figures go")
    ap.add_argument("--logs", type=Path, help="where the servers' logs go (default: beside --json)")
    ap.add_argument("--quick", action="store_true",
                    help="every phase for a few seconds (to test the script on a CPU)")
    ap.add_argument("--accelerator", choices=["cuda", "cpu"], default="cuda",
                    help="the device of the GPU lanes and of the bare model (cpu: the same code "
                         "on the CPU, for --quick here)")
    ap.add_argument("--gpu-dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                    help="the served GPU lanes' dtype (default fp32, the targets' dtype)")
    ap.add_argument("--workers-list",
                    help="serve --device cuda with the first and the last of these --workers "
                         "(the first also measures batch-1 latency; default 1,4; --quick 1,2)")
    ap.add_argument("--clients", type=int, help="client processes (default 6; --quick 2)")
    ap.add_argument("--rate", type=float,
                    help="placement: requests/s offered (default 2 x the CPU-only capacity)")
    ap.add_argument("--placement-images", type=int, default=PLACEMENT_IMAGES,
                    help=f"placement: images per request (default {PLACEMENT_IMAGES})")
    ap.add_argument("--placement-workers", type=int, default=1,
                    help="placement: --workers of the three servers (default 1)")
    ap.add_argument("--profile", action="store_true",
                    help="after the batch-1 latency, py-spy (where installed) records the "
                         "--device cuda server for a few seconds of batch-1 and of 256-image "
                         "load: collapsed stacks in --logs (profile-*.txt)")
    ap.add_argument("--phases", default="host,bare,echo,cuda,placement,cuda-workers",
                    help="comma-separated subset of the phases to run")
    ap.add_argument("--max-seconds", type=float, default=390.0,
                    help="skip the phases that no longer fit in this many seconds (default 390; "
                         "one that starts in time may end up to a minute or two later)")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    if args.clients:
        plan = replace(plan, clients=args.clients)
    json_path = Path(args.json).resolve()
    args.logs = (args.logs or json_path.parent).resolve()
    family_dir = (ROOT / args.family).resolve() if not Path(args.family).is_absolute() \
        else Path(args.family)
    workers_list = [int(w) for w in (args.workers_list or ("1,2" if args.quick else "1,4"))
                    .split(",") if w.strip()]
    wanted = set(args.phases.split(","))
    run = Run(json_path, args)
    run.data["plan"] = plan.__dict__
    run.say(f"gpu check: family {family_dir}, accelerator {args.accelerator}, "
            f"{'QUICK' if args.quick else 'full'} plan, JSON {json_path}")

    from compression.core.family import load_family

    try:
        fam = load_family(family_dir)
    except Exception as exc:  # nothing can be measured; still leave a JSON that says why
        run.data["phases"]["family"] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        run.write()
        run.say(f"family {family_dir}: {exc}")
        raise SystemExit(2) from None
    model, shape = fam.name, tuple(fam.input_shape)
    run.data["family"] = {"name": model, "variants": list(fam.variants),
                          "input_shape": list(shape)}
    x1 = np.random.default_rng(1).random((1, *shape), dtype=np.float32)
    resp_bytes = response_bytes(model, fam.num_classes)

    def maybe(name: str, needs_s: float, fn: Callable[[], None]) -> None:
        if name in wanted:
            run.phase(name, needs_s, fn)

    with terminate_is_exit(), contextlib.ExitStack() as stack:
        maybe("host", 0, lambda: phase_host(run))
        maybe("bare", 30, lambda: Bare(run, family_dir, args.accelerator, plan).measure())

        echo: tuple[subprocess.Popen[str], int] | None = None

        def echo_phase() -> None:
            nonlocal echo
            from client.client import build_request

            echo = start_echo(resp_bytes)
            stack.callback(stop_process, echo[0])
            phase_echo(run, echo, resp_bytes, build_request(model, x1).SerializeToString(), plan)

        maybe("echo", 10, echo_phase)
        clients: Clients | None = None

        def pool() -> Clients:
            nonlocal clients
            if clients is None:
                clients = Clients(stack, plan.clients)
            return clients

        def cuda_phase(workers: int, latency: bool) -> None:
            with contextlib.ExitStack() as inner:
                server = start_server(inner, run, family_dir, device_flags(args, "cuda"),
                                      label=f"cuda-w{workers}", workers=workers, logs=args.logs,
                                      timeout=min(plan.start_timeout, max(30.0, run.left())))
                served = run.data.setdefault("served", {})
                try:
                    lane, table = gpu_lane(server.target)
                    served["lane"], served["candidates"] = lane, table
                except Exception as exc:  # the pin below then says whether cuda:full exists
                    lane = served["lane"] = wire.placed_name("full", "cuda")
                    served["candidates"] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
                run.say(f"  GPU lane of full: {lane}; candidates {served['candidates']}")
                if latency:
                    attempt(served, "latency_b1",
                            lambda: served_latency(run, server, model, lane, x1, echo, plan))
                    run.write()
                if latency and args.profile:
                    attempt(served, "profiled", lambda: profile_served(
                        run, pool(), server, model, lane, x1, shape, plan, args.logs))
                served_throughput(run, pool(), server, model, lane, shape, workers, plan,
                                  sample_gpu=args.accelerator == "cuda")

        maybe("cuda", 40, lambda: cuda_phase(workers_list[0], latency=True))
        # placement before the larger --workers: a target of its own, where more workers only
        # raise a throughput figure the first server already gives
        maybe("placement", 90,
              lambda: phase_placement(run, args, pool(), family_dir, model, shape, plan))
        if len(workers_list) > 1:
            maybe("cuda-workers", 60, lambda: cuda_phase(workers_list[-1], latency=False))
    run.phase("targets", 0, lambda: evaluate(run))
    run.say(f"done in {run.elapsed():.0f} s; figures in {json_path}")


if __name__ == "__main__":
    main()
