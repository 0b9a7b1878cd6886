"""``--workers N``: N forked server processes on one port, their metrics aggregated by the parent.

Each worker runs the whole server (`server.app.serve`) and binds the same port with SO_REUSEPORT;
the kernel spreads *connections* (not requests) over them. The parent forks before any gRPC
object or thread exists (gRPC does not survive a fork) and before prometheus_client is imported,
so every worker writes its metrics through the multiprocess directory that the parent serves on
``--metrics-port``. A worker dies with its parent (``PR_SET_PDEATHSIG``), so no orphan keeps the
port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from compression.core.family import Family

# server.app imports grpc and prometheus_client only inside functions: safe before the fork.
from server.app import DRAIN_SIGNALS

if TYPE_CHECKING:
    from server.app import ServeOptions

log = logging.getLogger(__name__)

# `server.app.serve`: one server process until a signal; returns its exit status.
ServeOne = Callable[..., Coroutine[Any, Any, int]]


def _die_with_parent() -> None:
    """Linux: SIGTERM this worker when the parent dies, even by SIGKILL, so no orphan keeps
    serving on the shared port."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def serve_workers(family: Family, options: ServeOptions, serve: ServeOne) -> int:
    """Fork ``options.workers`` servers on one port; aggregate their metrics here."""
    mp_dir = tempfile.mkdtemp(prefix="adaptive-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir  # before prometheus_client is imported
    # Hold the port with SO_REUSEPORT so port 0 resolves once and every worker binds the same.
    holder = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind((options.host, options.port))
    port = holder.getsockname()[1]
    child_opts = replace(options, port=port,
                         threads=max(options.threads // options.workers, 1))
    pids: list[int] = []
    for _ in range(options.workers):
        pid = os.fork()
        if pid == 0:  # worker: a whole server, metrics through the multiprocess directory
            holder.close()
            _die_with_parent()
            code = 1
            try:
                code = asyncio.run(serve(family, child_opts, reuse_port=True, metrics=False))
            finally:
                os._exit(code)
        pids.append(pid)
    log.info("%d workers on %s:%d: pids %s", options.workers, options.host, port, pids)

    from prometheus_client import CollectorRegistry, multiprocess

    from server.metrics import serve_http, stop_http

    httpd = None
    if options.metrics_port is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=mp_dir)
        httpd, _ = serve_http(options.metrics_port, options.metrics_host or options.host,
                              registry)

    def forward(signum: int, _frame: Any) -> None:
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signum)

    for sig in DRAIN_SIGNALS:
        signal.signal(sig, forward)
    status = 0
    for _ in pids:
        pid, wstatus = os.wait()
        multiprocess.mark_process_dead(pid, mp_dir)
        code = os.waitstatus_to_exitcode(wstatus)
        if code not in (0, -signal.SIGTERM, -signal.SIGINT):
            log.error("worker %d exited with %d", pid, code)
            status = 1
    holder.close()
    if httpd is not None:
        stop_http(httpd)
    shutil.rmtree(mp_dir, ignore_errors=True)  # the workers' metric files die with them
    return status
