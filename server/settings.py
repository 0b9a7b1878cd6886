"""The serving knobs of one server process (the flags of `adaptive-inference serve` that shape
routing, batching and failure handling). Pure data, imported by every room of `server/`."""

from __future__ import annotations

from dataclasses import dataclass

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
