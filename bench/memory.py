"""The server's memory under legal traffic at the flags' extremes, against the documented bound.

For each flag setting: start `serve` on the family, let it settle (baseline RSS), then send the
largest legal requests — the largest batch the server accepts, to every variant, four at once —
sample the process's RSS every 20 ms (peak), and read it again after the traffic stops and the
server idles (does memory come back?). Each figure is printed beside the bound for those flags
and the Deployment's memory limit (deploy/k8s/deployment.yaml). The bound:

    RSS ≤ baseline + queued + running
    queued  = variants × --max-queue × bytes per image × 2     (request bytes + decoded copy)
    running = threads × (--max-batch × activation bytes per image of the largest variant)

where activation bytes are every intermediate tensor of one image's pass summed (ONNX shape
inference; ORT reuses buffers, so this over-counts), and the ORT arena gives back what a batch of
more than 32 rows took (`compression.core.ort.SHRINK_ABOVE_ROWS`).

    python bench/memory.py --family families/mnist5k --json results/bench/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import psutil
import yaml

from client.client import AdaptiveClient
from client.process import SERVING, ServerProcess
from client.results import host_info
from compression.core.family import Family, load_family
from compression.report import markdown_table

# (label, serve flags, images per request): the defaults, then the largest queue the flags allow.
SETTINGS = [
    ("defaults", [], 1024),
    ("--max-queue 8192 --max-batch 256", ["--max-queue", "8192", "--max-batch", "256"], 4096),
]


DEPLOYMENT = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "deployment.yaml"
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def memory_bytes(quantity: str | int) -> int:
    """A Kubernetes memory quantity (``"2Gi"``, ``"512M"``, ``1073741824``) in bytes."""
    m = re.fullmatch(r"(\d+)([KMGT]i|[kMGT])?", str(quantity))
    if m is None:
        raise ValueError(f"memory quantity {quantity!r} not understood")
    return int(m.group(1)) * {**_BINARY, **_DECIMAL, None: 1}[m.group(2)]


def deployment_limit_mib(path: Path = DEPLOYMENT) -> float:
    """The serving container's memory limit in the shipped Deployment."""
    doc = yaml.safe_load(path.read_text())
    limit = doc["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    return memory_bytes(limit) / 2**20


def activation_bytes(graph: onnx.ModelProto) -> int:
    """Bytes of every intermediate tensor of one image's pass (batch dim set to 1)."""
    graph = onnx.ModelProto.FromString(graph.SerializeToString())
    for value in [*graph.graph.input, *graph.graph.output]:
        dim = value.type.tensor_type.shape.dim
        if dim:
            dim[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(graph)
    total = 0
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if dims and all(d > 0 for d in dims):
            total += int(np.prod(dims)) * 4
    return total


def bound_mib(family: Family, baseline_mib: float, *, max_batch: int, max_queue: int,
              threads: int) -> dict[str, float]:
    """The documented bound (module docstring) for these flags, in MiB, and its terms."""
    image = int(np.prod(family.input_shape)) * 4
    acts = []
    for name, v in family.variants.items():
        graphs = family.stage_graphs(name) if v.exits else [family.graph(name)]
        acts.append(sum(activation_bytes(g) for g in graphs))
    queued = len(family.variants) * max_queue * image * 2 / 2**20
    running = threads * max_batch * max(acts) / 2**20
    return {"queued_mib": round(queued, 1), "running_mib": round(running, 1),
            "bound_mib": round(baseline_mib + queued + running, 1)}


class Sampler:
    """The peak RSS of one process, sampled on a thread."""

    def __init__(self, pid: int, period_s: float = 0.02) -> None:
        self.proc, self.period_s, self.peak = psutil.Process(pid), period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(family: Path, label: str, flags: list[str], n: int, *, idle_s: float,
            rounds: int) -> dict[str, object]:
    fam = load_family(family)
    names = list(fam.variants)
    proc = ServerProcess([str(family), "--port", "0", "--metrics-port", "-1", *flags])
    try:
        port = proc.port()
        proc.wait_for(SERVING)
        pid = proc.proc.pid
        x = np.random.default_rng(0).random((n, *fam.input_shape), dtype=np.float32)
        with AdaptiveClient(f"127.0.0.1:{port}") as client, Sampler(pid) as rss:
            time.sleep(1.0)
            baseline = rss.rss()
            rss.peak = baseline
            failed = 0
            with ThreadPoolExecutor(4) as pool:
                for _ in range(rounds):
                    for fut in [pool.submit(client.infer, x, variant=v, timeout=300) for v in names]:
                        try:
                            fut.result()
                        except Exception as exc:  # counted and printed
                            failed += 1
                            print(f"  {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
            after = rss.rss()
            time.sleep(idle_s)
            idle = rss.rss()
            peak = rss.peak
    finally:
        proc.stop()
    args = dict(zip(flags[::2], flags[1::2], strict=True))
    bound = bound_mib(fam, baseline / 2**20, max_batch=int(args.get("--max-batch", 32)),
                      max_queue=int(args.get("--max-queue", 1024)),
                      threads=int(args.get("--threads", os.cpu_count() or 1)))
    return {"label": label, "flags": flags, "images_per_request": n, "variants": len(names),
            "requests": rounds * len(names), "failed": failed,
            "baseline_mib": round(baseline / 2**20, 1), "peak_mib": round(peak / 2**20, 1),
            "after_mib": round(after / 2**20, 1), "idle_mib": round(idle / 2**20, 1),
            "idle_s": idle_s, **bound}


def host_text() -> str:
    h = host_info()
    return (f"Measured on {h['cpus']}-core {h['machine']} ({h['system']}), load average "
            f"{h['load_average'][0]:.1f}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", type=Path, default=Path("families/mnist5k"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=5.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = [measure(args.family, label, flags, n, idle_s=args.idle_s, rounds=args.rounds)
            for label, flags, n in SETTINGS]
    limit = deployment_limit_mib()
    print(markdown_table(
        ["flags", "images per request", "requests", "failed", "baseline", "peak",
         f"after {args.idle_s:.0f} s idle", "bound (queued + running)"],
        [[f"`{r['label']}`" if r["flags"] else r["label"], r["images_per_request"], r["requests"],
          r["failed"], f"{r['baseline_mib']:.0f} MiB", f"**{r['peak_mib']:.0f} MiB**",
          f"{r['idle_mib']:.0f} MiB",
          f"{r['bound_mib']:.0f} MiB ({r['queued_mib']:.0f} + {r['running_mib']:.0f})"]
         for r in rows]))
    print(f"\nDeployment memory limit: {limit:.0f} MiB. {host_text()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"host": host_info(), "python": platform.python_version(),
                                         "deployment_limit_mib": limit, "rows": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
