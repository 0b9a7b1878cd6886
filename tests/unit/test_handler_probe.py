"""bench/handler.py's `Probe`, which times the parts of the request path inside a loaded server: it
counts each call and its thread CPU, reaches calls looked up at call time (a module's function, a
method, an instance's ``__call__``, a coroutine function), and puts every original back."""

from __future__ import annotations

import asyncio
import importlib
import time
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def handler(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))  # its siblings import as top-level modules
    return importlib.import_module("handler")


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class Runner:
    def __call__(self, seconds: float) -> str:
        _spin(seconds)
        return "ran"

    async def infer(self, seconds: float) -> str:
        await asyncio.sleep(0)  # yields once: CPU of other tasks would count, none runs here
        _spin(seconds)
        return "answered"


def test_the_probe_counts_calls_and_their_cpu_and_restores_the_originals(
        handler: types.ModuleType) -> None:
    module = types.ModuleType("parts")
    module.decode = lambda seconds: _spin(seconds) or "decoded"
    original_call, original_infer = Runner.__dict__["__call__"], Runner.__dict__["infer"]
    original_decode = module.decode
    probe = handler.Probe()
    probe.wrap(module, "decode", "decode")
    probe.wrap(Runner, "__call__", "run")
    probe.wrap(Runner, "infer", "infer")

    runner = Runner()
    assert module.decode(0.002) == "decoded"
    assert runner(0.004) == "ran" and runner(0.004) == "ran"  # found through the type
    assert asyncio.run(runner.infer(0.003)) == "answered"

    assert probe.calls == {"decode": 1, "run": 2, "infer": 1}
    assert probe.cpu["decode"] == pytest.approx(0.002, abs=0.001)
    assert probe.cpu["run"] == pytest.approx(0.008, abs=0.002)
    assert probe.cpu["infer"] == pytest.approx(0.003, abs=0.001)
    probe.reset()
    assert not probe.calls and not probe.cpu

    probe.remove()
    assert Runner.__dict__["__call__"] is original_call
    assert Runner.__dict__["infer"] is original_infer
    assert module.decode is original_decode
    runner(0.0)
    assert not probe.calls  # nothing counts once removed


def test_the_timer_cost_is_small_and_positive(handler: types.ModuleType) -> None:
    us = handler.timer_us(calls=20_000)
    assert 0.0 < us < 50.0
