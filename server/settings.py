"""What `adaptive-inference serve` configures: `Settings`, the knobs of one server process that
shape routing, batching and failure handling, and `ServeOptions`, everything else a server is
started with. Pure data, free of gRPC: every room of `server/` imports it, and the CLI takes the
serve flags' defaults from here, so a default is written once. Each value is checked where it is
made: an impossible one raises `InvalidArgument` naming its serve flag and value (the CLI prints
that line and exits 2), before anything is loaded or bound."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from protos.wire import MAX_MESSAGE_BYTES
from server.cpus import usable_cores
from server.errors import InvalidArgument

ON_MISS = ("shed", "best-effort")
BACKENDS = ("onnxruntime", "torch")
DEVICES = ("auto", "cpu", "cuda")
GPU_DTYPES = ("fp32", "fp16", "bf16")
ACCELERATORS = ("cuda", "cpu")
EVENT_LOOPS = ("auto", "asyncio", "uvloop")
GRPC_IO = ("poller", "event-engine")  # server.grpc_io
MAX_PORT = 65535


def _require(ok: bool, flag: str, value: object, rule: str) -> None:
    """Refuse a setting in one line that names its flag, its value and what it must be."""
    if not ok:
        shown = repr(value) if isinstance(value, str) else value
        raise InvalidArgument(f"{flag} {shown}: {rule}")


def _count(flag: str, value: int, least: int, what: str) -> None:
    _require(value >= least, flag, value, f"{what}, {least} or more")


def is_duration(value: float, *, zero: bool) -> bool:
    """A finite duration: 0 or more where ``zero`` is allowed, else more than 0 (NaN is not)."""
    return math.isfinite(value) and (value >= 0.0 if zero else value > 0.0)


def _duration(flag: str, value: float, what: str, *, zero: bool) -> None:
    _require(is_duration(value, zero=zero), flag, value,
             f"{what}, {'0 or more' if zero else 'more than 0'}")


def one_of(flag: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse ``value`` unless it is one of ``choices`` (a flag's choices, here and in `server.loop`)."""
    _require(value in choices, flag, value, f"one of {', '.join(choices)}")


@dataclass(frozen=True)
class Settings:
    """Routing, batching and fault-handling settings; see `adaptive-inference serve --help`."""

    max_batch: int = 32
    max_queue_delay_ms: float = 0.0
    max_queue: int = 1024
    on_miss: str = "shed"  # no candidate fits: fail at once (or "best-effort": the fastest)
    intra_op_threads: int = 1  # ORT threads per batch; the latency model counts them as load
    target_miss_rate: float = 0.005  # the router's margin adapts to hold this share of late answers
    deadline_margin_ms: float = 0.5
    # Batches predicted under this (ms) run on the event loop, not the pool. A hand-off to the
    # pool and back costs more than it frees the loop for small batches: 0.3 against 0.1 spent
    # 6 % (1 image) and 12 % (8 images) less server CPU per answer at saturation, with 7 % and
    # 11 % more answers/s (bench/ceiling.py's load, 5 paired rounds, 2 cores, 2026-11-28).
    inline_below_ms: float = 0.3
    batch_timeout_ms: float = 1000.0  # a batch fails after max(this, 10 × its predicted p95)
    quarantine_s: float = 2.0  # first re-probe of a failed variant; doubles per failed probe
    quarantine_max_s: float = 60.0

    def __post_init__(self) -> None:
        _count("--max-batch", self.max_batch, 1, "samples per batch")
        _count("--max-queue", self.max_queue, 1, "samples queued per variant")
        _duration("--max-queue-delay-ms", self.max_queue_delay_ms, "milliseconds", zero=True)
        one_of("--on-miss", self.on_miss, ON_MISS)
        _count("--intra-op-threads", self.intra_op_threads, 1, "threads per batch")
        _require(0.0 < self.target_miss_rate < 1.0, "--target-miss-rate", self.target_miss_rate,
                "a share of requests, between 0 and 1 (both excluded)")
        _duration("--deadline-margin-ms", self.deadline_margin_ms, "milliseconds", zero=True)
        _duration("--inline-below-ms", self.inline_below_ms, "milliseconds", zero=True)
        _duration("--batch-timeout-ms", self.batch_timeout_ms, "milliseconds", zero=False)
        _duration("--quarantine-s", self.quarantine_s, "seconds", zero=False)
        _duration("quarantine_max_s", self.quarantine_max_s, "seconds", zero=False)
        _require(self.quarantine_s <= self.quarantine_max_s, "--quarantine-s", self.quarantine_s,
                f"at most the quarantine's cap, {self.quarantine_max_s:g} s")


