"""The load generator: open-loop Poisson arrivals in phases of rising rate, mixed budgets.

Open loop (arrivals do not wait for answers) is what exposes queueing: when the offered rate
outgrows the server, requests pile up and the router has to answer with cheaper variants. Each
request draws an image (with its label, for accuracy) and a budget; every answer or error becomes
a `Record`. `summarize` turns records into the demo's tables.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from client.client import build_request, deadline_s, parse_response
from protos.generated import grpc_service_pb2_grpc


@dataclass(frozen=True)
class Phase:
    rate: float  # requests per second offered
    seconds: float


@dataclass(frozen=True)
class Record:
    phase: int
    budget_ms: float | None
    status: str  # gRPC status name; "OK" when answered
    candidate: str | None  # variant, or variant@exit (the deepest exit its samples used)
    latency_ms: float
    correct: int | None  # samples classified correctly (None: no labels, or no answer)
    samples: int = 1

    @property
    def met(self) -> bool:
        return self.status == "OK" and (self.budget_ms is None or self.latency_ms <= self.budget_ms)


async def run_load(target: str, model: str, images: np.ndarray, labels: np.ndarray | None,
                   phases: Sequence[Phase], budgets: Sequence[float | None], *,
                   batch: int = 1, seed: int = 0, max_inflight: int = 512) -> list[Record]:
    """Drive ``phases`` against ``target`` with ``batch`` images per request; returns one record
    per request sent."""
    rng = random.Random(seed)
    records: list[Record] = []
    gate = asyncio.Semaphore(max_inflight)  # past this, arrivals are dropped (client overload)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def one(phase: int, i: int, budget: float | None) -> None:
            x = images[i:i + batch]
            t0 = time.perf_counter()
            try:
                resp = await stub.ModelInfer(build_request(model, x, budget_ms=budget),
                                             timeout=deadline_s(budget, 10.0 if budget is None
                                                                else None))
            except grpc.aio.AioRpcError as exc:
                records.append(Record(phase, budget, exc.code().name, None,
                                      (time.perf_counter() - t0) * 1e3, None, len(x)))
                return
            finally:
                gate.release()
            r = parse_response(resp, (time.perf_counter() - t0) * 1e3)
            cand = r.variant if r.exit is None else f"{r.variant}@{r.exit}"
            correct = None if labels is None else int((r.classes == labels[i:i + batch]).sum())
            records.append(Record(phase, budget, "OK", cand, r.latency_ms, correct, len(x)))

        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        for p, phase in enumerate(phases):
            start = loop.time()
            t = start
            while True:
                t += rng.expovariate(phase.rate)
                if t - start >= phase.seconds:
                    break
                await asyncio.sleep(max(t - loop.time(), 0.0))  # the arrival process itself
                if gate.locked():
                    records.append(Record(p, None, "CLIENT_OVERLOADED", None, 0.0, None))
                    continue
                await gate.acquire()
                task = asyncio.create_task(one(p, rng.randrange(len(images) - batch + 1),
                                               rng.choice(list(budgets))))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    return records


def _pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.2f}" if values else "-"


def _share(num: int, den: int) -> str:
    return f"{100.0 * num / den:.1f}%" if den else "-"


def _accuracy(rs: list[Record]) -> str:
    judged = [r for r in rs if r.correct is not None]
    return _share(sum(r.correct or 0 for r in judged), sum(r.samples for r in judged)) \
        if judged else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def summarize(records: list[Record], phases: Sequence[Phase]) -> str:
    """Three tables: per phase, per candidate used, per budget."""
    out = []
    rows: list[list[str]] = []
    for p, phase in enumerate(phases):
        rs = [r for r in records if r.phase == p]
        ok = [r for r in rs if r.status == "OK"]
        lat = [r.latency_ms for r in ok]
        used = collections.Counter(r.candidate for r in ok).most_common(1)
        rows.append([f"{phase.rate:.0f}/s", str(len(rs)), _share(len(ok), len(rs)),
                     _pct(lat, 50), _pct(lat, 99), _share(sum(r.met for r in rs), len(rs)),
                     _accuracy(ok), str(used[0][0]) if used else "-"])
    out.append(_table(["offered", "requests", "answered", "p50 ms", "p99 ms", "in budget",
                       "accuracy", "most used"], rows))
    ok = [r for r in records if r.status == "OK"]
    by_cand: dict[str, list[Record]] = collections.defaultdict(list)
    for r in ok:
        by_cand[r.candidate or "?"].append(r)
    rows = [[c, str(len(rs)), _share(len(rs), len(ok)), _pct([r.latency_ms for r in rs], 50),
             _share(sum(r.met for r in rs), len(rs)), _accuracy(rs)]
            for c, rs in sorted(by_cand.items(), key=lambda kv: -len(kv[1]))]
    out.append(_table(["variant/exit", "answers", "share", "p50 ms", "in budget", "accuracy"],
                      rows))
    by_budget: dict[float | None, list[Record]] = collections.defaultdict(list)
    for r in records:
        by_budget[r.budget_ms].append(r)
    rows = []
    for b, rs in sorted(by_budget.items(), key=lambda kv: float("inf") if kv[0] is None
                        else kv[0]):
        answered = [r for r in rs if r.status == "OK"]
        used = collections.Counter(r.candidate for r in answered).most_common(1)
        rows.append(["none" if b is None else f"{b:g} ms", str(len(rs)),
                     _share(sum(r.met for r in rs), len(rs)), _accuracy(answered),
                     str(used[0][0]) if used else "-"])
    out.append(_table(["budget", "requests", "in budget", "accuracy", "most used"], rows))
    errors = collections.Counter(r.status for r in records if r.status != "OK")
    if errors:
        out.append("errors: " + ", ".join(f"{k} {v}" for k, v in errors.most_common()))
    return "\n\n".join(out)
