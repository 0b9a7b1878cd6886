"""bench/scaleout.py's server side of a step (where the offered load went) and how
bench/report.py renders it: a step's counters are the difference of two scrapes, and the report
shows, at each ramp's peak and at twice its rate, what was sent, kept back, answered, refused and
never read."""

from __future__ import annotations

import collections
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from bench.report import throughput_section

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def scaleout(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))  # its siblings import as top-level modules
    return importlib.import_module("scaleout")


def test_a_step_is_the_difference_of_two_scrapes(scaleout: ModuleType) -> None:
    before = collections.Counter({"status OK": 100, "answered distilled": 100, "refused load": 5,
                                  "late": 2, "batches": 50, "batch samples": 400, "cpu_s": 10.0})
    after = collections.Counter({"status OK": 400, "answered distilled": 350, "answered int8": 50,
                                 "status DEADLINE_EXCEEDED": 30, "refused load": 35, "late": 2,
                                 "batches": 250, "batch samples": 2000, "cpu_s": 14.5})
    step = scaleout.server_step(before, after, 5.0)
    assert step["cores"] == pytest.approx(0.9)
    assert step["status"] == {"DEADLINE_EXCEEDED": 30, "OK": 300}
    assert step["answered"] == {"distilled": 250, "int8": 50}  # a variant new in this step counts
    assert step["refused"] == {"load": 30}
    assert step["late"] == 0
    assert step["mean_batch_samples"] == 8.0


def test_no_batch_in_a_step_has_no_mean(scaleout: ModuleType) -> None:
    snap = collections.Counter({"status OK": 3, "cpu_s": 1.0})
    assert scaleout.server_step(snap, snap, 1.0)["mean_batch_samples"] is None


def _step(rate: float, goodput: float, server: dict[str, Any] | None) -> dict[str, Any]:
    step: dict[str, Any] = {"offered_rps": rate, "seconds": 5.0, "attainment": goodput / rate,
                            "goodput_rps": goodput, "answered": int(goodput * 5), "errors": 1000,
                            "client_throttled": 500, "errors_by_code": {}}
    if server is not None:
        step["server"] = server
    return step


def _run(with_server: bool) -> dict[str, Any]:
    def server(ok: int, load: int, unread: int) -> dict[str, Any] | None:
        return ({"cores": 0.97, "status": {"OK": ok, "DEADLINE_EXCEEDED": load},
                 "answered": {"distilled": ok}, "refused": {"load": load}, "late": 10,
                 "unread": unread, "mean_batch_samples": 8.0} if with_server else None)

    steps = [_step(1000, 990, server(4950, 10, 0)), _step(1500, 1300, server(6600, 250, 150)),
             _step(3000, 1200, server(6100, 600, 400))]
    return {"host": {"cpus": 2}, "cpus": {"server": [0], "clients": [1]}, "interleaved": True,
            "servers_ramp": {"1 +client-throttle": {
                "workers": 1, "flags": "", "client_throttle": True, "steps": steps,
                "peak_goodput_rps": 1300, "peak_at_rps": 1500,
                "goodput_at_2x_share_of_peak": 0.923}}}


def test_the_report_shows_where_the_load_went_at_the_peak_and_at_twice_its_rate() -> None:
    text = throughput_section([], [_run(with_server=True)])
    assert "Where the load went" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1, throttled")]
    # The peak's step and the 2x step; per second over the 5 s step: sent = (answered + errors)/5,
    # kept back 500/5, answered 6,600/5, refused 250/5, unread 150/5, late 10/5.
    assert rows == [
        "| 1, throttled (`AdaptiveClient`'s default) | 1500 | 1,500 | 100 | 1,320 | 50 | 30 | 2 "
        "| 0.97 | 1,300 |",
        "| 1, throttled (`AdaptiveClient`'s default) | 3000 | 1,400 | 100 | 1,220 | 120 | 80 | 2 "
        "| 0.97 | 1,200 |"]


def test_a_run_from_before_the_server_side_was_recorded_has_no_such_table() -> None:
    text = throughput_section([], [_run(with_server=False)])
    assert "Goodput past saturation" in text
    assert "Where the load went" not in text
