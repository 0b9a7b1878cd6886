"""Server assembly: `create_server` (used by tests, the demo and benchmarks) and `main` (the CLI).

Start-up order: bind and start gRPC with health NOT_SERVING → load the family (sha256 verified)
→ create the runners (CPU lanes on ONNX Runtime; GPU lanes on torch when ``--device`` puts them
there, see `accelerator_device`) → warm up and re-measure every lane on its device → start the
batchers → health SERVING. Inference runs in thread pools; the event loop only decodes, routes
and encodes.

Shutdown (SIGTERM, SIGINT, or `AdaptiveServer.stop`): health NOT_SERVING and new inference
requests refused with UNAVAILABLE at once (a client's retry policy moves them to another replica),
in-flight requests finish for up to ``grace_s``, then gRPC stops (`AdaptiveServer.stop`) or,
for a `serve` process, the process ends without gRPC's shutdown (see `serve`).

``--workers N`` forks N processes that each run `serve` (see `server.workers`). The fork happens
before any gRPC object or thread exists, and before prometheus_client is imported: hence the
function-level imports of grpc-using and prometheus modules below.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from compression.core.family import Family, load_family
from server.errors import InvalidArgument
from server.settings import ServeOptions

log = logging.getLogger(__name__)

# Each drains: health NOT_SERVING, new requests UNAVAILABLE, in-flight ones finish. SIGHUP and
# SIGUSR1 would otherwise kill the process at once, losing every call in flight; a reload of the
# family on SIGHUP is not offered (restart the process: the drain makes that lossless).
# The lane name of the GPU lanes' code run on the CPU by ``--accelerator cpu`` (tests, CI).
TORCH_CPU = "torch-cpu"
DRAIN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


class AdaptiveServer:
    """A started server: gRPC, health, metrics endpoint, and (once ready) the engine."""

    def __init__(self, grpc_server: Any, port: int, state: Any, health: Any, monitor: Any,
                 executor: ThreadPoolExecutor) -> None:
        self.grpc = grpc_server
        self.port = port
        self.state = state
        self.health = health
        self.monitor = monitor
        self.executor = executor
        self.metrics_port: int | None = None
        self.metrics_http: Any = None
        self.ready_event = asyncio.Event()
        self.failure: BaseException | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def engine(self) -> Any:
        return self.state.engine

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Return once SERVING; raise what broke start-up if it failed."""
        await asyncio.wait_for(self.ready_event.wait(), timeout)
        if self.failure is not None:
            raise RuntimeError(f"server start-up failed: {self.failure}") from self.failure

    async def drain(self, grace: float | None = 1.0) -> float:
        """Health NOT_SERVING and new requests refused (UNAVAILABLE) at once; wait up to
        ``grace`` seconds for in-flight requests to be answered and their answers sent. Returns
        the loop time at which the grace ends."""
        loop = asyncio.get_running_loop()
        until = loop.time() + (grace or 0.0)
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        engine = self.state.engine
        if engine is not None and engine.inflight:
            log.info("draining: %d requests in flight, up to %.1f s", engine.inflight, grace or 0)
            try:
                await asyncio.wait_for(engine.drained(), max(until - loop.time(), 0.0))
            except TimeoutError:
                log.warning("grace period over with %d requests in flight; cancelling them",
                            engine.inflight)
        with contextlib.suppress(TimeoutError):  # answers computed, now on the wire
            await asyncio.wait_for(self.state.answered(), max(until - loop.time(), 0.0))
        return until

    async def stop(self, grace: float | None = 1.0) -> None:
        """Drain (`drain`), then stop gRPC and release everything."""
        loop = asyncio.get_running_loop()
        until = await self.drain(grace)
        # Inference is drained (or out of grace); what is left are idle streams (a health Watch,
        # an open ModelStreamInfer) that would otherwise hold the process for the whole grace.
        await self.grpc.stop(min(max(until - loop.time(), 0.0), 1.0))
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self.state.engine is not None:
            await self.state.engine.stop()
        self.monitor.stop()
        if self.metrics_http is not None:
            from server.metrics import stop_http

            stop_http(self.metrics_http)
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("server on port %d stopped", self.port)

    async def wait_for_termination(self) -> None:
        await self.grpc.wait_for_termination()


