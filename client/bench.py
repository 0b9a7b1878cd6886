"""`adaptive-inference bench`: open-loop load against a running server, measured at the client.

Arrivals are Poisson at each offered rate and never wait for answers (an open loop: a closed loop
slows down with the server and hides its queueing). Each request carries images from the
dataset's test split, so the accuracy of the answers is measured, and a latency budget drawn from
a `BudgetSpec`. Every arrival becomes one `client.load.Record`; `summarize_run` turns a run's
records into the figures of ``results.json``: throughput, budget attainment, goodput, latency
percentiles, accuracy, the share of each variant/exit and errors by status code.

Counts add up: ``offered = sent + client_dropped`` and ``sent = answered + errors``. A budget is
met when the answer arrives (client round trip) within it; errors and client drops are misses.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from client.client import build_request, deadline_s, parse_response
from client.load import Record
from protos.generated import grpc_service_pb2_grpc

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DROPPED = "CLIENT_DROPPED"  # an arrival the client could not send: --max-inflight reached
CLIENT_ERROR = "CLIENT_ERROR"  # the call failed inside the client (not a gRPC status)


# --- budgets --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BudgetSpec:
    """Where each request's budget (ms) comes from: ``none``, ``5``, ``uniform:A:B``, or a weighted
    mixture ``2:0.5,10:0.3,50:0.2`` (``value:weight``; ``none`` is a value too)."""

    text: str
    values: tuple[float | None, ...] = ()  # fixed / mixture points
    weights: tuple[float, ...] = ()  # normalised to sum 1
    uniform: tuple[float, float] | None = None

    @classmethod
    def parse(cls, text: str) -> BudgetSpec:
        s = text.strip().lower()
        if s.startswith("uniform:"):
            parts = s.split(":")
            if len(parts) != 3:
                raise ValueError(f"budget spec {text!r}: expected uniform:A:B (milliseconds)")
            a, b = _positive(text, parts[1]), _positive(text, parts[2])
            if a > b:
                raise ValueError(f"budget spec {text!r}: A={a!r} is above B={b!r}")
            return cls(text, uniform=(a, b))
        if "," in s or ":" in s:
            values: list[float | None] = []
            weights: list[float] = []
            for item in s.split(","):
                value, sep, weight = item.partition(":")
                if not sep:
                    raise ValueError(f"budget spec {text!r}: mixture item {item!r} is not "
                                     "VALUE:WEIGHT")
                values.append(None if value.strip() == "none" else _positive(text, value))
                weights.append(_positive(text, weight))
            total = sum(weights)
            return cls(text, tuple(values), tuple(w / total for w in weights))
        return cls(text, (None if s == "none" else _positive(text, s),), (1.0,))

    def sample(self, rng: random.Random) -> float | None:
        if self.uniform is not None:
            return rng.uniform(*self.uniform)
        if len(self.values) == 1:
            return self.values[0]
        return rng.choices(self.values, weights=self.weights)[0]

    @property
    def discrete(self) -> bool:
        return self.uniform is None

    def __str__(self) -> str:
        return self.text


def _positive(spec: str, value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"budget spec {spec!r}: {value.strip()!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"budget spec {spec!r}: {v!r} must be positive and finite")
    return v


def parse_rates(text: str) -> list[float]:
    """``"50"`` or ``"50,100,200"`` → offered rates (requests/s), each positive."""
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"rate {text!r}: expected R or R1,R2,... (requests per second)") from None
    if not rates or any(not (r > 0 and math.isfinite(r)) for r in rates):
        raise ValueError(f"rate {text!r}: every rate must be positive")
    return rates


# --- test data -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TestData:
    x: np.ndarray  # [N, C, H, W] float32 in [0, 1]
    y: np.ndarray | None  # [N] labels, None: accuracy is not measured
    description: dict[str, Any]


def load_test_data(spec: str | None, family: str | Path | None = None, seed: int = 0,
                   val_fraction: float = 0.1, test_fraction: float = 0.2) -> TestData:
    """The test split of dataset ``spec`` (a `compression.data` spec), split exactly as a family
    built with ``seed`` and these fractions. With ``family``, its manifest supplies the spec, seed
    and fractions (``spec`` still overrides the dataset). ``"random"``: random pixels, no labels
    (shape from the family, else 1×28×28)."""
    from compression import data

    if family is not None:
        from compression.core.family import load_family

        manifest = load_family(family).manifest
        cfg = manifest.get("build", {}).get("config", {})
        spec = spec or manifest["dataset"]["spec"]
        seed = int(manifest.get("build", {}).get("seed", seed))
        val_fraction = float(cfg.get("val_fraction", val_fraction))
        test_fraction = float(cfg.get("test_fraction", test_fraction))
        shape = tuple(manifest["input"]["shape"])
    else:
        shape = (1, 28, 28)
    spec = spec or "mnist5k"
    if spec == "random":
        x = np.random.default_rng(seed).random((512, *shape), dtype=np.float32)
        return TestData(x, None, {"spec": "random", "images": len(x), "labels": False})
    splits = data.split(data.load(spec), seed=seed, val_fraction=val_fraction,
                        test_fraction=test_fraction)
    return TestData(np.ascontiguousarray(splits.x_test, dtype=np.float32),
                    splits.y_test.astype(np.int64),
                    {"spec": spec, "split": "test", "seed": seed, "val_fraction": val_fraction,
                     "test_fraction": test_fraction, "images": len(splits.x_test),
                     "labels": True})


# --- the open loop -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunConfig:
    """One run: ``rate`` requests/s offered for ``seconds``."""

    rate: float
    seconds: float
    budget: BudgetSpec
    variant: str | None = None  # pin (also VARIANT@EXIT); None: the router chooses
    images: int = 1  # per request
    seed: int = 0
    max_inflight: int = 4096  # arrivals beyond this many unanswered requests are dropped
    timeout_s: float | None = None  # gRPC deadline; None: 2 × budget + 50 ms (AdaptiveClient's)
    # gRPC deadline = the budget: the server then also counts what happened before its handler
    # (transport, gRPC queue) against the budget; a late answer ends DEADLINE_EXCEEDED.
    deadline_is_budget: bool = False

    def deadline(self, budget_ms: float | None) -> float | None:
        if self.deadline_is_budget and budget_ms is not None:
            return budget_ms / 1e3
        return deadline_s(budget_ms, self.timeout_s)


@dataclass(frozen=True)
class RunOutput:
    records: list[Record]  # one per arrival
    wall_s: float  # first arrival to last answer
    send_lag_ms: list[float]  # per sent request: left the client this long after its arrival


@dataclass
class Progress:
    """Live counters of the run in progress (read by the progress line)."""

    rate: float = 0.0
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    offered: int = 0
    sent: int = 0
    answered: int = 0
    errors: int = 0
    dropped: int = 0
    met: int = 0
    inflight: int = 0
    recent_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=512))

    def line(self) -> str:
        t = min(time.perf_counter() - self.started, self.seconds)
        p50 = f"{np.percentile(self.recent_ms, 50):.2f}" if self.recent_ms else "-"
        done = self.answered + self.errors + self.dropped
        attain = f"{100 * self.met / done:.1f}%" if done else "-"
        return (f"{self.rate:g}/s  {t:4.1f}/{self.seconds:g} s  sent {self.sent}  answered "
                f"{self.answered}  errors {self.errors}  dropped {self.dropped}  in flight "
                f"{self.inflight}  p50 {p50} ms  in budget {attain}")


async def run_open_loop(target: str, model: str, data: TestData, cfg: RunConfig, *,
                        run_index: int = 0, progress: Callable[[str], None] | None = None,
                        progress_every_s: float = 0.5) -> RunOutput:
    """Offer ``cfg.rate`` Poisson arrivals per second for ``cfg.seconds`` and wait for every
    answer; returns one record per arrival, the seconds until the last answer and how late
    each request left the client against its scheduled arrival (the client keeping up)."""
    n = len(data.x)
    if cfg.images > n:
        raise ValueError(f"images per request {cfg.images!r}: the test split has only {n}")
    rng = random.Random(cfg.seed * 1_000_003 + run_index)
    state = Progress(rate=cfg.rate, seconds=cfg.seconds)
    records: list[Record] = []
    lags: list[float] = []
    options = [("grpc.max_receive_message_length", 64 << 20),
               ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def one(start: int, budget: float | None, scheduled: float) -> None:
            x = data.x[start:start + cfg.images]
            status, cand, correct = "OK", None, None
            lags.append((loop.time() - scheduled) * 1e3)
            t0 = time.perf_counter()
            try:
                resp = await stub.ModelInfer(
                    build_request(model, x, budget_ms=budget, variant=cfg.variant),
                    timeout=cfg.deadline(budget))
                latency = (time.perf_counter() - t0) * 1e3
                r = parse_response(resp, latency)
                cand = r.variant if r.exit is None else f"{r.variant}@{r.exit}"
                if data.y is not None:
                    correct = int((r.classes == data.y[start:start + cfg.images]).sum())
            except grpc.aio.AioRpcError as exc:
                latency = (time.perf_counter() - t0) * 1e3
                status = exc.code().name
            except Exception:  # a malformed answer: still one request, counted as an error
                latency = (time.perf_counter() - t0) * 1e3
                status = CLIENT_ERROR
                log.exception("bench: request failed in the client")
            rec = Record(run_index, budget, status, cand, latency, correct, len(x))
            records.append(rec)
            state.inflight -= 1
            if status == "OK":
                state.answered += 1
                state.recent_ms.append(latency)
            else:
                state.errors += 1
            state.met += rec.met

        async def report() -> None:
            while True:
                await asyncio.sleep(progress_every_s)  # a display period, not a wait for an event
                assert progress is not None
                progress(state.line())

        reporter = asyncio.create_task(report()) if progress is not None else None
        tasks: set[asyncio.Task[None]] = set()
        loop = asyncio.get_running_loop()
        start = loop.time()
        state.started = time.perf_counter()
        t = start
        while True:
            # Arrival times are absolute: if the loop falls behind it catches up at once, so the
            # offered rate does not sag when the client is busy.
            t += rng.expovariate(cfg.rate)
            if t - start >= cfg.seconds:
                break
            delay = t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            state.offered += 1
            budget = cfg.budget.sample(rng)
            if state.inflight >= cfg.max_inflight:
                records.append(Record(run_index, budget, DROPPED, None, 0.0, None, cfg.images))
                state.dropped += 1
                continue
            state.sent += 1
            state.inflight += 1
            task = asyncio.create_task(one(rng.randrange(n - cfg.images + 1), budget, t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        wall = loop.time() - start
        if reporter is not None:
            reporter.cancel()
            progress(state.line())  # type: ignore[misc]
    return RunOutput(records, wall, lags)


# --- summaries -----------------------------------------------------------------------------------

def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def summarize_run(records: Sequence[Record], cfg: RunConfig, wall_s: float,
                  send_lag_ms: Sequence[float] = ()) -> dict[str, Any]:
    """The figures of one run (see the module docstring for how counts relate). Latency runs
    from when a request left the client; ``send_lag_ms`` says how far that trailed the Poisson
    schedule (large values: the client, not the server, limited the offered load)."""
    offered = len(records)
    dropped = sum(r.status == DROPPED for r in records)
    sent = offered - dropped
    ok = [r for r in records if r.status == "OK"]
    errors = collections.Counter(r.status for r in records if r.status not in ("OK", DROPPED))
    met = sum(r.met for r in records)
    lat = [r.latency_ms for r in ok]
    judged = [r for r in ok if r.correct is not None]
    samples = sum(r.samples for r in judged)
    correct = sum(r.correct or 0 for r in judged)
    used = collections.Counter(r.candidate or "?" for r in ok)
    out: dict[str, Any] = {
        "offered_rps": cfg.rate, "seconds": cfg.seconds, "wall_s": round(wall_s, 3),
        "offered": offered, "sent": sent, "answered": len(ok), "errors": sum(errors.values()),
        "client_dropped": dropped, "errors_by_code": dict(errors.most_common()),
        "met": met,
        "throughput_rps": round(len(ok) / cfg.seconds, 3),
        "goodput_rps": round(met / cfg.seconds, 3),
        "attainment": round(met / offered, 5) if offered else None,
        "latency_ms": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99),
                       "mean": round(float(np.mean(lat)), 3) if lat else None,
                       "max": round(max(lat), 3) if lat else None},
        "accuracy": round(correct / samples, 5) if samples else None,
        "samples_judged": samples,
        "share": {c: round(k / len(ok), 5) for c, k in used.most_common()},
        "answers": dict(used.most_common()),
        "send_lag_ms": {"p50": _pct(send_lag_ms, 50), "p99": _pct(send_lag_ms, 99),
                        "max": round(max(send_lag_ms), 3) if len(send_lag_ms) else None},
    }
    if cfg.budget.discrete and len(cfg.budget.values) > 1:
        by: dict[str, dict[str, Any]] = {}
        for b in cfg.budget.values:
            rs = [r for r in records if r.budget_ms == b]
            key = "none" if b is None else f"{b:g}"
            by[key] = {"requests": len(rs),
                       "attainment": round(sum(r.met for r in rs) / len(rs), 5) if rs else None}
        out["by_budget"] = by
    return out


def host_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "load_average": [round(v, 2) for v in os.getloadavg()]}


# --- the command ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchResult:
    results: dict[str, Any]  # what results.json holds
    records: list[Record]


def run_bench(target: str, rates: Sequence[float], seconds: float, budget: BudgetSpec,
              data: TestData, *, variant: str | None = None, images: int = 1, seed: int = 0,
              max_inflight: int = 4096, timeout_s: float | None = None,
              deadline_is_budget: bool = False, wait_ready_s: float = 30.0,
              pause_s: float = 1.0, progress: Callable[[str], None] | None = None,
              progress_every_s: float = 0.5) -> BenchResult:
    """One run per offered rate against ``target`` (``pause_s`` of quiet between runs)."""
    from client.client import AdaptiveClient

    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_start = host_info()["load_average"]
    with AdaptiveClient(target) as client:
        client.wait_ready(timeout=wait_ready_s)
        model = client.model
        shape = [int(d) for d in client.metadata().inputs[0].shape][1:]
        table = client.variants(batch_size=images)
    if list(data.x.shape[1:]) != shape:
        raise ValueError(f"test images have shape {list(data.x.shape[1:])!r}; model {model!r} "
                         f"takes {shape!r}")
    names = {v.name for v in table} | {v.variant for v in table}
    if variant is not None and variant not in names:
        raise ValueError(f"variant {variant!r}: the server offers {sorted(names)!r}")
    runs: list[dict[str, Any]] = []
    records: list[Record] = []
    for i, rate in enumerate(rates):
        if i and pause_s > 0:
            time.sleep(pause_s)  # let the server's queues drain between runs
        cfg = RunConfig(rate=rate, seconds=seconds, budget=budget, variant=variant, images=images,
                        seed=seed, max_inflight=max_inflight, timeout_s=timeout_s,
                        deadline_is_budget=deadline_is_budget)
        out = asyncio.run(run_open_loop(target, model, data, cfg, run_index=i, progress=progress,
                                        progress_every_s=progress_every_s))
        runs.append(summarize_run(out.records, cfg, out.wall_s, out.send_lag_ms))
        records.extend(out.records)
        log.info("bench: %g/s done: %d answered, %d errors, attainment %s", rate,
                 runs[-1]["answered"], runs[-1]["errors"], runs[-1]["attainment"])
    host = host_info()
    load_end = host.pop("load_average")
    results = {
        "schema_version": SCHEMA_VERSION, "tool": "adaptive-inference bench",
        "started": started, "target": target, "model": model,
        "policy": "adaptive" if variant is None else f"pinned:{variant}", "variant": variant,
        "budget_ms": str(budget), "images_per_request": images, "seconds_per_rate": seconds,
        "seed": seed, "timeout_s": timeout_s, "deadline_is_budget": deadline_is_budget,
        "max_inflight": max_inflight,
        "data": data.description,
        "host": {**host, "load_average_start": load_start, "load_average_end": load_end},
        "server_variants": [{"name": v.name, "variant": v.variant, "exit": v.exit,
                             "accuracy": v.accuracy, "predicted_p50_ms": v.predicted_p50_ms,
                             "predicted_p95_ms": v.predicted_p95_ms} for v in table],
        "runs": runs,
    }
    return BenchResult(results, records)


def write_outputs(result: BenchResult, out: Path, *, plots: bool = True) -> list[Path]:
    """``results.json``, ``requests.csv`` (one row per arrival) and, with ``plots``, the PNGs."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "requests.csv"]
    paths[0].write_text(json.dumps(result.results, indent=2) + "\n")
    rates = [r["offered_rps"] for r in result.results["runs"]]
    with paths[1].open("w") as fh:
        fh.write("run,offered_rps,budget_ms,status,candidate,latency_ms,correct,samples\n")
        for r in result.records:
            fh.write(f"{r.phase},{rates[r.phase]:g},{'' if r.budget_ms is None else f'{r.budget_ms:.4f}'},"
                     f"{r.status},{r.candidate or ''},{r.latency_ms:.4f},"
                     f"{'' if r.correct is None else r.correct},{r.samples}\n")
    if plots:
        from client import bench_plots

        by_rate = {f"{rate:g}/s": [r for r in result.records if r.phase == i]
                   for i, rate in enumerate(rates)}
        paths.append(bench_plots.latency_cdf(by_rate, out / "latency_cdf.png",
                                             title=f"{result.results['policy']}: latency CDF "
                                                   f"against budget {result.results['budget_ms']}"))
        paths.append(bench_plots.load_curves({result.results["policy"]: result.results["runs"]},
                                             out / "load.png"))
    return paths


