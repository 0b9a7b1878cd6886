"""Measurements every variant gets: parameter count, MACs, artifact size, latency and which test
images it gets right.

Latency is measured on ONNX Runtime with one intra-op thread (the build host's per-core cost, which
the server rescales online) at batch sizes 1, 8 and 32, reported as p50/p95 in milliseconds. The
sessions are `compression.core.ort`'s, the ones the server and benchmarks use.

The family's latencies, early exits' included, come from one *paired* profile
(`paired_latency`), in CPU time of the calling thread (the work one core does per call; see there
why not wall time). Every variant is timed in the same short rounds, the variant order rotated
round by round, so that a noisy minute on a shared host slows every variant of a round alike. A
speed-up is a ratio within one round (``full``'s time over the variant's), and the recorded
speed-up is the median of those ratios over the rounds; p50 and p95 pool each variant's samples
over all rounds. The CPU model and ISA flags (`cpu_info`) go into the manifest with them: int8
kernels, for one, are only fast with VNNI or AMX.

``python -m compression.profile FAMILY --runs 2`` re-profiles an existing family and shows how well
the runs agree on each speed-up.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from compression import export
from compression.core import stats
from compression.core.exits import StageChain, assign_exits, last_threshold, policy_predictions
from compression.core.family import (
    BATCH_SIZES,
    Exit,
    Family,
    LatencyTable,
    Variant,
    load_family,
)
from compression.core.ort import session, session_options

log = logging.getLogger(__name__)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one image through every Conv2d and Linear (hooks on a dry run)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp: tuple[torch.Tensor], out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros((1, *input_shape)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def cpu_time_ms(fn: Callable[[], object], *, warmup: int = 5, iters: int = 50) -> dict[str, float]:
    """p50/p95 of ``fn`` in ms of the calling thread's CPU time (see `paired_latency` for why)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        t = time.thread_time()
        fn()
        samples.append((time.thread_time() - t) * 1e3)
    return {"p50": round(float(np.percentile(samples, 50)), 4),
            "p95": round(float(np.percentile(samples, 95)), 4)}


def onnx_latency(graph: onnx.ModelProto | bytes, input_shape: Sequence[int],
                 batch_sizes: Sequence[int] = BATCH_SIZES, iters: int = 50) -> LatencyTable:
    """p50/p95 of one ORT session (1 thread) per batch size, alone (a method's own comparison;
    the family's latencies come from `paired_latency`)."""
    sess = session(graph, threads=1)
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(0)
    table: LatencyTable = {}
    for b in batch_sizes:
        x = rng.random((b, *input_shape), dtype=np.float32)
        table[str(b)] = cpu_time_ms(lambda x=x: sess.run(None, {name: x}), iters=iters)
    return table


@torch.no_grad()
def torch_latency(model: nn.Module, input_shape: Sequence[int],
                  batch_sizes: Sequence[int] = BATCH_SIZES, iters: int = 50) -> LatencyTable:
    """The same table for eager torch on one thread, for the report's ORT-vs-torch comparison,
    in the paired profile's clock (thread CPU time: one torch thread computes in the caller)."""
    model = model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)  # not the global generator: training draws from it
    try:
        table: LatencyTable = {}
        for b in batch_sizes:
            x = torch.rand((b, *input_shape), generator=g)
            table[str(b)] = cpu_time_ms(lambda x=x: model(x), iters=iters)
        return table
    finally:
        torch.set_num_threads(threads)


# --- paired latency profile ------------------------------------------------------------------

Runner = Callable[[np.ndarray], object]  # runs one batch [N, C, H, W] through a served variant

ROUNDS = 12  # interleaved rounds per batch size; the speed-up is the median over them
# Timed calls per variant, batch size and round: ~a few ms of work per cell, so that one round
# (every variant once) stays well under a second and a burst of load hits a whole round.
ITERS: Mapping[int, int] = {1: 10, 8: 4, 32: 2}
# What matters for integer kernels and vector widths (Linux /proc/cpuinfo flag names).
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class PairedProfile:
    """One paired profile: per variant its latency table and its speed-up over the reference."""

    latency_ms: dict[str, LatencyTable]
    speedup: dict[str, dict[str, float]]  # variant → batch size → median in-round ratio
    meta: dict[str, Any]  # method, rounds, calls per cell, threads, CPU: goes into the manifest


def runner(graphs: Sequence[onnx.ModelProto | bytes]) -> Runner:
    """One graph → its session; several → the early-exit chain at full depth (every stage)."""
    if len(graphs) == 1:
        sess = session(graphs[0], threads=1)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})
    chain = StageChain.from_graphs(graphs, threads=1)
    return chain.run


