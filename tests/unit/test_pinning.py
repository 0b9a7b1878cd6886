"""CPU placement for benchmarks on a small host (`client.process.cpu_set`, `pin_tree`): the
server's whole process tree, every thread of it, lands on the CPUs asked for."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from client.process import cpu_set, pin_tree


def test_cpu_sets_read_like_taskset_lists() -> None:
    assert cpu_set(None) is None
    assert cpu_set("0") == {0}
    assert cpu_set("0,2-4,7") == {0, 2, 3, 4, 7}


def test_pin_tree_moves_every_thread_of_a_process_and_its_children() -> None:
    cpu = min(os.sched_getaffinity(0))
    # A parent with a second thread, and a child of its own: all three must move.
    code = ("import subprocess, sys, threading, time; "
            "threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('ready', flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while not psutil.Process(parent.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        procs = [psutil.Process(parent.pid), *psutil.Process(parent.pid).children()]
        assert len(procs) == 2 and len(procs[0].threads()) >= 2
        pin_tree(parent.pid, {cpu})
        threads = [t.id for p in procs for t in p.threads()]
        assert {tid: os.sched_getaffinity(tid) for tid in threads} == {
            tid: {cpu} for tid in threads}
    finally:
        for p in psutil.Process(parent.pid).children():
            p.kill()
        parent.kill()
        parent.wait()


@pytest.mark.parametrize("text", ["", "a", "0,x"])
def test_a_bad_cpu_list_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=f"CPU list {text!r}: expected numbers"):
        cpu_set(text)
