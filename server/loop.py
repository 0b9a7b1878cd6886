"""The event loop a server process runs on: uvloop where it is installed, asyncio's own otherwise.

gRPC's asyncio server wakes the loop for every completion of every call (its poller thread writes
to a socket pair the loop watches), so the loop's own cost per wake-up and per callback is part of
every request's. uvloop's is lower: 4-6 % less server CPU per unary answer than asyncio's loop
with bench/ceiling.py (2 cores, 5 paired rounds, 1 and 2 workers: 0.479 against 0.509 ms, 0.541
against 0.570). ``--event-loop auto`` (the default) takes uvloop when it imports (a dependency
on Linux and macOS) and says so in the log; ``asyncio`` or ``uvloop`` insist on one.

uvloop was once kept off by default because the server's RSS grew 3-11 % over the fuzz test on
it (the bound is 10 %) against -2 to +3 % on asyncio's loop. That was glibc's sliding mmap
threshold, not uvloop: since `server.memory` fixes the threshold, three runs each gave -0.9,
+0.7 and +4.0 % on uvloop against +3.7, +2.3 and +4.9 % on asyncio's loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from server.errors import InvalidArgument
from server.settings import EVENT_LOOPS, one_of

log = logging.getLogger(__name__)

T = TypeVar("T")


def resolve(loop: str) -> str:
    """``--event-loop`` as the loop it names: ``auto`` is uvloop where it is installed, else
    asyncio. Raises InvalidArgument (one line) for an unknown name or uvloop asked for and
    missing."""
    one_of("--event-loop", loop, EVENT_LOOPS)  # the check ServeOptions makes, for direct callers
    try:  # imported, not just found: a broken install falls back (auto) or says so
        import uvloop  # noqa: F401

        installed = True
    except ImportError:
        installed = False
    if loop == "auto":
        return "uvloop" if installed else "asyncio"
    if loop == "uvloop" and not installed:
        raise InvalidArgument("--event-loop uvloop: uvloop is not installed "
                              "(pip install uvloop), or serve with --event-loop asyncio")
    return loop


def new_event_loop(loop: str = "auto") -> asyncio.AbstractEventLoop:
    """A new event loop of the kind ``loop`` resolves to (`resolve`); says which in the log."""
    if resolve(loop) == "uvloop":
        import uvloop

        log.info("event loop: uvloop %s", uvloop.__version__)
        return uvloop.new_event_loop()
    log.info("event loop: asyncio")
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """``asyncio.run(main)`` on a `new_event_loop` of the kind ``loop`` names."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(loop)) as runner:
        return runner.run(main)