def read_records(path: Path) -> list[Record]:
    """``requests.csv`` back into records (for plots across several bench runs)."""
    out = []
    with path.open() as fh:
        next(fh)
        for line in fh:
            run, _rate, budget, status, cand, lat, correct, samples = line.rstrip("\n").split(",")
            out.append(Record(int(run), float(budget) if budget else None, status, cand or None,
                              float(lat), int(correct) if correct else None, int(samples)))
    return out


def summary_table(results: dict[str, Any]) -> str:
    """The per-rate figures as a fixed-width table (the CLI prints it)."""
    header = ["offered/s", "sent", "answered", "errors", "tput/s", "in budget", "goodput/s",
              "p50 ms", "p95 ms", "p99 ms", "accuracy", "most used"]
    rows = []
    for r in results["runs"]:
        lat = r["latency_ms"]
        top = next(iter(r["share"].items()), None)
        rows.append([f"{r['offered_rps']:g}", str(r["sent"]), str(r["answered"]), str(r["errors"]),
                     f"{r['throughput_rps']:.1f}",
                     "-" if r["attainment"] is None else f"{100 * r['attainment']:.1f}%",
                     f"{r['goodput_rps']:.1f}",
                     *("-" if lat[q] is None else f"{lat[q]:.2f}" for q in ("p50", "p95", "p99")),
                     "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%",
                     "-" if top is None else f"{top[0]} ({100 * top[1]:.0f}%)"])
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
             for row in [header, ["-" * w for w in widths], *rows]]
    errors = collections.Counter()
    for r in results["runs"]:
        errors.update(r["errors_by_code"])
    if errors:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in errors.most_common()))
    return "\n".join(lines)
