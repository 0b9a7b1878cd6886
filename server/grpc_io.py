"""Which threads read a process's sockets (``--grpc-io``), set before gRPC loads.

gRPC's asyncio server hands every completion of every call to one *poller* thread, which wakes the
event loop. Where the bytes are read before that is gRPC core's choice:

- ``event-engine`` (gRPC's own default since its EventEngine listener): a pool of
  ``event_engine`` threads reads each connection and posts the completion to the poller thread:
  two thread hand-offs per completion before the loop runs.
- ``poller`` (the default here): the listener of gRPC's older I/O manager, whose sockets are
  polled by the thread that waits on the completion queue, which is the poller thread itself: one
  hand-off fewer per completion, and the ``event_engine`` threads stay idle.

Measured in the same rounds on 2 cores: 4-6 % less server CPU per unary answer, 10 % less per
stream answer, 5 % lower batch-1 latency (docs/serving.md, "Where gRPC reads the sockets").
A client process has the same choice for its channels (EventEngine's client, ``CLIENT``): the
CLI's load generators (``bench``, ``demo``) read theirs on the poller thread too (5-24 % less of
their CPU per request, 2 rounds); the client library leaves the choice to its process.
gRPC reads its experiments once, when it loads, so the choice is made through the environment
(``GRPC_EXPERIMENTS``) before ``grpc`` is imported: the CLI calls `configure` before it imports
the server, and `--workers`' forks inherit the loaded core. An operator's own
``GRPC_EXPERIMENTS`` keeps its other entries. (A gRPC that no longer knows the experiment logs
"Unknown experiment" once and serves as ``event-engine`` would.)
"""

from __future__ import annotations

import logging
import os
import sys

from server.settings import GRPC_IO, one_of

log = logging.getLogger(__name__)

ENV = "GRPC_EXPERIMENTS"
LISTENER = "event_engine_listener"  # a server's sockets; on: the EventEngine listener (default)
CLIENT = "event_engine_client"  # a client's channels; on: EventEngine's client (gRPC's default)


def experiments(grpc_io: str, current: str | None, experiment: str = LISTENER) -> str:
    """``GRPC_EXPERIMENTS`` for ``grpc_io``: ``current``'s entries for other experiments, and
    ``experiment`` switched off for ``poller`` (left to gRPC's default for ``event-engine``)."""
    one_of("--grpc-io", grpc_io, GRPC_IO)
    others = [e.strip() for e in (current or "").split(",")
              if e.strip() and e.strip().lstrip("-") != experiment]
    return ",".join([*others, f"-{experiment}"] if grpc_io == "poller" else others)


def configure(grpc_io: str, experiment: str = LISTENER) -> None:
    """Set this process's ``GRPC_EXPERIMENTS`` for ``grpc_io``: its server's sockets
    (``LISTENER``) or its channels' (``CLIENT``). Takes effect only if ``grpc`` is not imported
    yet; otherwise the process keeps what gRPC loaded, and the log says so."""
    value = experiments(grpc_io, os.environ.get(ENV), experiment)
    if "grpc" in sys.modules and os.environ.get(ENV, "") != value:
        log.warning("--grpc-io %s: gRPC is already loaded in this process, which keeps its own "
                    "socket readers (%s=%r)", grpc_io, ENV, os.environ.get(ENV, ""))
        return
    if value:
        os.environ[ENV] = value
    else:
        os.environ.pop(ENV, None)
    where = "its asyncio poller thread" if grpc_io == "poller" else "its EventEngine thread pool"
    log.debug("gRPC reads the sockets on %s (%s=%r)", where, ENV, value)