def paired_latency(runners: Mapping[str, Runner], input_shape: Sequence[int], *,
                   reference: str = "full", batch_sizes: Sequence[int] = BATCH_SIZES,
                   rounds: int = ROUNDS, iters: Mapping[int, int] | None = None,
                   seed: int = 0, clock: Callable[[], float] = time.thread_time) -> PairedProfile:
    """Time every runner in ``rounds`` interleaved rounds per batch size (see the module doc).

    The clock is the calling thread's CPU time: a one-thread ORT session computes in the caller,
    so this is the core's work for the call, which other processes' load does not stretch. Wall
    time is not: on this 2-core host under a load of ~3, a batch of 32 through ``full`` took
    35 ms of wall time for 16.6 ms of CPU time while a 0.5 ms call was barely touched, so wall
    time ratios of long and short calls moved by 50 % between two runs.
    """
    if reference not in runners:
        raise ValueError(f"paired_latency: reference {reference!r} is not among the variants "
                         f"{sorted(runners)}")
    if rounds < 1:
        raise ValueError(f"paired_latency: rounds must be ≥ 1, got rounds={rounds!r}")
    calls = dict(ITERS if iters is None else iters)
    names = list(runners)
    rng = np.random.default_rng(seed)
    latency: dict[str, LatencyTable] = {n: {} for n in names}
    speedup: dict[str, dict[str, float]] = {n: {} for n in names}
    t0 = time.perf_counter()
    for b in batch_sizes:
        x = rng.random((b, *input_shape), dtype=np.float32)
        k = max(1, calls.get(b, 2))
        for n in names:  # first calls allocate and JIT-pick kernels: never timed
            for _ in range(3):
                runners[n](x)
        samples: dict[str, list[float]] = {n: [] for n in names}
        cells: dict[str, list[float]] = {n: [] for n in names}  # per round: median of the cell
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                fn = runners[n]
                fn(x)  # untimed: the previous variant's weights just left the caches
                cell = []
                for _ in range(k):
                    t = clock()
                    fn(x)
                    cell.append((clock() - t) * 1e3)
                samples[n] += cell
                cells[n].append(statistics.median(cell))
        for n in names:
            latency[n][str(b)] = {"p50": round(float(np.percentile(samples[n], 50)), 4),
                                  "p95": round(float(np.percentile(samples[n], 95)), 4)}
            ratios = [ref / max(own, 1e-9) for ref, own in zip(cells[reference], cells[n],
                                                                strict=True)]
            speedup[n][str(b)] = round(statistics.median(ratios), 4)
    meta = {"method": "paired", "reference": reference, "rounds": rounds,
            "calls_per_round": {str(b): max(1, calls.get(b, 2)) for b in batch_sizes},
            "threads": 1, "clock": "thread CPU time",
            "seconds": round(time.perf_counter() - t0, 1), "cpu": cpu_info()}
    return PairedProfile(latency_ms=latency, speedup=speedup, meta=meta)


def profile_variants(root: Path, variants: Sequence[Variant], input_shape: Sequence[int],
                     ) -> tuple[list[Variant], dict[str, Any]]:
    """The build's one paired profile of the variants written under ``root`` (read back from
    their files, as served): the variants with their latency tables and speed-ups, and the
    profile's description for the manifest."""
    family = Family(root=root, name=root.name, manifest={}, variants={v.name: v for v in variants})
    reference = "full" if "full" in family.variants else variants[0].name
    prof = paired_latency(family_runners(family), input_shape, reference=reference)
    log.info("paired profile: %d variants, %d rounds, %.1f s on %s", len(variants),
             prof.meta["rounds"], prof.meta["seconds"], prof.meta["cpu"]["model"])
    out = []
    for v in variants:
        exits = None if v.exits is None else [  # the last exit is the variant at full depth
            replace(e, latency_ms=prof.latency_ms.get(f"{v.name}@{e.index}", prof.latency_ms[v.name]))
            for e in v.exits]
        out.append(replace(v, latency_ms=prof.latency_ms[v.name], speedup=prof.speedup[v.name],
                           exits=exits))
    return out, prof.meta


def family_runners(family: Family) -> dict[str, Runner]:
    """A runner per variant of a family (directory written, not necessarily its manifest), and
    per early exit k but the last one ``variant@k``: stages 0..k, as the server runs them."""
    runners: dict[str, Runner] = {}
    for name, v in family.variants.items():
        if not v.exits:
            runners[name] = runner([family.graph(name)])
            continue
        chain = StageChain.from_graphs(family.stage_graphs(name), threads=1)
        runners[name] = chain.run
        for k in range(len(chain) - 1):
            runners[f"{name}@{k}"] = lambda x, chain=chain, k=k: chain.run(x, upto=k)
    return runners


