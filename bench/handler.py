"""The server's own CPU per unary answer, without sockets: the servicer's ModelInfer path in
process (decode, route, run inline on ORT, metrics, encode) and each part of it timed alone.

`bench/ceiling.py` measures the whole server under load, where gRPC's per-call path (the bare
echo's ~0.26 ms) dominates and rounds differ by ±10 %; this isolates the part that is ours, to a
few %, so a change to the request path can be judged before the ceiling is re-run. A real server
on the built family (ORT, default settings, warmed up), driven on its own event loop by one
caller: no gRPC, no contention. Under load on a shared host the same code costs more per answer
(cold caches after each preemption): read these as lower bounds and as ratios between rounds.

    .venv/bin/python bench/handler.py --family families/mnist5k [--calls 20000] [--json FILE]

``--under-load`` then serves the same family from this process over gRPC on 127.0.0.1 (as `serve`
does by default: uvloop, gRPC's poller thread reading the sockets) to ``--clients`` processes of
`bench/ceiling.py`'s pinned closed loop, and times each part of the request path in place: the
thread CPU per call of decode, routing, the ORT run, the batch's bookkeeping, encode and the
whole handler, beside the same part's figure alone. The ratio is what the server's other work
(gRPC's core, the poller thread, the clients on the same cores) costs the same code; the timer's
own cost is measured and taken off.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import inspect
import json
import os
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

# A sibling under bench/ (a script's own folder is on sys.path), not a package.
from ceiling import INFER_METHOD, Clients, Job

import server.servicer
from client.client import build_request
from client.loadgen import CONNECTIONS
from client.results import host_info
from compression.core.family import load_family
from server.app import create_server
from server.batcher import Item
from server.codec import decode_infer, encode_infer
from server.engine import Engine
from server.grpc_io import ENV, experiments
from server.loop import run
from server.memory import return_freed_memory
from server.router import Router
from server.runtime import OrtRunner
from server.servicer import InferenceServicer
from server.settings import ServeOptions

ROOT = Path(__file__).resolve().parent.parent
ORT_RUN = "ORT run, batch 1 (the fastest variant)"


class _Context:
    """What ModelInfer reads of a `grpc.aio.ServicerContext`: no deadline, no done callbacks."""

    def time_remaining(self) -> float | None:
        return None

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        pass

    async def abort(self, code: Any, details: str, trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"{code}: {details}")


def _us(fn: Callable[[], object], calls: int) -> float:
    """Best of 3 rounds of ``calls`` calls, µs per call (the least disturbed round)."""
    fn()
    return min(timeit.repeat(fn, number=calls, repeat=3)) / calls * 1e6


async def measure(family_dir: Path, calls: int) -> dict[str, Any]:
    fam = load_family(family_dir)
    fastest = fam.fastest().name
    srv, _port = await create_server(family_dir)
    try:
        await srv.wait_ready(300)
        engine, state = srv.engine, srv.state
        spec = state.spec
        x = np.random.default_rng(0).random((1, *fam.input_shape), dtype=np.float32)
        pinned = build_request(fam.name, x, variant=fastest)  # what bench/ceiling.py sends
        routed = build_request(fam.name, x, budget_ms=20.0)
        servicer, ctx = InferenceServicer(state), _Context()

        async def path(request: Any) -> tuple[float, str]:
            """CPU µs per call of the whole servicer path, best of 3 rounds; what answered (in
            the warm-up calls before them, so the rounds time the path alone)."""
            answered: collections.Counter[str] = collections.Counter()
            for _ in range(calls // 10):
                answered[(await servicer.ModelInfer(request, ctx)).model_version] += 1
            best = float("inf")
            for _ in range(3):
                c0 = time.process_time()
                for _ in range(calls):
                    await servicer.ModelInfer(request, ctx)
                best = min(best, (time.process_time() - c0) / calls * 1e6)
            total = sum(answered.values())
            return best, ", ".join(f"{v} {100 * n / total:.0f} %" for v, n in answered.most_common(3))

        whole = {}
        us, answered = await path(pinned)
        whole[f"unary, pinned, no budget: {answered}"] = us
        # Routed, the router would pick by the CPU share of this caller's rate, which moves
        # between rounds, and with it how many candidates it scans and which one answers (the
        # figure moved 135-218 µs). The share fixed below every candidate's compute, as under
        # load: it scans them all and answers with the cheapest that fits, the pinned call's
        # variant, so the routed figure less the pinned one is what routing costs.
        with mock.patch.object(engine.router.cpu, "share_ms", lambda now: 0.0):
            us, answered = await path(routed)
        whole[f"unary, routed, 20 ms budget, under load's CPU share: {answered}"] = us
        call = decode_infer(pinned, spec, time_remaining_s=None, margin_ms=state.margin_ms,
                            received=None, max_queue=engine.settings.max_queue)
        outcome = await engine.infer(call)
        load = engine.load()
        execute = engine.batchers[fastest]._execute
        items = [Item(call.x, None, None, 0.0, asyncio.get_running_loop().create_future())]
        out = execute(items)
        runner = engine.runners[fastest]
        m = engine.metrics
        parts = {
            "decode_infer": lambda: decode_infer(pinned, spec, time_remaining_s=None,
                                                 margin_ms=state.margin_ms, received=None,
                                                 max_queue=engine.settings.max_queue),
            "Engine.load": engine.load,
            "Router.choose, pinned": lambda: engine.router.choose(deadline=None, batch=1,
                                                                  load=load, pin=fastest),
            "Router.choose, 20 ms budget": lambda: engine.router.choose(
                deadline=engine.clock() + 0.02, batch=1, load=load),
            ORT_RUN: lambda: runner(call.x),
            "graph executor (ORT + checks)": lambda: execute(items),
            "Engine.batch_done": lambda: engine.batch_done(fastest, items, 0.0, out),
            "encode_infer": lambda: encode_infer(pinned, spec, outcome),
            "one counter inc": lambda: m.child(m.requests, fam.name, fastest, "OK").inc(),
            "one histogram observe": lambda: m.child(m.request_latency, fam.name,
                                                     fastest).observe(0.001),
        }
        return {"family": fam.name, "variant": fastest, "calls": calls, "host": host_info(),
                "path_us": whole, "parts_us": {k: _us(fn, calls) for k, fn in parts.items()}}
    finally:
        await srv.stop()


# --- under load: the same parts timed in a server answering gRPC clients ------------------------

class Probe:
    """Thread CPU time per call of chosen functions, patched in this process while it is
    installed. An async function is timed across its await: exact for the pinned unary path,
    which computes inline and never suspends (`Batcher.submit`)."""

    def __init__(self) -> None:
        self.cpu: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name)
        cpu, calls, clock = self.cpu, self.calls, time.thread_time

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                t = clock()
                try:
                    return await fn(*args, **kwargs)
                finally:
                    cpu[label] += clock() - t
                    calls[label] += 1
            wrapper: Any = timed_async
        else:
            @functools.wraps(fn)
            def timed(*args: Any, **kwargs: Any) -> Any:
                t = clock()
                try:
                    return fn(*args, **kwargs)
                finally:
                    cpu[label] += clock() - t
                    calls[label] += 1
            wrapper = timed
        self._undo.append((owner, name, owner.__dict__[name] if isinstance(owner, type) else fn))
        setattr(owner, name, wrapper)

    def reset(self) -> None:
        self.cpu.clear()
        self.calls.clear()

    def remove(self) -> None:
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)
        self._undo.clear()


def timer_us(calls: int = 200_000) -> float:
    """What one `Probe` wrapper adds to a call, µs (its two clock reads and two counts)."""
    probe = Probe()
    holder = type("Holder", (), {"noop": staticmethod(lambda: None)})
    bare = min(timeit.repeat(holder.noop, number=calls, repeat=3))
    probe.wrap(holder, "noop", "noop")
    timed = min(timeit.repeat(holder.noop, number=calls, repeat=3))
    return max(timed - bare, 0.0) / calls * 1e6


# Where each part is looked up at call time, so patching there reaches the running server; the
# labels are `measure`'s for the same parts alone.
PARTS: tuple[tuple[Any, str, str], ...] = (
    (server.servicer, "decode_infer", "decode_infer"),
    (Engine, "load", "Engine.load"),
    (Router, "choose", "Router.choose, pinned"),
    (OrtRunner, "__call__", ORT_RUN),
    (Engine, "batch_done", "Engine.batch_done"),
    (server.servicer, "encode_infer", "encode_infer"),
)
WHOLE = "unary path (decode to encode)"


async def under_load(family_dir: Path, *, clients: int, seconds: float) -> dict[str, Any]:
    """Serve the family from this process to ``clients`` closed-loop client processes (pinned to
    the fastest variant, 1 image, 16 calls in flight each, as `bench/ceiling.py`) and time each
    part of the request path over a ``seconds`` window."""
    fam = load_family(family_dir)
    fastest = fam.fastest().name
    x = np.random.default_rng(0).random((1, *fam.input_shape), dtype=np.float32)
    payload = build_request(fam.name, x, variant=fastest).SerializeToString()
    pool = Clients(clients)  # spawned before the server's threads exist
    srv, port = await create_server(family_dir)
    probe = Probe()
    try:
        await srv.wait_ready(300)
        for owner, name, label in PARTS:
            probe.wrap(owner, name, label)
        probe.wrap(InferenceServicer, "_infer", WHOLE)
        start_at = time.time() + 1.5  # 0.5 s to connect, then a second of load unmeasured
        pool.start(Job(f"127.0.0.1:{port}", INFER_METHOD, payload, 16, CONNECTIONS, start_at,
                       start_at + seconds, fastest), clients)
        await asyncio.sleep(max(start_at - time.time(), 0.0))
        probe.reset()
        cpu0 = time.process_time()
        await asyncio.sleep(max(start_at + seconds - time.time(), 0.0))
        cpu_s = time.process_time() - cpu0
        cpu, calls = collections.Counter(probe.cpu), collections.Counter(probe.calls)
        drives = await asyncio.to_thread(pool.results, clients)
    finally:
        probe.remove()
        pool.close()
        await srv.stop()
    timer = timer_us()
    answers = calls[WHOLE]
    inner = sum(calls[label] for _, _, label in PARTS) / max(answers, 1)  # timers per answer
    parts = {label: round(cpu[label] / calls[label] * 1e6 - timer, 2)
             for _, _, label in PARTS if calls[label]}
    if answers:
        parts[WHOLE] = round(cpu[WHOLE] / answers * 1e6 - timer * (1 + inner), 2)
    return {"clients": clients, "seconds": seconds, "answers": answers,
            "answers_per_s": round(sum(d.answers for d in drives) / seconds, 1),
            "process_cpu_ms_per_answer": round(
                (cpu_s - answers * (1 + inner) * timer / 1e6) / max(answers, 1) * 1e3, 4),
            "timer_us": round(timer, 3), "parts_cpu_us": parts}


def _as_served() -> None:
    """Re-run this script with gRPC reading its sockets as `serve` does by default
    (`server.grpc_io`): gRPC reads that setting once, when it loads, and it is loaded by now."""
    want = experiments(ServeOptions().grpc_io, os.environ.get(ENV))
    if os.environ.get(ENV, "") != want:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, ENV: want})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="families/mnist5k", help="a built family directory")
    ap.add_argument("--calls", type=int, default=20_000, help="calls per round (3 rounds)")
    ap.add_argument("--under-load", action="store_true",
                    help="also time each part in a server answering gRPC clients")
    ap.add_argument("--clients", type=int, default=4, help="--under-load: client processes")
    ap.add_argument("--seconds", type=float, default=4.0, help="--under-load: measured window")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    family_dir = Path(args.family) if Path(args.family).is_absolute() else ROOT / args.family
    if not (family_dir / "manifest.json").is_file():
        raise SystemExit(f"no family in {family_dir} (build it: make family)")
    if args.under_load:
        _as_served()
    return_freed_memory()  # as `serve` starts (server.memory)
    loop = ServeOptions().event_loop  # the loop `serve` runs on by default
    # Under load first, on a fresh heap, as a served process runs; the tight loop after it.
    loaded = (run(under_load(family_dir, clients=args.clients, seconds=args.seconds), loop)
              if args.under_load else None)
    fig = run(measure(family_dir, args.calls), loop)
    if loaded is not None:
        fig["under_load"] = loaded
    print(f"family {fig['family']!r}, {fig['calls']} calls per round, best of 3; "
          f"{fig['host']['cpus']} CPUs, {fig['host']['system']}")
    print(f"{'servicer path (CPU per call)':56s} {'µs':>7s}")
    for label, us in fig["path_us"].items():
        print(f"{label:56s} {us:7.1f}")
    print(f"{'part (wall per call)':56s} {'µs':>7s}")
    for label, us in fig["parts_us"].items():
        print(f"{label:56s} {us:7.2f}")
    if "under_load" in fig:
        load = fig["under_load"]
        alone = {**fig["parts_us"], WHOLE: next(iter(fig["path_us"].values()))}
        print(f"under load: {load['clients']} client processes × 16 calls in flight, "
              f"{load['answers_per_s']:,.0f} answers/s, {load['process_cpu_ms_per_answer']:.3f} ms "
              f"of this process's CPU per answer; timer {load['timer_us']:.2f} µs taken off")
        print(f"{'part (CPU per call)':44s} {'alone µs':>9s} {'loaded µs':>10s} {'ratio':>6s}")
        for label, us in load["parts_cpu_us"].items():
            base = alone.get(label)
            ratio = f"{us / base:5.1f}x" if base else ""
            print(f"{label:44s} {base if base is not None else float('nan'):9.2f} {us:10.2f} "
                  f"{ratio:>6s}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
