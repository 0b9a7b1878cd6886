"""``--workers N``: N forked server processes on one port, kept alive by the parent, their metrics
aggregated by the parent.

Each worker runs the whole server (`server.app.serve`) and binds the same port with SO_REUSEPORT;
the kernel spreads *connections* (not requests) over them. The parent forks before any gRPC
object or thread exists (gRPC does not survive a fork) and before prometheus_client is imported,
so every worker writes its metrics through the multiprocess directory that the parent serves on
``--metrics-port``. A worker dies with its parent (``PR_SET_PDEATHSIG``), so no orphan keeps the
port.

Each worker gets ``--threads`` ÷ N pool threads, so N workers do not oversubscribe the cores,
and its monitor counts its siblings (the parent's other children) as this server, not as other
load on the host (`server.monitor.as_worker_of`).

Healing: a worker that exits while the server is not draining (killed by a signal, or any exit
status) is forked again: at once the first time, then after 0.5 s, 1 s, 2 s … up to
`MAX_BACKOFF_S`; the count starts over once a worker has lived `RESET_AFTER_S`. A worker tells the
parent through a pipe when it is SERVING; ``adaptive_workers`` counts those, next to
``adaptive_workers_configured`` and ``adaptive_worker_restarts_total`` (`WorkersCollector` on the
registry the parent serves). A dead worker's live gauges are removed (``mark_process_dead``). A
worker that exits with a status before its slot ever served is a start-up failure (a bad port, a
runner that cannot load): the server stops with status 1, as one process does.

Port ownership: SO_REUSEPORT would let a second ``--workers`` server share the port with the
first and split its traffic. The parent therefore claims ``(host, port)`` first: a Linux
abstract unix socket ``\\0adaptive-inference:HOST:PORT`` binds only once and vanishes with its
process, however that dies; and a plain bind probe finds any other listener on the port. A
second server is refused with one log line and exit status `PORT_IN_USE`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NoReturn

from compression.core.family import Family

# server.app imports grpc and prometheus_client only inside functions: safe before the fork.
from server.app import DRAIN_SIGNALS
from server.loop import run
from server.monitor import as_worker_of

if TYPE_CHECKING:
    from server.metrics import WorkerCounts
    from server.settings import ServeOptions

log = logging.getLogger(__name__)

# `server.app.serve`: one server process until a signal, then it ends the process.
ServeOne = Callable[..., Coroutine[Any, Any, Any]]

FIRST_BACKOFF_S = 0.5  # the second restart in a row waits this long; each further one doubles it
MAX_BACKOFF_S = 30.0
RESET_AFTER_S = 30.0  # a worker that lived this long starts the back-off over
PORT_IN_USE = 2  # exit status when another process serves the port (a user mistake, as in the CLI)
_READY = b"S"  # what a worker writes on its pipe once SERVING


def backoff_s(exits_in_a_row: int) -> float:
    """Seconds before restarting a worker after its ``exits_in_a_row``-th quick exit (1-based):
    0, then `FIRST_BACKOFF_S`, doubling up to `MAX_BACKOFF_S`."""
    if exits_in_a_row <= 1:
        return 0.0
    return min(FIRST_BACKOFF_S * 2.0 ** (exits_in_a_row - 2), MAX_BACKOFF_S)


def exit_reason(wait_status: int) -> str:
    """``killed by SIGKILL`` or ``exit status 1``, from an ``os.waitpid`` status."""
    if os.WIFSIGNALED(wait_status):
        number = os.WTERMSIG(wait_status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by {name}" + (" (core dumped)" if os.WCOREDUMP(wait_status) else "")
    return f"exit status {os.waitstatus_to_exitcode(wait_status)}"


# --- port ownership -----------------------------------------------------------------------------

class PortTaken(Exception):
    """Another process serves (or holds) the port."""


def claim_port(host: str, port: int) -> socket.socket | None:
    """Take the exclusive claim on ``host:port`` for this process (Linux; None elsewhere).

    The claim is a listening abstract unix socket: only one process can bind its name and the
    kernel releases it when that process dies. Raises `PortTaken` naming the holder's pid, which
    a connection to the claim tells (SO_PEERCRED)."""
    if not sys.platform.startswith("linux"):
        return None
    name = f"\0adaptive-inference:{host}:{port}"
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(name)
    except OSError as exc:
        claim.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        pid = _claim_owner(name)
        raise PortTaken(f"port {port} on {host} is already served by another adaptive-inference "
                        f"process (pid {pid if pid is not None else 'unknown'})") from None
    claim.listen(16)
    claim.setblocking(False)
    return claim


def _claim_owner(name: str) -> int | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(name)
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
    return int(struct.unpack("3i", creds)[0])


def probe_port(host: str, port: int) -> None:
    """Raise `PortTaken` if any socket listens on ``host:port``: a plain bind (without
    SO_REUSEPORT, which would join that socket's group) fails then. SO_REUSEADDR keeps the
    TIME_WAIT connections of an earlier server from counting."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _bind(probe, host, port)


def _bind(sock: socket.socket, host: str, port: int) -> None:
    """``sock.bind``; a port in use is `PortTaken`, said plainly."""
    try:
        sock.bind((host, port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise PortTaken(f"port {port} on {host} is already in use by another process") from None


def hold_port(host: str, port: int) -> tuple[socket.socket, socket.socket | None, int]:
    """Claim ``host:port`` and bind the SO_REUSEPORT holder every worker joins; returns
    (holder, claim, the port: port 0 resolves here once)."""
    claim = claim_port(host, port) if port else None
    holder = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        if port:
            probe_port(host, port)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _bind(holder, host, port)
        port = holder.getsockname()[1]
        if claim is None:  # port 0: the kernel picked a free port; claim it all the same
            claim = claim_port(host, port)
    except BaseException:
        holder.close()
        if claim is not None:
            claim.close()
        raise
    return holder, claim, port


# --- the workers --------------------------------------------------------------------------------

def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when the parent dies, even by SIGKILL, so no orphan keeps
    serving on the shared port."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the prctl: no signal will come
            os._exit(1)


def _worker_main(family: Family, options: ServeOptions, serve: ServeOne, ready_fd: int,
                 parent: int, inherited: list[int]) -> NoReturn:
    """The forked child: a whole server that says SERVING on ``ready_fd``; never returns."""
    code = 1
    try:
        # The parent's handlers and wake-up pipe are not this process's; asyncio installs its own.
        signal.set_wakeup_fd(-1)
        for sig in (*DRAIN_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for fd in inherited:  # the claim, the metrics listener, the other workers' pipes …
            with contextlib.suppress(OSError):
                os.close(fd)
        _die_with_parent(parent)
        as_worker_of(parent)  # its siblings are this server, not other load on the host

        def ready() -> None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, _READY)

        run(serve(family, options, reuse_port=True, metrics=False, on_ready=ready),
            options.event_loop)
    except Exception as exc:  # serve ends the process itself; this is a failure to start it
        log.error("worker %d failed: %s: %s", os.getpid(), type(exc).__name__, exc)
    finally:
        os._exit(code)


@dataclass
class _Slot:
    """One of the ``--workers`` places and the process filling it now."""

    index: int
    pid: int = 0  # 0: no process (exited, waiting for its restart)
    ready_fd: int = -1  # read end of the worker's SERVING pipe
    serving: bool = False
    ever_served: bool = False
    started: float = 0.0  # monotonic time of the fork
    exits_in_a_row: int = 0  # exits without RESET_AFTER_S of life between them: the back-off
    restart_at: float | None = None
    exited: tuple[int, float] | None = None  # (pid, when) of the exit a restart replaces


class _Supervisor:
    """The parent: forks the workers, restarts those that die, forwards drain signals."""

    def __init__(self, family: Family, options: ServeOptions, serve: ServeOne,
                 port_fds: list[int], port: int, mp_dir: str) -> None:
        self.family = family
        self.options = options
        self.serve = serve
        self.port = port
        self.mp_dir = mp_dir
        self.child_options = replace(options, port=port,
                                     threads=max(options.threads // options.workers, 1))
        self.slots = [_Slot(i) for i in range(options.workers)]
        self.by_pid: dict[int, _Slot] = {}
        self.restarts = 0
        self.draining = False
        self.status = 0
        self.signals: list[int] = []
        self.parent = os.getpid()
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        # Descriptors a worker must not keep: they belong to the parent (the claim would outlive
        # it in an orphan).
        self.parent_fds = [*port_fds, self.wake_r, self.wake_w, self.sel.fileno()]
        self.mark_dead: Callable[[int, str], None] = lambda pid, path: None

    def counts(self) -> WorkerCounts:
        from server.metrics import WorkerCounts

        return WorkerCounts(live=sum(1 for s in self.slots if s.serving and s.pid),
                            configured=len(self.slots), restarts=self.restarts)

    def spawn(self, slot: _Slot) -> None:
        ready_r, ready_w = os.pipe()
        inherited = [*self.parent_fds, ready_r,
                     *(s.ready_fd for s in self.slots if s.ready_fd >= 0)]
        # After the first generation the parent runs the metrics HTTP thread. Forking then is
        # safe for what the child does: that thread only reads the multiprocess files and holds
        # no lock the child takes (logging re-creates its locks after a fork).
        pid = os.fork()
        if pid == 0:
            _worker_main(self.family, self.child_options, self.serve, ready_w, self.parent,
                         inherited)
        os.close(ready_w)
        slot.pid, slot.ready_fd, slot.serving = pid, ready_r, False
        slot.started, slot.restart_at = time.monotonic(), None
        self.by_pid[pid] = slot
        self.sel.register(ready_r, selectors.EVENT_READ, slot)

    def run(self, start_metrics: Callable[[_Supervisor], Any]) -> int:
        for slot in self.slots:  # before prometheus_client is imported and any thread exists
            self.spawn(slot)
        log.info("%d workers on %s:%d: pids %s", len(self.slots), self.options.host, self.port,
                 [s.pid for s in self.slots])
        from prometheus_client import multiprocess

        self.mark_dead = multiprocess.mark_process_dead
        httpd = start_metrics(self)  # it closes its own sockets in a forked worker
        # Signals only note themselves (the loop acts on them): a handler that forwarded a signal
        # itself could run between a fork and the bookkeeping of its pid and miss that worker.
        signal.set_wakeup_fd(self.wake_w)
        for sig in (*DRAIN_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, self._noted)
        try:
            self._loop()
        finally:
            signal.set_wakeup_fd(-1)
            for sig in (*DRAIN_SIGNALS, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            if httpd is not None:
                from server.metrics import stop_http

                stop_http(httpd)
            self.sel.close()
            for fd in (self.wake_r, self.wake_w, *(s.ready_fd for s in self.slots)):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        return self.status

    def _noted(self, signum: int, _frame: Any) -> None:
        if signum != signal.SIGCHLD:  # SIGCHLD only wakes the loop (the wake-up pipe)
            self.signals.append(signum)

    def _loop(self) -> None:
        while True:
            self._reap()
            while self.signals:
                self._drain(signal.Signals(self.signals.pop(0)))
            if self.draining and not self.by_pid:
                return
            now = time.monotonic()
            for slot in self.slots:
                if slot.restart_at is not None and slot.restart_at <= now and not self.draining:
                    self._restart(slot)
            due = [s.restart_at for s in self.slots if s.restart_at is not None]
            # The cap is a safety net only: every exit and signal writes to the wake-up pipe.
            timeout = min([max(d - now, 0.0) for d in due] + [1.0])
            for key, _events in self.sel.select(timeout):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self.wake_r, 512):
                            pass
                elif isinstance(key.data, _Slot):
                    self._pipe(key.data)
                else:
                    self._answer_claim(key.fileobj)

    def watch_claim(self, claim: socket.socket) -> None:
        # A second server connects to learn the owner's pid (SO_PEERCRED); accept and close, so
        # such probes never fill the backlog.
        self.sel.register(claim, selectors.EVENT_READ, "claim")

    def _answer_claim(self, claim: Any) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                conn, _ = claim.accept()
                conn.close()

    def _pipe(self, slot: _Slot) -> None:
        try:
            data = os.read(slot.ready_fd, 64)
        except BlockingIOError:
            return
        if not data:  # the worker exited (its write end closed); the reaper takes it from here
            self._close_pipe(slot)
            return
        if _READY in data and not slot.serving:
            slot.serving = slot.ever_served = True
            if slot.exited is not None:
                pid, when = slot.exited
                log.info("worker %d (pid %d) is serving again, %.2f s after pid %d exited",
                         slot.index, slot.pid, time.monotonic() - when, pid)
                slot.exited = None

    def _close_pipe(self, slot: _Slot) -> None:
        if slot.ready_fd >= 0:
            self.sel.unregister(slot.ready_fd)
            os.close(slot.ready_fd)
            slot.ready_fd = -1

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self.by_pid.pop(pid, None)
            if slot is not None:
                self._exited(slot, pid, wait_status)

    def _exited(self, slot: _Slot, pid: int, wait_status: int) -> None:
        self.mark_dead(pid, self.mp_dir)  # its live gauges leave the aggregate now
        self._close_pipe(slot)
        now = time.monotonic()
        lived = now - slot.started
        reason = exit_reason(wait_status)
        code = os.waitstatus_to_exitcode(wait_status)
        slot.pid, slot.serving = 0, False
        if self.draining:
            if code == 0 or -code in DRAIN_SIGNALS:
                log.info("worker %d (pid %d) stopped: %s", slot.index, pid, reason)
            else:
                log.error("worker %d (pid %d) %s while draining", slot.index, pid, reason)
                self.status = 1
            return
        if not slot.ever_served and os.WIFEXITED(wait_status) and code != 0:
            log.error("worker %d (pid %d) failed to start (%s); stopping the server",
                      slot.index, pid, reason)
            self.status = 1
            self._drain(signal.SIGTERM)
            return
        if lived >= RESET_AFTER_S:
            slot.exits_in_a_row = 0
        slot.exits_in_a_row += 1
        delay = backoff_s(slot.exits_in_a_row)
        slot.restart_at, slot.exited = now + delay, (pid, now)
        log.warning("worker %d (pid %d) %s after %.1f s; restarting it %s", slot.index, pid,
                    reason, lived, "now" if delay == 0 else
                    f"in {delay:.1f} s (back-off: exit {slot.exits_in_a_row} in a row)")

    def _restart(self, slot: _Slot) -> None:
        self.restarts += 1
        self.spawn(slot)
        log.info("worker %d restarted as pid %d (restart %d of this server)", slot.index,
                 slot.pid, self.restarts)

    def _drain(self, sig: signal.Signals) -> None:
        if not self.draining:
            self.draining = True
            for slot in self.slots:
                slot.restart_at = None
            log.info("%s: draining %d workers", sig.name, len(self.by_pid))
        for pid in self.by_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


def serve_workers(family: Family, options: ServeOptions, serve: ServeOne) -> int:
    """Fork ``options.workers`` servers on one port and keep them up until a drain signal;
    aggregate their metrics here. Returns the exit status."""
    try:
        holder, claim, port = hold_port(options.host, options.port)
    except PortTaken as exc:
        log.error("%s; not starting", exc)
        return PORT_IN_USE
    mp_dir = tempfile.mkdtemp(prefix="adaptive-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir  # before prometheus_client is imported
    port_fds = [holder.fileno(), *([claim.fileno()] if claim is not None else [])]
    sup = _Supervisor(family, options, serve, port_fds, port, mp_dir)
    if claim is not None:
        sup.watch_claim(claim)

    def start_metrics(s: _Supervisor) -> Any:
        if options.metrics_port is None:
            return None
        from prometheus_client import CollectorRegistry

        from server.metrics import WorkerFilesCollector, WorkersCollector, serve_http

        registry = CollectorRegistry()
        WorkerFilesCollector(registry, path=mp_dir)
        registry.register(WorkersCollector(s.counts))
        httpd, _ = serve_http(options.metrics_port, options.metrics_host or options.host,
                              registry)
        return httpd

    try:
        return sup.run(start_metrics)
    finally:
        holder.close()
        if claim is not None:
            claim.close()
        shutil.rmtree(mp_dir, ignore_errors=True)  # the workers' metric files die with them
