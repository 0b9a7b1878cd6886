"""What `adaptive-inference serve` configures: `Settings`, the knobs of one server process that
shape routing, batching and failure handling, and `ServeOptions`, everything else a server is
started with. Pure data, free of gRPC: every room of `server/` imports it, and the CLI takes the
serve flags' defaults from here, so a default is written once."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from protos.wire import MAX_MESSAGE_BYTES

ON_MISS = ("shed", "best-effort")


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
        if self.on_miss not in ON_MISS:
            raise ValueError(f"on_miss must be one of {ON_MISS}, got {self.on_miss!r}")
        if not 0.0 < self.target_miss_rate < 1.0:
            raise ValueError(f"target_miss_rate must lie in (0, 1), got {self.target_miss_rate!r}")


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
    event_loop: str = "asyncio"  # or "uvloop": less CPU per request, more memory kept
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)  # worker pool size
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