def cpu_info(path: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU model and the ISA flags of `ISA_FLAGS` it has (empty off Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        log.info("cpu_info: %s not readable; ISA flags unknown", path)
    isa = [f for f in ISA_FLAGS if f in flags]
    return {"model": model, "isa": isa,
            "int8_dot_product": any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))}


def optimized_op_counts(graph: onnx.ModelProto | bytes) -> dict[str, int]:
    """Node types of ``graph`` after ONNX Runtime's own graph optimisations (what actually runs:
    e.g. whether QDQ pairs became QLinearConv/QGemm kernels)."""
    with tempfile.TemporaryDirectory(prefix="ort-opt-") as tmp:
        opts = session_options(1)
        opts.optimized_model_filepath = str(Path(tmp, "optimized.onnx"))
        data = graph if isinstance(graph, bytes) else graph.SerializeToString()
        ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath)
    return dict(Counter(n.op_type for n in optimized.graph.node))


# --- which test images a variant gets right ------------------------------------------------------

def correctness(served: onnx.ModelProto, stages: Sequence[onnx.ModelProto] | None,
                exits: Sequence[Exit] | None, x: np.ndarray, y: np.ndarray,
                ) -> tuple[np.ndarray, list[Exit] | None]:
    """Per image of ``x``: is the variant's answer right? And its exits, each with the bits of
    the policy capped there (`Exit.test_correct`), for the early-exit network.

    A graph answers with its top-1 class (batches of 256, as the accuracy always was measured);
    an early-exit network with its calibrated policy at full depth.
    """
    if stages is None or not exits:
        return export.run(session(served), x).argmax(1) == y, None
    capped = policy_correct(stages, exits, x, y)
    return capped[-1], [replace(e, test_correct=stats.encode_bits(c))
                        for e, c in zip(exits, capped, strict=True)]


def policy_correct(stages: Sequence[onnx.ModelProto], exits: Sequence[Exit], x: np.ndarray,
                   y: np.ndarray) -> list[np.ndarray]:
    """Per exit k, per image: is the exit policy capped at exit k right? (the last: uncapped)

    The same computation as the early-exit method's ``policy_accuracy`` (all exits' logits, then
    the thresholds), so the bits average to the recorded accuracies.
    """
    logits = StageChain.from_graphs(stages).all_logits(x)
    criterion = exits[0].criterion
    last = last_threshold(criterion, logits[0].shape[1])
    out = []
    for k in range(len(logits)):
        where = assign_exits(logits[:k + 1], [*(e.threshold for e in exits[:k]), last], criterion)
        out.append(policy_predictions(logits[:k + 1], where) == y)
    return out


# --- `python -m compression.profile FAMILY`: how well do two paired profiles agree? ---------------

def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compression.profile", description=(
        "Re-run the build's paired latency profile on a family's graphs and show how well the "
        "runs agree on each speed-up over full."))
    p.add_argument("family", help="family directory")
    p.add_argument("--runs", type=int, default=2, help="paired profiles to run (default 2)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds each (default {ROUNDS})")
    args = p.parse_args(argv)
    if args.runs < 1 or args.rounds < 1:
        p.error(f"--runs and --rounds must be ≥ 1, got --runs={args.runs!r} --rounds={args.rounds!r}")
    logging.basicConfig(level=logging.WARNING)
    try:
        fam = load_family(args.family)
    except Exception as exc:  # FamilyError and friends: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runners = family_runners(fam)
    shape = fam.input_shape
    runs = [paired_latency(runners, shape, rounds=args.rounds) for _ in range(args.runs)]
    cpu = runs[0].meta["cpu"]
    print(f"{fam.name}: {args.runs} paired profiles of {args.rounds} rounds on {cpu['model']} "
          f"({', '.join(cpu['isa'])}); {', '.join(str(r.meta['seconds']) + ' s' for r in runs)}")
    header = ["variant"] + [f"b{b} speed-up" for b in BATCH_SIZES] + ["worst spread"]
    rows, worst = [], 0.0
    for name in runners:
        cells, spread_v = [], 0.0
        for b in BATCH_SIZES:
            xs = [r.speedup[name][str(b)] for r in runs]
            spread = max(xs) / min(xs) - 1
            spread_v = max(spread_v, spread)
            recorded = (fam.variants[name].speedup or {}).get(str(b)) \
                if name in fam.variants else None
            rec = "" if recorded is None else f" (manifest {recorded:.2f})"
            cells.append(" / ".join(f"{v:.2f}" for v in xs) + rec)
        worst = max(worst, spread_v)
        rows.append([name, *cells, f"{100 * spread_v:.1f}%"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    print(f"largest spread between runs (max/min − 1): {100 * worst:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
