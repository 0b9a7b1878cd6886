"""The load generator: every request that the bench, the demo and the benchmark scripts send.

Three ways to load a server, all from here:

- **Open loop** (`run_open_loop`, `run_phases`): arrivals at an offered rate, Poisson by default
  (evenly spaced on request), that never wait for answers. An open loop is what exposes
  queueing: a closed loop slows down with the server and hides it. Each request carries images
  from a `TestData` (with labels, so accuracy is measured) and a latency budget drawn from a
  `BudgetSpec`; every arrival becomes one `Record`, including the ones the client could not send.
- **Closed loop** (`closed_loop`): a fixed number of requests always in flight, for a variant's
  capacity (saturation throughput).
- **Sequential** (`sequential_ms`): one request in flight, for idle round trips.

Figures, tables and CSV of the records are in `client.results`; the `bench` command that runs
one open loop per rate is `client.bench`.

Counts add up: ``offered = sent + client_dropped + client_throttled`` and ``sent = answered +
errors``. A budget is met when the answer arrives (client round trip) within it; errors, client
drops and arrivals the client's throttle kept back are misses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from client.budgets import BudgetSpec
from client.client import AdaptiveClient, build_request, deadline_s, parse_response, refusal_of
from client.throttle import AdaptiveThrottle, ThrottleConfig
from protos import wire
from protos.generated import grpc_service_pb2_grpc

if TYPE_CHECKING:
    from compression.core.family import Family

log = logging.getLogger(__name__)

OK = "OK"  # the gRPC status name of an answered request
DROPPED = "CLIENT_DROPPED"  # an arrival the client could not send: max_inflight reached
THROTTLED = "CLIENT_THROTTLED"  # an arrival the client's adaptive throttle refused to send
CLIENT_ERROR = "CLIENT_ERROR"  # the call failed inside the client (not a gRPC status)
# TCP connections the generator opens and sends round-robin over. A server with `--workers N`
# shares its port with SO_REUSEPORT, and the kernel spreads *connections*, not requests, over the
# workers: one connection would keep N-1 of them idle. Eight make an idle worker unlikely
# (2 workers: 1 in 128) at no measurable cost to a single-process server.
CONNECTIONS = 8
CONNECT_TIMEOUT_S = 10.0  # how long the generator waits for its connections before it starts


# --- one request's outcome ----------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    """One arrival of an open loop: answered, failed with a gRPC status, or dropped."""

    phase: int  # index of the run (bench: its rate) or phase (demo) the arrival belongs to
    budget_ms: float | None
    status: str  # gRPC status name; OK when answered, else also DROPPED or CLIENT_ERROR
    candidate: str | None  # wire.candidate_name: variant, or variant@exit (the deepest used)
    latency_ms: float  # client round trip (0 for a drop)
    correct: int | None  # samples classified correctly (None: no labels, or no answer)
    samples: int = 1

    @property
    def met(self) -> bool:
        """Answered within the budget (any answer meets no budget)."""
        return self.status == OK and (self.budget_ms is None or self.latency_ms <= self.budget_ms)


# --- test data -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TestData:
    """The images requests are cut from, and their labels."""

    __test__ = False  # not a pytest test class, whatever its name

    x: np.ndarray  # [N, C, H, W] float32 in [0, 1]
    y: np.ndarray | None  # [N] labels, None: accuracy is not measured
    description: dict[str, Any]


def load_test_data(spec: str | None, family: str | Path | Family | None = None, seed: int = 0,
                   val_fraction: float = 0.1, test_fraction: float = 0.2) -> TestData:
    """The test split of dataset ``spec`` (a `compression.data` spec), split exactly as a family
    built with ``seed`` and these fractions. With ``family`` (a directory or a loaded `Family`),
    its manifest supplies the spec, seed and fractions (``spec`` still overrides the dataset), so
    the images are the ones the family was never trained on. ``"random"``: random pixels, no
    labels (shape from the family, else 1×28×28). A dataset that cannot be loaded raises
    `compression.core.errors.DataError`."""
    from compression import data

    if family is not None:
        from compression.core.family import load_family

        manifest = (load_family(family) if isinstance(family, str | Path) else family).manifest
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


def fixed_images(x: np.ndarray) -> TestData:
    """Every request sends exactly ``x`` (no labels): for load whose content does not matter."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return TestData(x, None, {"spec": "fixed", "images": len(x), "labels": False})


