"""`server.streams.ordered`: a stream's requests answered concurrently, the answers in order, the
read-ahead bounded, and what an early end leaves behind accounted for. Plain coroutines, no gRPC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from server.streams import ordered


async def _items(items: list[int], fail_after: int | None = None) -> AsyncIterator[int]:
    for i, item in enumerate(items):
        if fail_after is not None and i == fail_after:
            raise ConnectionResetError("the client went away")
        yield item


class Answerer:
    """Answers ``n`` after ``n`` ms, so later requests can finish first; counts how many are in
    progress at once and how many were admitted and released."""

    def __init__(self) -> None:
        self.running = self.most = self.admitted = self.done = 0

    async def __call__(self, n: int) -> str:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(n / 1e3)
            return f"answer {n}"
        finally:
            self.running -= 1

    def admit(self) -> bool:
        self.admitted += 1
        return True

    def release(self) -> None:
        self.done += 1


def _run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_answers_come_in_request_order_though_they_finish_out_of_it() -> None:
    a = Answerer()
    delays = [30, 1, 20, 1, 10, 1]

    async def collect() -> list[str]:
        return [r async for r in ordered(_items(delays), a, window=8, max_bytes=1 << 20,
                                         size=lambda n: 1, admit=a.admit, done=a.release)]

    assert _run(collect()) == [f"answer {n}" for n in delays]
    assert a.most > 1  # computed concurrently, not one after another
    assert a.admitted == a.done == len(delays)


@pytest.mark.parametrize(("window", "max_bytes", "most"), [(3, 1 << 20, 3), (8, 250, 2),
                                                           (8, 50, 1)])
def test_read_ahead_is_bounded_by_count_and_bytes_but_always_takes_one(
        window: int, max_bytes: int, most: int) -> None:
    a = Answerer()  # each request weighs 100 bytes

    async def collect() -> list[str]:
        return [r async for r in ordered(_items([5] * 12), a, window=window,
                                         max_bytes=max_bytes, size=lambda n: 100)]

    assert len(_run(collect())) == 12  # type: ignore[arg-type]
    assert a.most == most


def test_a_consumer_that_stops_early_releases_everything_read_ahead() -> None:
    a = Answerer()

    async def take_two() -> None:
        async with contextlib.aclosing(ordered(
                _items([50] * 20), a, window=8, max_bytes=1 << 20, size=lambda n: 1,
                admit=a.admit, done=a.release)) as answers:
            async for i, _ in _aenumerate(answers):
                if i == 1:
                    break
        await asyncio.sleep(0)  # the cancelled answers finish cancelling

    _run(take_two())
    assert a.admitted > 2  # it had read ahead ...
    assert a.done == a.admitted  # ... and gave every one of them back
    assert a.running == 0


def test_a_broken_request_stream_ends_after_the_answers_to_what_was_read() -> None:
    a = Answerer()

    async def collect() -> list[str]:
        return [r async for r in ordered(_items([1, 2, 3, 4], fail_after=3), a, window=8,
                                         max_bytes=1 << 20, size=lambda n: 1)]

    assert _run(collect()) == ["answer 1", "answer 2", "answer 3"]


async def _aenumerate(it: AsyncIterator[str]) -> AsyncIterator[tuple[int, str]]:
    i = 0
    async for x in it:
        yield i, x
        i += 1
