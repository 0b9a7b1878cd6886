"""CPU placement for benchmarks on a small host (`client.process.cpu_set`, `spawning_on`): a
server started on the CPUs asked for is born there, so it sizes itself by them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from client.process import cpu_set, spawning_on


def test_cpu_sets_read_like_taskset_lists() -> None:
    assert cpu_set(None) is None
    assert cpu_set("0") == {0}
    assert cpu_set("0,2-4,7") == {0, 2, 3, 4, 7}


def test_a_process_spawned_on_cpus_is_born_there_and_the_parent_stays_put() -> None:
    before = os.sched_getaffinity(0)
    cpu = min(before)
    with spawning_on({cpu}):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert os.sched_getaffinity(child.pid) == {cpu}
        assert os.sched_getaffinity(0) == before
    finally:
        child.kill()
        child.wait()
    with spawning_on(None):  # no placement asked: nothing changes
        assert os.sched_getaffinity(0) == before


@pytest.mark.parametrize("text", ["", "a", "0,x"])
def test_a_bad_cpu_list_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=f"CPU list {text!r}: expected numbers"):
        cpu_set(text)