# --- the open loop -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    """A stretch of constant offered rate (the demo offers several back to back)."""

    rate: float  # requests per second offered
    seconds: float


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
    # The deadline of a request without a budget when ``timeout_s`` is None (None: no deadline).
    # The demo sets one so a stuck server cannot hang it.
    no_budget_timeout_s: float | None = None
    # gRPC deadline = the budget: the server then also counts what happened before its handler
    # (transport, gRPC queue) against the budget; a late answer ends DEADLINE_EXCEEDED.
    deadline_is_budget: bool = False
    poisson: bool = True  # False: arrivals evenly spaced, 1/rate apart (the soak's steady push)
    # Client-side adaptive throttling (`client.throttle`), one throttle per run shared by all its
    # connections; None: every arrival is sent, as a client without one would.
    throttle: ThrottleConfig | None = None

    def deadline(self, budget_ms: float | None) -> float | None:
        if self.deadline_is_budget and budget_ms is not None:
            return budget_ms / 1e3
        if budget_ms is None and self.timeout_s is None:
            return self.no_budget_timeout_s
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
    throttled: int = 0
    met: int = 0
    inflight: int = 0
    recent_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=512))

    def line(self) -> str:
        t = min(time.perf_counter() - self.started, self.seconds)
        p50 = f"{np.percentile(self.recent_ms, 50):.2f}" if self.recent_ms else "-"
        done = self.answered + self.errors + self.dropped + self.throttled
        attain = f"{100 * self.met / done:.1f}%" if done else "-"
        throttled = f"  throttled {self.throttled}" if self.throttled else ""
        return (f"{self.rate:g}/s  {t:4.1f}/{self.seconds:g} s  sent {self.sent}  answered "
                f"{self.answered}  errors {self.errors}  dropped {self.dropped}{throttled}  in flight "
                f"{self.inflight}  p50 {p50} ms  in budget {attain}")


async def run_open_loop(target: str, model: str, data: TestData, cfg: RunConfig, *,
                        run_index: int = 0, progress: Callable[[str], None] | None = None,
                        progress_every_s: float = 0.5) -> RunOutput:
    """Offer ``cfg.rate`` arrivals per second for ``cfg.seconds`` and wait for every answer;
    returns one record per arrival (tagged ``run_index``), the seconds until the last answer and
    how late each request left the client against its scheduled arrival (the client keeping
    up). The arrivals are seeded by ``cfg.seed`` and ``run_index``: runs with the same seed
    offer the same arrivals, budgets and images (a paired comparison)."""
    rng = random.Random(cfg.seed * 1_000_003 + run_index)
    return await _open_loop(target, model, data, [(run_index, cfg)], rng, progress,
                            progress_every_s)


async def run_phases(target: str, model: str, data: TestData, cfg: RunConfig,
                     phases: Sequence[Phase]) -> RunOutput:
    """``phases`` back to back on one channel, each with ``cfg`` at its own rate and length; a
    phase's arrivals start while the previous phase's answers are still coming (the load keeps
    rising). Records are tagged with the phase's index."""
    rng = random.Random(cfg.seed * 1_000_003)
    runs = [(i, replace(cfg, rate=p.rate, seconds=p.seconds)) for i, p in enumerate(phases)]
    return await _open_loop(target, model, data, runs, rng, None, 0.5)


async def _open_loop(target: str, model: str, data: TestData,
                     runs: Sequence[tuple[int, RunConfig]], rng: random.Random,
                     progress: Callable[[str], None] | None, progress_every_s: float
                     ) -> RunOutput:
    n = len(data.x)
    for _, cfg in runs:
        if cfg.images > n:
            raise ValueError(f"images per request {cfg.images!r}: the test data has only {n}")
    state = Progress()
    records: list[Record] = []
    lags: list[float] = []
    first_cfg = runs[0][1] if runs else None
    throttle = None
    if first_cfg is not None and first_cfg.throttle is not None:
        # Its own seeded draws: a throttled run offers the same arrivals as an unthrottled one.
        throttle = AdaptiveThrottle(first_cfg.throttle, rng=random.Random(first_cfg.seed + 1))
    async with connections(target) as stubs:
        loop = asyncio.get_running_loop()
        turn = itertools.cycle(stubs)  # round-robin over the connections

        async def one(index: int, cfg: RunConfig, start: int, budget: float | None,
                      scheduled: float) -> None:
            stub = next(turn)
            x = data.x[start:start + cfg.images]
            status, cand, correct, refusal = OK, None, None, None
            lags.append((loop.time() - scheduled) * 1e3)
            sent_at = throttle.now() if throttle is not None else None
            t0 = time.perf_counter()
            try:
                resp = await stub.ModelInfer(
                    build_request(model, x, budget_ms=budget, variant=cfg.variant),
                    timeout=cfg.deadline(budget))
                latency = (time.perf_counter() - t0) * 1e3
                r = parse_response(resp, latency)
                cand = r.candidate
                if data.y is not None:
                    correct = int((r.classes == data.y[start:start + cfg.images]).sum())
            except grpc.aio.AioRpcError as exc:
                latency = (time.perf_counter() - t0) * 1e3
                status, refusal = exc.code().name, refusal_of(exc)
            except Exception:  # a malformed answer: still one request, counted as an error
                latency = (time.perf_counter() - t0) * 1e3
                status = CLIENT_ERROR
                log.exception("load: request failed in the client")
            if throttle is not None:
                throttle.record_status(status, refusal, sent_at=sent_at)
            rec = Record(index, budget, status, cand, latency, correct, len(x))
            records.append(rec)
            state.inflight -= 1
            if status == OK:
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
        first = loop.time()
        for index, cfg in runs:
            start = loop.time()
            state.rate, state.seconds, state.started = cfg.rate, cfg.seconds, time.perf_counter()
            t = start
            while True:
                # Arrival times are absolute: if the loop falls behind it catches up at once, so
                # the offered rate does not sag when the client is busy.
                t += rng.expovariate(cfg.rate) if cfg.poisson else 1.0 / cfg.rate
                if t - start >= cfg.seconds:
                    break
                delay = t - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                state.offered += 1
                budget = cfg.budget.sample(rng)
                if state.inflight >= cfg.max_inflight:
                    records.append(Record(index, budget, DROPPED, None, 0.0, None, cfg.images))
                    state.dropped += 1
                    continue
                start_at = rng.randrange(n - cfg.images + 1)
                if throttle is not None and not throttle.admit():
                    records.append(Record(index, budget, THROTTLED, None, 0.0, None, cfg.images))
                    state.throttled += 1
                    continue
                state.sent += 1
                state.inflight += 1
                task = asyncio.create_task(one(index, cfg, start_at, budget, t))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        wall = loop.time() - first
        if reporter is not None and progress is not None:
            reporter.cancel()
            progress(state.line())
    return RunOutput(records, wall, lags)


