"""Memory that comes back: the C allocator's settings for a long-running server process.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
after one large request every later buffer of that size comes from the heap, and a heap top
that is not free is never returned: measured with `bench/memory.py` (11 variants, N=4096,
``--max-batch 256``), RSS stayed at 786 MiB after the traffic against a 323 MiB start. Fixing
the threshold (which also stops its growth) keeps larger buffers in their own mappings,
unmapped when freed: 166 MiB at start, 329 MiB after. ONNX Runtime's own arena is shrunk after
large batches (`compression.core.ort.SHRINK_ABOVE_ROWS`).

The threshold is 4 MiB, not glibc's initial 128 KiB: a buffer in its own mapping is
page-faulted in, zeroed, on every request, and a 256-image FP32 request (800 KB, a GPU lane's
batch) copies its payload three times on the way in. At 256 KiB that cost 0.6 ms of system time
per such request, 9 % of the server's CPU per answer for `distilled` (7.2-7.5 against 6.5-6.9 ms,
2 cores, closed loop, two rounds each). Buffers under 4 MiB are reused from the heap instead;
what the heap keeps is bounded by the queues (``--max-queue``): after `bench/memory.py`'s
traffic the defaults kept 316-334 MiB against 287-293 at 256 KiB (bound 457), the largest flags
340-343 against 349.

What the heap keeps between requests is given back once traffic stops (`IdleTrim`): after
`bench/memory.py`'s traffic and 5 s idle, 282-284 MiB against 328 without it (defaults), 304-307
against 415 (``--max-queue 8192 --max-batch 256``), same session.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 << 20  # see the module docstring
TRIM_THRESHOLD_BYTES = 1 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once per process (and inherited by forked workers):
    `find_library` runs ``ldconfig`` in a subprocess."""
    path = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(path) if path else None
    except OSError:
        return None


def _libc_function(name: str) -> Any:
    """``name`` from the C library, or None where it has none (not glibc)."""
    return getattr(_libc(), name, None)


def return_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (and the workers it forks).
    Returns False where the C library is not glibc (nothing to do there)."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        log.debug("no mallopt in this C library: allocator left as it is")
        return False
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not ok:
        log.warning("mallopt refused the mmap/trim thresholds: freed memory may stay mapped")
    return ok


class IdleTrim:
    """Gives the heap's free pages back to the system once traffic stops.

    Allocations that outlive a request land among the buffers it freed, so the heap's free
    space is scattered, and glibc returns only a free top: read right after the same traffic,
    the fuzz test's server stood anywhere in 211-285 MiB; read after the trim, in 208-215.
    ``malloc_trim(0)`` releases every free page wherever it lies. It walks the arenas under
    their locks (0.2-2.6 ms measured there), so it runs once per burst, on the first quiet
    monitor interval after a busy one, never while requests keep the event loop busy."""

    QUIET = 0.01  # the event loop's busy ratio below which an interval counts as idle

    def __init__(self, trim: Callable[[int], int] | None = None) -> None:
        self._trim = trim if trim is not None else _libc_function("malloc_trim")
        self._busy_since_trim = False

    def tick(self, busy: float) -> bool:
        """One monitor interval's loop busy ratio; trims on the first quiet one after traffic."""
        if busy >= self.QUIET:
            self._busy_since_trim = True
            return False
        if not self._busy_since_trim or self._trim is None:
            return False
        self._busy_since_trim = False
        self._trim(0)
        return True
