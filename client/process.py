"""`adaptive-inference serve` as a child process: start it, learn its ports from its log, stop it;
and, for benchmarks on a small host, start it on CPUs apart from its load generator.

The demo and the benchmarks run the server in its own process (as in production: no GIL shared
with the load generator); the tests use the same helper to exercise the real command.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from server.errors import Unavailable

LISTENING = r"listening on \S+ \(port (\d+)\)"
WORKERS = r"\d+ workers on \S+:(\d+)"
METRICS = r"metrics on http://\S+:(\d+)/metrics"
SERVING = r"SERVING family"


class ServerProcess:
    """A running ``serve`` command; its log lines are read on a thread (and copied to ``log``)."""

    def __init__(self, args: Sequence[str], *, log: IO[str] | None = None,
                 cwd: str | Path | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd=cwd)
        self._lines: queue.Queue[str] = queue.Queue()
        self._copy = log
        self.log: list[str] = []
        threading.Thread(target=self._read, name="serve-log", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # always drained, so the child never blocks on its pipe
            if self._copy is not None:
                self._copy.write(line)
                self._copy.flush()
            self._lines.put(line)
        self._lines.put("")  # end of output

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120) -> list[re.Match[str]]:
        """Block until ``pattern`` appeared ``count`` more times in the log."""
        found: list[re.Match[str]] = []
        while len(found) < count:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise Unavailable(f"serve: no {pattern!r} in its log after {timeout} s") from None
            if line == "":
                tail = "".join(self.log[-20:])
                raise Unavailable(f"serve exited ({self.proc.wait()}) before {pattern!r}:\n{tail}")
            self.log.append(line)
            m = re.search(pattern, line)
            if m:
                found.append(m)
        return found

    def port(self, pattern: str = LISTENING) -> int:
        return int(self.wait_for(pattern)[0].group(1))

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (graceful: in-flight requests finish) and wait; SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Serving:
    """A `serve` child that is SERVING: where to reach it and where it logs."""

    target: str  # 127.0.0.1:PORT
    metrics_url: str | None  # its /metrics, when started with one
    log_path: str


def start_serving(stack: contextlib.ExitStack, family_dir: str | Path, flags: Sequence[str] = (),
                  *, label: str = "serve", metrics: bool = True, ready_timeout: float = 300
                  ) -> Serving:
    """`adaptive-inference serve FAMILY` on free loopback ports until ``stack`` closes, its log in
    a temporary file; returns once its health service says SERVING."""
    from client.client import AdaptiveClient  # grpc: only when a server is started

    log_file = stack.enter_context(tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed by stack)
        "w", prefix=f"adaptive-{label}-", suffix=".log", delete=False))
    server = stack.enter_context(ServerProcess(
        [str(family_dir), "--port", "0", "--metrics-port", "0" if metrics else "-1", *flags],
        log=log_file))
    target = f"127.0.0.1:{server.port()}"
    metrics_url = (f"http://127.0.0.1:{int(server.wait_for(METRICS)[0].group(1))}/metrics"
                   if metrics else None)
    with AdaptiveClient(target) as client:
        client.wait_ready(timeout=ready_timeout)
    return Serving(target, metrics_url, log_file.name)


# --- CPU placement (benchmarks on a small host) -------------------------------------------------

@contextlib.contextmanager
def spawning_on(cpus: set[int] | None) -> Iterator[None]:
    """Processes started inside are born on ``cpus`` (None: wherever this one runs), as under
    ``taskset``: a server then sizes its worker pool and its contention model by them from its
    start (`server.cpus`), which pinning it after it started would not change."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def cpu_set(text: str | None) -> set[int] | None:
    """``"0"``, ``"0,1"`` or ``"2-7"`` → a set of CPU numbers (None stays None); ValueError
    naming the list otherwise."""
    if text is None:
        return None
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"CPU list {text!r}: expected numbers and ranges, e.g. 0 or 0,2-3") \
            from None
    return cpus


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of ``pid`` and each of its live descendants, by pid."""
    root = psutil.Process(pid)
    out: dict[int, float] = {}
    for p in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out
