"""The CPUs this process may use: its affinity set, capped by its cgroup's CPU quota.

``os.cpu_count()`` counts the host's CPUs. In a container limited to 2 CPUs on a 16-core node (the
Deployment's ``limits.cpu``), or in a process pinned with ``taskset``, that is the wrong number both
for sizing the worker pool (16 threads under a 2-CPU quota are throttled in 100 ms steps, far
longer than any budget) and for modelling contention (the router would count 14 cores it cannot
use as idle). The JVM and the Go runtime read the same two sources: the scheduler affinity and
the CFS quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), the
tightest quota on the way from this process's cgroup up to the root.

No psutil and no grpc: `server.settings` sizes its defaults from here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class CpuBudget:
    """What this process may run on: ``cpus`` (the affinity set) and at most ``quota`` CPUs of
    time (None: no quota)."""

    cpus: tuple[int, ...]
    quota: float | None = None

    @property
    def cores(self) -> int:
        """Whole cores' worth this process can use at once, at least 1 (a quota of 1.5 rounds
        up: for half of each period a second thread runs)."""
        n = len(self.cpus) or 1
        if self.quota is not None:
            n = min(n, max(1, math.ceil(self.quota - 1e-9)))
        return n


def affinity() -> tuple[int, ...]:
    """The CPUs the scheduler may run this process on."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return tuple(range(os.cpu_count() or 1))


def _ancestors(root: Path, rel: str) -> list[Path]:
    """``root/rel`` and each parent up to ``root``, deepest first; a path that does not exist
    under ``root`` (a container that sees only its own cgroup mounted there) leaves ``root``."""
    parts = [p for p in rel.split("/") if p]
    return [root.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def quota_cores(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota (in CPUs) on this process's cgroup and its ancestors; None
    without one (or without cgroups)."""
    listing = _read(proc_cgroup)
    if listing is None:
        return None
    quotas: list[float] = []
    for line in listing.splitlines():
        ident, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if ident == "0" and controllers == "":  # cgroup v2: "max 100000" or "200000 100000"
            for d in _ancestors(root, rel):
                text = _read(d / "cpu.max")
                if text and not text.startswith("max"):
                    q, _, period = text.partition(" ")
                    if int(period or 100000) > 0:
                        quotas.append(int(q) / int(period or 100000))
        elif "cpu" in controllers.split(","):  # cgroup v1: quota -1 means none
            mount = root / controllers if (root / controllers).is_dir() else root / "cpu"
            for d in _ancestors(mount, rel):
                q_text, p_text = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                if q_text and p_text and int(q_text) > 0 and int(p_text) > 0:
                    quotas.append(int(q_text) / int(p_text))
    return min(quotas) if quotas else None


def cpu_budget() -> CpuBudget:
    """This process's CPUs now (read once at start: neither changes under a running server)."""
    try:
        quota = quota_cores()
    except ValueError:  # a cgroup file in a format we do not know: no quota rather than a crash
        quota = None
    return CpuBudget(affinity(), quota)


def usable_cores() -> int:
    """Whole cores this process can use at once: `CpuBudget.cores` of `cpu_budget`."""
    return cpu_budget().cores