@contextlib.asynccontextmanager
async def connections(target: str, count: int = CONNECTIONS
                      ) -> AsyncIterator[list[grpc_service_pb2_grpc.GRPCInferenceServiceStub]]:
    """``count`` channels to ``target``, each on its own TCP connection (channels with the same
    arguments would otherwise share one subchannel: `grpc.use_local_subchannel_pool`), connected
    before the first request: a request whose budget had to cover the TCP and HTTP/2 handshakes
    would measure the client's start, not the server. A server that cannot be reached within
    ``CONNECT_TIMEOUT_S`` is left to fail the requests (UNAVAILABLE, counted as errors)."""
    options = [*wire.channel_options(), ("grpc.use_local_subchannel_pool", 1)]
    async with contextlib.AsyncExitStack() as stack:
        channels = [await stack.enter_async_context(grpc.aio.insecure_channel(target, options))
                    for _ in range(max(count, 1))]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)),
                                   CONNECT_TIMEOUT_S)
        yield [grpc_service_pb2_grpc.GRPCInferenceServiceStub(c) for c in channels]


def choose_images(predicted_ms: Callable[[int], float], choices: Sequence[int],
                  min_compute_ms: float) -> int:
    """The fewest images per request (of ``choices``, ascending) whose predicted compute reaches
    ``min_compute_ms``: enough that the model, not the gRPC round trip, dominates a request."""
    for b in choices:
        if predicted_ms(b) >= min_compute_ms:
            return b
    return choices[-1]


# --- closed loop and sequential -----------------------------------------------------------------

@dataclass(frozen=True)
class ClosedLoopResult:
    answered: int
    errors: dict[str, int]  # gRPC status name → count
    seconds: float  # from the first request to the last answer
    details: dict[str, str] = field(default_factory=dict)  # status name → its first message

    @property
    def rps(self) -> float:
        """Answers per second: the capacity at this concurrency."""
        return self.answered / self.seconds if self.seconds > 0 else 0.0


async def closed_loop(target: str, model: str, x: np.ndarray, *, concurrency: int,
                      seconds: float, variant: str | None = None, budget_ms: float | None = None,
                      timeout_s: float | None = None) -> ClosedLoopResult:
    """``concurrency`` requests always in flight for ``seconds`` (each worker sends its next
    request when the previous one is answered), all the same request: the throughput of
    ``variant`` (or of the router) at saturation. Failed calls are counted, not raised."""
    answered = 0
    errors: collections.Counter[str] = collections.Counter()
    details: dict[str, str] = {}
    request = build_request(model, x, budget_ms=budget_ms, variant=variant)
    timeout = deadline_s(budget_ms, timeout_s)
    async with connections(target) as stubs:
        stop = time.perf_counter() + seconds

        async def worker(stub: grpc_service_pb2_grpc.GRPCInferenceServiceStub) -> None:
            nonlocal answered
            while time.perf_counter() < stop:
                try:
                    await stub.ModelInfer(request, timeout=timeout)
                    answered += 1
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                    errors[code] += 1
                    details.setdefault(code, (exc.details() or "")[:300])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return ClosedLoopResult(answered, dict(errors), elapsed, details)


def sequential_ms(client: AdaptiveClient, x: np.ndarray, n: int, *, variant: str | None = None,
                  budget_ms: float | None = None, warmup: int = 0) -> np.ndarray:
    """Round trips (ms) of ``n`` requests sent one after another, after ``warmup`` unmeasured
    ones (they open the connection and warm the variant)."""
    for _ in range(warmup):
        client.infer(x, budget_ms=budget_ms, variant=variant)
    return np.asarray([client.infer(x, budget_ms=budget_ms, variant=variant).latency_ms
                       for _ in range(n)])
