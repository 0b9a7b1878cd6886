"""The load monitor: CPU (process and system), memory and GPUs, sampled in a background thread.

The router reads the latest sample for free (no system call on the request path). GPUs come from
NVML (``nvidia-ml-py``) when a driver is present; without one the GPU list is empty, which the
metrics report as no series, not as an error. Queue depths and in-flight counts are live state of
the engine and are read there.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuSample:
    index: int
    utilization: float  # 0..1
    memory_used: float  # 0..1 of total


@dataclass(frozen=True)
class HostSample:
    cores: int
    cpu_system: float = 0.0  # 0..1 of all cores
    cpu_process: float = 0.0  # 0..1 of all cores, this process
    memory_system: float = 0.0  # 0..1 used
    memory_process_bytes: int = 0  # resident set
    gpus: tuple[GpuSample, ...] = field(default_factory=tuple)
    at: float = 0.0  # monotonic seconds

    @property
    def cpu_other(self) -> float:
        """Share of the cores busy with everything except this server process."""
        return min(max(self.cpu_system - self.cpu_process, 0.0), 1.0)


class _Nvml:
    """NVML when available; ``None`` handles otherwise (no GPU, no driver, no library)."""

    def __init__(self) -> None:
        self._lib: Any = None
        self._handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i)
                             for i in range(pynvml.nvmlDeviceGetCount())]
            self._lib = pynvml
            log.info("monitor: %d GPU(s) through NVML", len(self._handles))
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, …
            log.info("monitor: no GPU reported (%s)", type(exc).__name__)

    def sample(self) -> tuple[GpuSample, ...]:
        if self._lib is None:
            return ()
        out = []
        for i, h in enumerate(self._handles):
            try:
                util = self._lib.nvmlDeviceGetUtilizationRates(h)
                mem = self._lib.nvmlDeviceGetMemoryInfo(h)
                out.append(GpuSample(i, util.gpu / 100.0, mem.used / max(mem.total, 1)))
            except Exception:  # a GPU that fell off the bus is skipped, not fatal
                log.debug("monitor: NVML read of GPU %d failed", i, exc_info=True)
        return tuple(out)

    def close(self) -> None:
        if self._lib is not None:
            try:
                self._lib.nvmlShutdown()
            except Exception:
                log.debug("monitor: nvmlShutdown failed", exc_info=True)


class Monitor:
    """Samples the host every ``interval_s`` in a daemon thread; `latest` is always available."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.cores = psutil.cpu_count() or os.cpu_count() or 1
        self._proc = psutil.Process()
        self._nvml: _Nvml | None = None
        self._latest = HostSample(cores=self.cores, at=time.monotonic())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def latest(self) -> HostSample:
        return self._latest

    def start(self) -> None:
        if self._thread is not None:
            return
        self._nvml = _Nvml()
        # The first cpu_percent calls only set the reference point for the next ones.
        psutil.cpu_percent(None)
        self._proc.cpu_percent(None)
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._nvml is not None:
            self._nvml.close()

    def sample(self) -> HostSample:
        """Take one sample now (CPU shares since the previous call)."""
        mem = psutil.virtual_memory()
        sample = HostSample(
            cores=self.cores,
            cpu_system=psutil.cpu_percent(None) / 100.0,
            cpu_process=self._proc.cpu_percent(None) / 100.0 / self.cores,
            memory_system=mem.percent / 100.0,
            memory_process_bytes=int(self._proc.memory_info().rss),
            gpus=self._nvml.sample() if self._nvml is not None else (),
            at=time.monotonic(),
        )
        self._latest = sample
        return sample

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # never let a psutil hiccup end monitoring
                log.warning("monitor: sampling failed", exc_info=True)
