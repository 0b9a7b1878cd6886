"""The cores a server may use (`server.cpus`): its CPU affinity capped by the tightest cgroup CPU
quota on its way to the root, read from fake cgroup trees (v2 and v1, with and without a cgroup
namespace); and how other processes' load is counted against those cores (`HostSample`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.cpus import CpuBudget, quota_cores
from server.monitor import HostSample, Monitor
from server.settings import ServeOptions


def tree(root: Path, files: dict[str, str], proc_cgroup: str) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    listing = root / "proc-self-cgroup"
    listing.write_text(proc_cgroup + "\n")
    return listing


def test_v2_the_tightest_quota_on_the_way_to_the_root_counts(tmp_path: Path) -> None:
    listing = tree(tmp_path, {"cpu.max": "max 100000",
                              "kubepods/cpu.max": "400000 100000",
                              "kubepods/pod1/cpu.max": "150000 100000",
                              "kubepods/pod1/ctr/cpu.max": "max 100000"},
                   "0::/kubepods/pod1/ctr")
    assert quota_cores(tmp_path, listing) == pytest.approx(1.5)


def test_v2_inside_a_cgroup_namespace_the_mount_is_the_container_own(tmp_path: Path) -> None:
    listing = tree(tmp_path, {"cpu.max": "200000 100000"}, "0::/")
    assert quota_cores(tmp_path, listing) == pytest.approx(2.0)


def test_v1_docker_without_a_namespace_falls_back_to_the_mount(tmp_path: Path) -> None:
    """/proc/self/cgroup names /docker/ID, but the container sees only its own cgroup mounted."""
    listing = tree(tmp_path, {"cpu,cpuacct/cpu.cfs_quota_us": "200000",
                              "cpu,cpuacct/cpu.cfs_period_us": "100000"},
                   "4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/")
    assert quota_cores(tmp_path, listing) == pytest.approx(2.0)


def test_no_quota_anywhere_is_none(tmp_path: Path) -> None:
    listing = tree(tmp_path, {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
                              "cpu.max": "max 100000"}, "1:cpu:/\n0::/")
    assert quota_cores(tmp_path, listing) is None
    assert quota_cores(tmp_path, tmp_path / "missing") is None  # no cgroups at all


@pytest.mark.parametrize(("cpus", "quota", "cores"), [
    ((0, 1, 2, 3), None, 4), ((0, 1, 2, 3), 2.0, 2), ((0, 1, 2, 3), 1.5, 2), ((0,), 8.0, 1),
    ((0, 1), 0.2, 1)])
def test_usable_cores_are_the_affinity_capped_by_the_quota(
        cpus: tuple[int, ...], quota: float | None, cores: int) -> None:
    assert CpuBudget(cpus, quota).cores == cores


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_the_default_pool_follows_the_affinity_not_the_host() -> None:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        assert ServeOptions().threads == 1
    finally:
        os.sched_setaffinity(0, before)
    assert ServeOptions().threads == CpuBudget(tuple(before), quota_cores()).cores


def test_other_load_on_cpus_a_quota_leaves_unused_does_not_compete() -> None:
    """2 cores of quota on 16 CPUs: others busy on 8 of them leave ours alone; only when they
    take more than the 14 we cannot use do they compete for ours."""
    assert HostSample(cores=2, cpus=16, cpu_system=0.5, cpu_process=1.0).cpu_other == 0.0
    assert HostSample(cores=2, cpus=16, cpu_system=1.0, cpu_process=0.5).cpu_other == \
        pytest.approx(0.5)
    # Without a quota (cpus == cores) it is the host's share less this server's, as before.
    assert HostSample(cores=4, cpu_system=0.9, cpu_process=0.3).cpu_other == pytest.approx(0.6)


def test_the_monitor_samples_the_cpus_it_was_given() -> None:
    """A server on one CPU of a larger host: its sample speaks of that CPU and that core."""
    cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    monitor = Monitor(budget=CpuBudget((cpu,), None))
    monitor.start()
    try:
        sample = monitor.sample()
    finally:
        monitor.stop()
    assert (sample.cores, sample.cpus) == (1, 1)
    assert 0.0 <= sample.cpu_system <= 1.0 and 0.0 <= sample.cpu_other <= 1.0