@dataclass(frozen=True)
class ServeOptions:
    """Everything `adaptive-inference serve` configures besides the family."""

    host: str = "127.0.0.1"
    port: int = 8001
    metrics_host: str | None = None  # default: host
    metrics_port: int | None = 8002  # None: no metrics endpoint
    workers: int = 1
    backend: str = "onnxruntime"
    device: str = "auto"  # cpu | cuda | auto (GPU lanes beside the CPU's when a GPU is usable)
    gpu_dtype: str = "fp32"  # fp16 / bf16: accuracy re-measured on the validation sample
    gpu_max_batch: int = 256
    accelerator: str = "cuda"  # the GPU lanes' torch device; "cpu" runs their code on the CPU
    event_loop: str = "auto"  # uvloop where installed (less CPU per request), else asyncio
    grpc_io: str = "poller"  # which threads read the sockets (server.grpc_io)
    # Worker pool size: the cores this process can use (affinity and cgroup quota), not the host's.
    threads: int = field(default_factory=usable_cores)
    monitor_interval_s: float = 0.5
    settings: Settings = field(default_factory=Settings)
    grace_s: float = 10.0  # on SIGTERM: how long in-flight requests may take to finish
    max_message_bytes: int = MAX_MESSAGE_BYTES  # larger: RESOURCE_EXHAUSTED from gRPC itself
    backlog: int = 0  # calls gRPC's core holds unread before refusing new ones; 0: gRPC's default
    tls_cert: str | None = None  # PEM paths; cert + key: TLS, plus client CA: mutual TLS
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token_file: str | None = None  # bearer token required on all but the health service
    faults: tuple[str, ...] = ()  # --inject-fault VARIANT:raise|hang[:RATE] (tests only)

    def __post_init__(self) -> None:
        _require(0 <= self.port <= MAX_PORT, "--port", self.port, f"a port, 0 (any) to {MAX_PORT}")
        _require(self.metrics_port is None or 0 <= self.metrics_port <= MAX_PORT, "--metrics-port",
                self.metrics_port, f"a port, 0 (any) to {MAX_PORT}, or -1 (no endpoint)")
        _count("--workers", self.workers, 1, "processes")
        one_of("--backend", self.backend, BACKENDS)
        one_of("--device", self.device, DEVICES)
        one_of("--gpu-dtype", self.gpu_dtype, GPU_DTYPES)
        _count("--gpu-max-batch", self.gpu_max_batch, 1, "samples per GPU batch")
        one_of("--accelerator", self.accelerator, ACCELERATORS)
        one_of("--event-loop", self.event_loop, EVENT_LOOPS)
        one_of("--grpc-io", self.grpc_io, GRPC_IO)
        _count("--threads", self.threads, 1, "worker threads")
        _duration("monitor_interval_s", self.monitor_interval_s, "seconds", zero=False)
        _duration("--grace-s", self.grace_s, "seconds", zero=True)
        _require(self.max_message_bytes > 0, "--max-message-mb", self.max_message_bytes / (1 << 20),
                "MiB, more than 0")
        _require(self.backlog >= 0, "--backlog", self.backlog,
                "a number of calls, 0 (unbounded) or more")
