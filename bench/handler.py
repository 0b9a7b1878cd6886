"""The server's own CPU per unary answer, without sockets: the servicer's ModelInfer path in
process (decode, route, run inline on ORT, metrics, encode) and each part of it timed alone.

`bench/ceiling.py` measures the whole server under load, where gRPC's per-call path (the bare
echo's ~0.26 ms) dominates and rounds differ by ±10 %; this isolates the part that is ours, to a
few %, so a change to the request path can be judged before the ceiling is re-run. A real server
on the built family (ORT, default settings, warmed up), driven on its own event loop by one
caller: no gRPC, no contention. Under load on a shared host the same code costs more per answer
(cold caches after each preemption): read these as lower bounds and as ratios between rounds.

    .venv/bin/python bench/handler.py --family families/mnist5k [--calls 20000] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from client.client import build_request
from client.results import host_info
from compression.core.family import load_family
from server.app import create_server
from server.batcher import Item
from server.codec import decode_infer, encode_infer
from server.servicer import InferenceServicer

ROOT = Path(__file__).resolve().parent.parent


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
        # Routed, the router picks by the CPU share of this caller's rate: the variants (and
        # their compute) differ from the pinned call's, so only the pinned path is overhead.
        for label, request in (("pinned, no budget", pinned), ("routed, 20 ms budget", routed)):
            us, answered = await path(request)
            whole[f"unary, {label}: {answered}"] = us
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
            f"{fastest} on ORT, batch 1": lambda: runner(call.x),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="families/mnist5k", help="a built family directory")
    ap.add_argument("--calls", type=int, default=20_000, help="calls per round (3 rounds)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    family_dir = Path(args.family) if Path(args.family).is_absolute() else ROOT / args.family
    if not (family_dir / "manifest.json").is_file():
        raise SystemExit(f"no family in {family_dir} (build it: make family)")
    fig = asyncio.run(measure(family_dir, args.calls))
    print(f"family {fig['family']!r}, {fig['calls']} calls per round, best of 3; "
          f"{fig['host']['cpus']} CPUs, {fig['host']['system']}")
    print(f"{'servicer path (CPU per call)':56s} {'µs':>7s}")
    for label, us in fig["path_us"].items():
        print(f"{label:56s} {us:7.1f}")
    print(f"{'part (wall per call)':56s} {'µs':>7s}")
    for label, us in fig["parts_us"].items():
        print(f"{label:56s} {us:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2) + "\n")


if __name__ == "__main__":
    main()
