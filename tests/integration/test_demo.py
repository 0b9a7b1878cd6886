"""The demo's machinery on the test family: calibration, the same ramp at an adaptive and a
pinned server, the comparison table, the closing sentence and the plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.demo import DemoResult, mix, run_demo
from client.loadgen import Phase, Record, choose_images
from client.results import compare_policies, in_budget_share, judged_accuracy
from compression.core.family import load_family


def test_demo_compares_adaptive_with_pinned_on_the_same_ramp(serving_family: Path,
                                                             tmp_path: Path) -> None:
    family = load_family(serving_family)
    # the test family has no `full`: pin its most accurate plain variant, one image per request
    result = run_demo(serving_family, Path("unused.toml"), family=family, loads=[0.5, 2.0],
                      seconds=0.8, reference="slow", images=1, out_dir=tmp_path)
    assert result.policies == ["adaptive", "pinned slow"]
    a, p = (result.records[k] for k in result.policies)
    assert [(r.phase, r.budget_ms) for r in a] != []
    # the same arrivals and budgets at both (records are in completion order)
    assert sorted((r.phase, r.budget_ms) for r in a) == sorted((r.phase, r.budget_ms) for r in p)
    assert {r.candidate for r in p if r.status == "OK"} <= {"slow"}
    cal = result.calibration
    assert cal.images == 1 and cal.capacity_rps > 0
    assert cal.budget.uniform == (pytest.approx(cal.idle_p99_ms, abs=1e-3),
                                  pytest.approx(2 * cal.idle_p99_ms, abs=2e-3))
    report = result.report()
    assert "in budget" in report and "pinned slow" in report and "answered by" in report
    assert report.count("\n0.5x ") == 1 and report.count("\n2x ") == 1
    assert result.summary().startswith("At 2x slow's capacity")
    assert result.plot is not None and result.plot.stat().st_size > 10_000
    assert f"plot: {result.plot}" in report


def test_comparison_table_and_sentence() -> None:
    recs = {"adaptive": [Record(0, 5.0, "OK", "fast", 1.0, 1, 2),
                         Record(0, 5.0, "OK", "slow", 9.0, 2, 2),
                         Record(1, 5.0, "OK", "fast", 2.0, 2, 2),
                         Record(1, 5.0, "DEADLINE_EXCEEDED", None, 0.1, None, 2)],
            "pinned slow": [Record(0, 5.0, "OK", "slow", 4.0, 2, 2),
                            Record(0, 5.0, "OK", "slow", 6.0, 2, 2),
                            Record(1, 5.0, "DEADLINE_EXCEEDED", None, 0.1, None, 2),
                            Record(1, 5.0, "DEADLINE_EXCEEDED", None, 0.1, None, 2)]}
    phases = [Phase(10, 1), Phase(40, 1)]
    text = compare_policies(recs, phases, [0.5, 2.0])
    rows = [line.split() for line in text.splitlines()[2:6]]
    assert rows[0][:6] == ["0.5x", "10/s", "adaptive", "2", "50.0%", "75.00%"]
    assert rows[1][:5] == ["pinned", "slow", "2", "50.0%", "100.00%"]
    assert rows[2][:6] == ["2x", "40/s", "adaptive", "2", "50.0%", "100.00%"]
    assert rows[3][:7] == ["pinned", "slow", "2", "0.0%", "-", "0", "100.0%"]
    assert "pinned slow: DEADLINE_EXCEEDED 2" in text
    assert in_budget_share(recs["adaptive"]) == 0.5
    assert judged_accuracy(recs["adaptive"]) == pytest.approx(5 / 6)
    assert mix(recs["adaptive"][2:]) == {"fast": 0.5, "DEADLINE_EXCEEDED": 0.5}
    from client.demo import Calibration
    from client.loadgen import BudgetSpec

    result = DemoResult("f", ["fast", "slow"], "slow",
                        Calibration(2, 1.0, 5.0, 20.0, BudgetSpec.parse("uniform:5:10")),
                        [0.5, 2.0], phases, recs, {}, 1.0)
    assert result.summary() == ("At 2x slow's capacity (40 requests/s) the adaptive server "
                                "answered 50 % in budget at 100.0 % accuracy; pinned slow 0 %.")


def test_images_per_request_reach_the_compute_floor() -> None:
    assert choose_images(lambda b: 0.05 * b, (8, 16, 32, 64), 2.0) == 64
    assert choose_images(lambda b: 0.5 * b, (8, 16, 32, 64), 2.0) == 8
    assert choose_images(lambda b: 0.001 * b, (8, 16), 2.0) == 16
