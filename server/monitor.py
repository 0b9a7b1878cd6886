"""The load monitor: CPU (process and system), memory and GPUs, sampled in a background thread.

The router reads the latest sample for free (no system call on the request path). A worker of
``--workers N`` (`server.workers` calls `as_worker_of` in it) also samples its sibling workers: they
are the same server, not other load on the host (`HostSample.cpu_siblings`). GPUs come from
NVML (``nvidia-ml-py``) when a driver is present; without one the GPU list is empty, which the
metrics report as no series, not as an error. Queue depths and in-flight counts are live state of
the engine and are read there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from server.cpus import CpuBudget, cpu_budget

log = logging.getLogger(__name__)

SIBLINGS_EVERY_S = 5.0  # how often a worker re-lists its siblings (a restart brings a new one)

# This process is a worker forked by the ``--workers`` supervisor with this pid (None: a server
# of its own). Set once, right after the fork and before any `Monitor` exists (`as_worker_of`).
_supervisor: int | None = None


def as_worker_of(supervisor: int) -> None:
    """Mark this process as one worker of the server whose supervisor is ``supervisor``: its
    monitor counts the supervisor's other children as this server, not as other load."""
    global _supervisor
    _supervisor = supervisor


@dataclass(frozen=True)
class GpuSample:
    index: int
    utilization: float  # 0..1
    memory_used: float  # 0..1 of total


@dataclass(frozen=True)
class HostSample:
    cores: int  # whole cores this process can use at once (affinity, cgroup quota: server.cpus)
    cpu_system: float = 0.0  # 0..1 of the `cpus` this process may run on, busy with anything
    cpu_process: float = 0.0  # 0..1 of `cores`, this process
    cpu_siblings: float = 0.0  # 0..1 of `cores`, this server's other worker processes
    memory_system: float = 0.0  # 0..1 used
    memory_process_bytes: int = 0  # resident set
    gpus: tuple[GpuSample, ...] = field(default_factory=tuple)
    at: float = 0.0  # monotonic seconds
    cpus: int = 0  # CPUs in the affinity set (0: as many as `cores`)

    @property
    def cpu_other(self) -> float:
        """Share of `cores` taken by everything except this server (its process and, with
        ``--workers``, its sibling workers). Other processes first fill the CPUs a quota leaves
        this server unable to use anyway (2 of 16 CPUs: 14 busy cores of others cost it
        nothing); only what remains competes with it."""
        cpus = self.cpus or self.cores
        own = (self.cpu_process + self.cpu_siblings) * self.cores
        others = max(self.cpu_system * cpus - own, 0.0)
        competing = max(others - (cpus - self.cores), 0.0)
        return min(competing / max(self.cores, 1), 1.0)


def nvidia_gpu_present() -> bool:
    """Does NVML report at least one NVIDIA GPU? (False without a driver or pynvml.) A probe
    that leaves NVML shut: the server asks before forking its workers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount()) > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no library, no driver, no device: no GPU
        return False


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


class _Siblings:
    """CPU of this server's other workers: the supervisor's children but this process. Each has a
    `psutil.Process` of its own (``cpu_percent`` measures since that object's previous call);
    the list is refreshed every `SIBLINGS_EVERY_S`."""

    def __init__(self, supervisor: int) -> None:
        self._supervisor = psutil.Process(supervisor)
        self._procs: dict[int, psutil.Process] = {}
        self._listed = float("-inf")

    def cpu(self, cores: int) -> float:
        """Their share of all ``cores`` since the previous call (a new sibling counts from its
        second sample on)."""
        now = time.monotonic()
        if now - self._listed >= SIBLINGS_EVERY_S:
            self._listed = now
            try:
                children = self._supervisor.children()
            except psutil.Error:  # the supervisor is gone: this worker is being stopped
                children = []
            me = os.getpid()
            alive = {p.pid: p for p in children if p.pid != me}
            for pid in self._procs.keys() - alive.keys():
                del self._procs[pid]
            for pid, proc in alive.items():
                if pid not in self._procs:
                    self._procs[pid] = proc
                    with contextlib.suppress(psutil.Error):
                        proc.cpu_percent(None)  # the reference point for the next call
        total = 0.0
        for proc in list(self._procs.values()):
            try:
                total += proc.cpu_percent(None)
            except psutil.Error:  # exited since it was listed
                del self._procs[proc.pid]
        return total / 100.0 / cores


class Monitor:
    """Samples the host every ``interval_s`` in a daemon thread; `latest` is always available."""

    def __init__(self, interval_s: float = 0.5, budget: CpuBudget | None = None) -> None:
        self.interval_s = interval_s
        self.budget = budget or cpu_budget()
        self.cores = self.budget.cores
        self._proc = psutil.Process()
        self._siblings = _Siblings(_supervisor) if _supervisor is not None else None
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
        psutil.cpu_percent(None, percpu=True)
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
        per_cpu = psutil.cpu_percent(None, percpu=True)
        mine = [per_cpu[i] for i in self.budget.cpus if i < len(per_cpu)] or per_cpu
        sample = HostSample(
            cores=self.cores,
            cpus=len(mine),
            cpu_system=sum(mine) / max(len(mine), 1) / 100.0,
            cpu_process=self._proc.cpu_percent(None) / 100.0 / self.cores,
            cpu_siblings=self._siblings.cpu(self.cores) if self._siblings is not None else 0.0,
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
