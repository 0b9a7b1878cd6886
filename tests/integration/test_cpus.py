"""A server pinned to one CPU (``taskset``, or a container's cpuset) sizes its worker pool to
that CPU, not to the host's count, and says so when it starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from client.process import SERVING, ServerProcess, spawning_on


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_a_pinned_server_uses_the_cpus_it_has(serving_family: Path) -> None:
    first = min(os.sched_getaffinity(0))
    with spawning_on({first}):  # as under taskset
        proc = ServerProcess([str(serving_family), "--port", "0", "--metrics-port", "-1"])
    try:
        (line,) = proc.wait_for(r"CPUs: (\d+) usable \(affinity ([\d,]+) of (\d+).*; (\d+) worker")
        assert line.group(1) == "1" and line.group(2) == str(first) and line.group(4) == "1", \
            line.string
        proc.wait_for(SERVING)
    finally:
        proc.stop()
