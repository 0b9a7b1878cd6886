"""The event loop a server process runs on: uvloop where it is installed, else asyncio's own.

gRPC's asyncio server wakes the loop for every completion of every call (its poller thread writes
to a socket pair the loop watches), so the loop's own cost per wake-up and per callback is part of
every request's. uvloop's is lower (bench/ceiling.py: about a tenth less server CPU per answer,
and the bare echo server likewise). It is a dependency where it has wheels (CPython on POSIX);
without it the server runs unchanged on asyncio's loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, on uvloop's loop when uvloop is importable."""
    try:
        import uvloop
    except ImportError:
        log.info("event loop: asyncio (uvloop is not installed)")
        return asyncio.run(main)
    log.info("event loop: uvloop %s", uvloop.__version__)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
