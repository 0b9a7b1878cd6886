"""Ordered read-ahead for request streams: a stream's requests answered concurrently, in order.

`ordered` reads requests from an async iterator while the earlier ones are still being answered
(at most ``window`` of them, and ``max_bytes`` of payload, held at a time, but always one) and
yields the answers in request order. The servicer's ``ModelStreamInfer`` uses it, so that a
client pipelining one stream gets its requests batched together instead of answered one by one.
Pure asyncio: no gRPC, testable with plain coroutines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


async def ordered(requests: AsyncIterator[T], answer: Callable[[T], Coroutine[None, None, R]], *,
                  window: int, max_bytes: int, size: Callable[[T], int],
                  admit: Callable[[], bool] = lambda: False,
                  done: Callable[[], None] = lambda: None) -> AsyncGenerator[R, None]:
    """Yield ``answer(request)`` for each of ``requests``, in order, computing up to ``window``
    of them at once (and holding the next one read). ``answer`` must not raise: a failed request
    is an answer too.

    ``admit()`` is called as each request is read; where it returns True, ``done()`` is called
    once that request's answer was yielded and the consumer came back for the next (for a gRPC
    stream: once the message was sent), or once the request was dropped because the stream ended
    early. A failure reading ``requests`` ends the answers after those of the requests read.
    """
    queue: asyncio.Queue[asyncio.Task[R] | None] = asyncio.Queue()  # bounded by the waits below
    freed = asyncio.Event()  # set whenever an answer gives its place back
    held = 0  # payload bytes of the requests read and not yet answered
    reading: dict[asyncio.Task[R], tuple[int, bool]] = {}  # task → (bytes, admitted)

    async def read() -> None:
        nonlocal held
        try:
            async for request in requests:
                n = size(request)
                while reading and (len(reading) >= window or held + n > max_bytes):
                    freed.clear()
                    await freed.wait()
                held += n
                task: asyncio.Task[R] = asyncio.create_task(answer(request))
                reading[task] = (n, admit())
                await queue.put(task)
        except Exception:  # the client's side broke off: answer what was read, then end
            log.debug("stream: reading requests failed", exc_info=True)
        # Not on cancellation: the answers ended first, and nobody would take the end mark.
        await queue.put(None)

    def release(task: asyncio.Task[R]) -> None:
        nonlocal held
        n, admitted = reading.pop(task)
        held -= n
        freed.set()
        if admitted:
            done()

    reader = asyncio.create_task(read())
    try:
        while (task := await queue.get()) is not None:
            try:
                yield await task
            finally:
                release(task)
    finally:
        reader.cancel()
        for task in list(reading):  # the stream ended early: drop what was read ahead
            task.cancel()
            release(task)