async def create_server(family: str | Path | Family, address: str = "127.0.0.1:0", *,
                        options: ServeOptions = ServeOptions(), metrics_address: str | None = None,
                        registry: Any = None, reuse_port: bool = False,
                        startup_gate: asyncio.Event | None = None
                        ) -> tuple[AdaptiveServer, int]:
    """Start a server for ``family`` on ``address`` (port 0: any free port); returns at once
    with the server NOT_SERVING and loads, warms up and re-measures in the background.

    ``metrics_address`` ``"host:port"`` serves /metrics from ``registry`` (a fresh one if None).
    ``startup_gate``: stay NOT_SERVING until it is set too (lets tests observe that phase).
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from protos.generated import adaptive_pb2
    from protos.generated import grpc_service_pb2 as pb
    from server.metrics import Metrics, serve_http
    from server.monitor import Monitor
    from server.security import CappedHealth, TlsFiles, TokenAuth, read_token
    from server.servicer import ServingState, add_services

    # Credentials first: an unreadable file fails before anything listens.
    if bool(options.tls_cert) != bool(options.tls_key) or (options.tls_client_ca
                                                            and not options.tls_cert):
        raise OSError("TLS needs both --tls-cert and --tls-key (and --tls-client-ca adds mutual "
                      "TLS to them)")
    tls = (TlsFiles.read(options.tls_cert, options.tls_key, options.tls_client_ca)
           if options.tls_cert and options.tls_key else None)
    token = read_token(options.auth_token_file) if options.auth_token_file else None
    logging.getLogger(GRPC_LOGGER).addFilter(_LATE_ANSWERS)  # adding it again is a no-op
    metrics = Metrics(registry)
    interceptors = ([TokenAuth(token, on_refused=metrics.auth_failures.inc)]
                    if token is not None else [])
    state = ServingState(margin_ms=options.settings.deadline_margin_ms)
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.so_reuseport", 1 if reuse_port else 0),
                 ("grpc.max_receive_message_length", options.max_message_bytes),
                 *backlog_options(options.backlog)])
    add_services(server, state)
    health = CappedHealth()  # at most security.MAX_WATCH_STREAMS Watch streams at once
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    services = (pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                adaptive_pb2.DESCRIPTOR.services_by_name["AdaptiveService"].full_name)
    reflection.enable_server_reflection(
        (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    for name in ("", *services):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        port = (server.add_secure_port(address, tls.credentials()) if tls is not None
                else server.add_insecure_port(address))
    except RuntimeError as exc:  # grpc's "Failed to bind": in use, or not a local address
        raise OSError(f"cannot listen on {address!r} (address in use or not local?)") from exc
    if port == 0:
        raise OSError(f"cannot listen on {address!r} (address in use or not local?)")
    await server.start()
    security = ("mutual TLS" if tls is not None and tls.client_ca else
                "TLS" if tls is not None else "plaintext") + (", bearer token" if token else "")
    log.info("listening on %s (port %d), %s, NOT_SERVING until warmed up",
             address.rsplit(":", 1)[0] + f":{port}", port, security)

    monitor = Monitor(options.monitor_interval_s)
    monitor.start()
    budget = monitor.budget
    log.info("CPUs: %d usable (affinity %s of %d, %s); %d worker threads", budget.cores,
             ",".join(map(str, budget.cpus)), os.cpu_count() or 1,
             "no CPU quota" if budget.quota is None else f"cgroup quota {budget.quota:g} CPUs",
             max(options.threads, 1))
    executor = ThreadPoolExecutor(max_workers=max(options.threads, 1),
                                  thread_name_prefix="infer")
    srv = AdaptiveServer(server, port, state, health, monitor, executor)
    if metrics_address is not None:
        host, _, mport = metrics_address.rpartition(":")
        srv.metrics_http, srv.metrics_port = serve_http(int(mport), host, metrics.registry)

    async def load() -> None:
        try:
            await _load(family, options, state, metrics, monitor, executor)
            if startup_gate is not None:
                await startup_gate.wait()
            for name in ("", *services):
                await health.set(name, health_pb2.HealthCheckResponse.SERVING)
            srv._tasks.append(asyncio.create_task(_gauges(state, options.monitor_interval_s)))
            log.info("SERVING family %r", state.spec.name if state.spec else "?")
        except Exception as exc:
            log.exception("start-up failed; staying NOT_SERVING")
            srv.failure = exc
        finally:
            srv.ready_event.set()

    srv._tasks.append(asyncio.create_task(load()))
    return srv, port


async def _load(family: str | Path | Family, options: ServeOptions, state: Any, metrics: Any,
                monitor: Any, executor: ThreadPoolExecutor) -> None:
    from server.codec import ModelSpec
    from server.engine import Engine
    from server.faults import Fault, FaultInjector
    from server.runtime import load_runners, providers

    loop = asyncio.get_running_loop()
    if not isinstance(family, Family):
        log.info("loading family from %s", family)
        family = await loop.run_in_executor(executor, load_family, family)
    fam: Family = within_max_drop(family)
    log.info("family %r: %d variants verified (%s)", fam.name, len(fam.variants),
             ", ".join(fam.variants))
    accel_device = accelerator_device(options)
    accelerator = None
    cpu_family = fam
    if accel_device is not None:
        accelerator = await loop.run_in_executor(
            executor, lambda: _accelerator(fam, options, accel_device))
        if options.device == "cuda":  # the CPU serves only what has no form on the GPU
            cpu_family = replace(fam, variants={n: v for n, v in fam.variants.items()
                                                if n not in accelerator.runners})
    cpu_device = "cpu" if accelerator is not None else options.device
    runners = await loop.run_in_executor(
        executor, lambda: load_runners(cpu_family, backend=options.backend, device=cpu_device,
                                       threads=options.settings.intra_op_threads))
    log.info("CPU lanes: %d variants, backend %s, providers %s", len(runners), options.backend,
             providers(cpu_device))
    faults = (FaultInjector([Fault.parse(f) for f in options.faults]) if options.faults
              else None)
    engine = Engine(fam, runners, executor=executor, metrics=metrics, monitor=monitor,
                    settings=options.settings, threads=options.threads, faults=faults,
                    accelerator=accelerator)
    await loop.run_in_executor(executor, engine.warm_up)
    log.info("warm-up and latency re-measurement done")
    engine.start()
    state.spec = ModelSpec.for_family(fam.manifest, fam.name)
    state.versions = [*fam.variants, *(c.name for c in engine.router.candidates
                                       if c.name not in fam.variants)]
    state.engine = engine
    engine.update_gauges()


class LateAnswerFilter(logging.Filter):
    """gRPC's asyncio server logs an answer to a call whose client had already given up (its
    deadline passed while the answer was computed) as an ERROR with a traceback when the client's
    cancellation has not reached the server yet, and drops it silently when it has: a race
    inside gRPC, routine under overload, and counted by adaptive_budget_misses_total. This makes
    it one DEBUG line either way."""

    MESSAGE = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(self.MESSAGE):
            log.debug("an answer was not sent: its client had given up (%s)",
                      record.getMessage().removeprefix(self.MESSAGE).strip(" []"))
            return False
        return True


GRPC_LOGGER = "grpc._cython.cygrpc"
_LATE_ANSWERS = LateAnswerFilter()


def backlog_options(backlog: int) -> list[tuple[str, int]]:
    """gRPC core options bounding the calls it holds for this process before the event loop
    has taken them (``--backlog``); none for 0, which leaves gRPC's own default queue.

    The event loop takes one call per turn, so past saturation calls wait in gRPC's core in
    arrival order, and reach the handler with their deadline nearly spent: the loop then pays
    for calls nobody waits for any more, and goodput collapses (docs/serving.md, "Overload").
    With a bound, gRPC's core refuses the surplus on arrival, before any Python runs: the client
    sees CANCELLED. Early drop starts at half the bound (gRPC's random early detection) and
    every call past the bound is refused.
    """
    if backlog == 0:
        return []
    return [("grpc.server.max_pending_requests", backlog // 2),
            ("grpc.server.max_pending_requests_hard_limit", backlog)]


def accelerator_device(options: ServeOptions) -> str | None:
    """The torch device of the GPU lanes, or None (CPU only). ``--device auto`` asks torch only
    where NVML sees an NVIDIA GPU (importing torch costs a second and ~200 MB); ``--device cuda``
    without a usable GPU raises `InvalidArgument` with one line on what is missing, unless
    onnxruntime's CUDA provider can serve instead (onnxruntime's CUDA build).

    Probed once per process (and inherited by `--workers`' forks): `main` asks before binding
    anything, to fail fast, and loading asks again."""
    return _accelerator_device(options.device, options.accelerator)


@functools.cache
def _accelerator_device(device: str, accelerator: str) -> str | None:
    if device == "cpu":
        return None
    if accelerator == "cpu":  # the GPU lanes' code on the CPU: tests, CI
        return "cpu"
    if device == "auto":
        from server.monitor import nvidia_gpu_present

        if not nvidia_gpu_present():
            return None
    # Checking through NVML leaves CUDA uninitialised in this process: `--workers` forks after.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    from server.torch_runner import cuda_problem

    problem = cuda_problem()
    if problem is None:
        return "cuda"
    if device == "auto":
        log.warning("a GPU is present but not usable for GPU lanes (%s); serving on the CPU",
                    problem)
        return None
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None  # onnxruntime-gpu serves every variant through its CUDA provider
    raise InvalidArgument(f"--device cuda: {problem}; or serve with --device cpu")


def _accelerator(fam: Family, options: ServeOptions, device: str) -> Any:
    """Torch runners for every variant with a form on ``device``, their threads, and the
    accuracy of each candidate re-measured when the dtype is not fp32 (blocking)."""
    from server.engine import Accelerator
    from server.runtime import torch_runners
    from server.warmup import remeasure_accuracy

    runners, skipped = torch_runners(fam, device=device, dtype=options.gpu_dtype,
                                     max_batch=options.gpu_max_batch)
    for name, why in skipped.items():
        log.warning("variant %s stays on the CPU: %s", name, why)
    # Lanes are named by device ("cuda:full"); torch on the CPU must not take the CPU lanes'.
    tag = TORCH_CPU if device == "cpu" else device
    accuracy: dict[str, float] = {}
    if options.gpu_dtype != "fp32":
        accuracy = remeasure_accuracy(fam, runners, tag)
    # A thread per lane up to 4: each runs one batch at a time on its own CUDA stream; more
    # threads than that only contend for the GIL around launches.
    threads = max(1, min(len(runners), 4))
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"infer-{tag}")
    log.info("GPU lanes on %s (%s): %s", tag, options.gpu_dtype, ", ".join(runners))
    return Accelerator(tag, runners, executor, threads, max_batch=options.gpu_max_batch,
                       accuracy=accuracy)


def within_max_drop(family: Family) -> Family:
    """The family less variants the build marked as not within its accuracy target."""
    marked = [n for n, v in family.variants.items()
              if v.details.get("search", {}).get("within_max_drop") is False]
    if marked:
        log.warning("family %r: not serving %s: not within max_drop of full on validation "
                    "(see report.md)", family.name, marked)
    return replace(family, variants={n: v for n, v in family.variants.items() if n not in marked})


async def _gauges(state: Any, interval: float) -> None:
    """Every ``interval``: the engine's gauges, and how busy this event loop's thread was (its
    CPU time over the wall time since the last sample). Near 1 the process is saturated: new
    calls then wait unread in gRPC's core, where neither the in-flight nor the queue gauges see
    them, and a unary call to a small variant is answered in the step that reads it. Near 0
    after a busy interval, traffic has stopped: the heap's free pages go back (`IdleTrim`)."""
    from server.memory import IdleTrim

    trim = IdleTrim()
    cpu, wall = time.thread_time(), time.monotonic()
    while True:
        await asyncio.sleep(interval)  # a sampling period, not a wait for an event
        now_cpu, now = time.thread_time(), time.monotonic()
        busy = min((now_cpu - cpu) / max(now - wall, 1e-6), 1.0)
        cpu, wall = now_cpu, now
        try:
            state.engine.metrics.loop_busy.set(busy)
            state.engine.update_gauges()
        except Exception:
            log.warning("updating gauges failed", exc_info=True)
        trim.tick(busy)


# --- main: one process, or N forked workers --------------------------------------------------

def main(family_dir: str | Path, options: ServeOptions) -> int:
    """Serve until SIGINT/SIGTERM. Returns the exit status."""
    from server.memory import return_freed_memory

    return_freed_memory()  # before any large buffer: the family's graphs are the first
    accelerator_device(options)  # --device cuda without a usable GPU: one line, exit 2
    from server.loop import resolve, run

    resolve(options.event_loop)  # --event-loop uvloop without uvloop: one line, exit 2
    family = load_family(family_dir)  # fail fast (exit 2 in the CLI) before binding anything
    check_faults(family, options.faults)
    if options.workers > 1:
        from server.workers import serve_workers

        return serve_workers(family, options, serve)
    run(serve(family, options, reuse_port=False, metrics=True), options.event_loop)  # ends it


def check_faults(family: Family, faults: tuple[str, ...]) -> None:
    """``--inject-fault`` specs must parse and name variants of the family."""
    from server.faults import Fault

    for text in faults:
        try:
            fault = Fault.parse(text)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if fault.variant not in family.variants:
            raise InvalidArgument(f"--inject-fault {text!r}: no variant {fault.variant!r}; "
                                  f"variants: {sorted(family.variants)}")


async def serve(family: Family, options: ServeOptions, *, reuse_port: bool, metrics: bool,
                on_ready: Callable[[], None] | None = None) -> NoReturn:
    """One server process until a `DRAIN_SIGNALS` signal, then drain and end the process with its
    exit status. ``on_ready`` is called once it is SERVING (`server.workers` tells the parent).

    The process ends with ``os._exit`` right after the drain, not through gRPC's shutdown: that
    shutdown answers a call racing it CANCELLED (which clients do not retry), while a closed
    connection reads UNAVAILABLE, as every refusal during the drain does."""
    address = f"{options.host}:{options.port}"
    maddr = (f"{options.metrics_host or options.host}:{options.metrics_port}"
             if metrics and options.metrics_port is not None else None)
    srv, _port = await create_server(family, address, options=options, metrics_address=maddr,
                                     reuse_port=reuse_port)
    stop = asyncio.Event()
    received: list[str] = []

    def drain(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in DRAIN_SIGNALS:
        loop.add_signal_handler(sig, drain, sig)
    ready = asyncio.create_task(srv.ready_event.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if srv.failure is not None:
        status = 1
    else:
        if on_ready is not None and ready.done():
            on_ready()
        await stopping
        log.info("%s received: NOT_SERVING, refusing new requests, in-flight ones get up to "
                 "%.1f s", received[0] if received else "signal", options.grace_s)
    ready.cancel()
    stopping.cancel()
    await srv.drain(grace=options.grace_s)
    log.info("server on port %d drained; exiting with status %d", srv.port, status)
    logging.shutdown()  # flush the log: nothing runs after os._exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
