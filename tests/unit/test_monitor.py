"""The monitor's view of a ``--workers`` server: a worker samples its sibling workers (the
supervisor's other children) as part of the server, not as other load on the host."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from server.monitor import _Siblings

BUSY = "import time\nend = time.monotonic() + 5\nwhile time.monotonic() < end: pass\n"


def test_siblings_are_the_supervisors_other_children_and_their_cpu_is_sampled() -> None:
    """This test process stands in for the supervisor: its two busy children are the siblings
    (this process itself, like a worker's own, is never counted)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(2)]
    try:
        siblings = _Siblings(psutil.Process().pid)
        cores = psutil.cpu_count() or 1
        assert siblings.cpu(cores) == 0.0  # the first sample only sets the reference point
        time.sleep(1.0)
        share = siblings.cpu(cores)
        # two busy processes: up to 2 cores' worth, whatever else the machine is doing
        assert 0.2 / cores < share <= 2.0 / cores + 0.05
    finally:
        for p in procs:
            p.kill()
            p.wait()
    time.sleep(0.2)
    assert siblings.cpu(cores) == pytest.approx(0.0, abs=0.05)  # exited: nothing, no error
