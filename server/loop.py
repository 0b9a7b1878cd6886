"""The event loop a server process runs on: asyncio's own by default, uvloop by choice.

gRPC's asyncio server wakes the loop for every completion of every call (its poller thread writes
to a socket pair the loop watches), so the loop's own cost per wake-up and per callback is part of
every request's. uvloop's is lower: about 9 % less server CPU per answer with bench/ceiling.py
(0.609 → 0.552 ms on 2 cores). It is not the default because its buffers do not go back to the
system after very large messages: over the fuzz test's 10,200 requests (up to 64 MiB bodies) the
server's RSS grew 3–11 % on uvloop and −2 to +3 % on asyncio's loop, and the bound is 10 %
(docs/reliability.md). ``serve --event-loop uvloop`` (``pip install uvloop``) trades that memory
for the CPU.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from server.errors import InvalidArgument

log = logging.getLogger(__name__)

T = TypeVar("T")
LOOPS = ("asyncio", "uvloop")


def check(loop: str) -> None:
    """``--event-loop``: a known loop, and uvloop importable when asked for (one line if not)."""
    if loop not in LOOPS:
        raise InvalidArgument(f"--event-loop {loop!r}: expected one of {LOOPS}")
    if loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise InvalidArgument("--event-loop uvloop: uvloop is not installed "
                                  "(pip install uvloop), or serve with --event-loop asyncio"
                                  ) from None


def run(main: Coroutine[Any, Any, T], loop: str = "asyncio") -> T:
    """``asyncio.run(main)`` on the chosen loop (`check` it first)."""
    if loop == "uvloop":
        import uvloop

        log.info("event loop: uvloop %s", uvloop.__version__)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
