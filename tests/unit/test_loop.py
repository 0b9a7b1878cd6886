"""`--event-loop`: auto takes uvloop where it is installed and asyncio's loop where it is not; an
unknown name or a missing uvloop asked for by name is one clear error naming the flag."""

from __future__ import annotations

import asyncio
import importlib.util
import sys

import pytest

from server.errors import InvalidArgument
from server.loop import resolve, run


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def _without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError


def test_auto_serves_on_uvloop_where_it_is_installed() -> None:
    assert importlib.util.find_spec("uvloop") is not None  # a dependency on this platform
    assert resolve("auto") == "uvloop"
    assert run(_loop_module(), "auto").startswith("uvloop")
    assert run(_loop_module(), "asyncio").startswith("asyncio")


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_uvloop(monkeypatch)
    assert resolve("auto") == "asyncio"
    assert run(_loop_module(), "auto").startswith("asyncio")
    with pytest.raises(InvalidArgument, match=r"--event-loop uvloop: uvloop is not installed"):
        resolve("uvloop")


def test_an_unknown_loop_is_refused_by_name() -> None:
    with pytest.raises(InvalidArgument, match=r"--event-loop 'tokio': one of auto, asyncio, uvloop"):
        resolve("tokio")
