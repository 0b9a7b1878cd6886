"""The demo's machinery on the test family: a short load of rising rate, then its report."""

from __future__ import annotations

from pathlib import Path

from client.demo import run_demo
from client.loadgen import Phase, Record
from client.results import summarize_phases as summarize
from compression.core.family import load_family


def test_demo_drives_mixed_budgets_and_reports_what_was_used(serving_family: Path) -> None:
    family = load_family(serving_family)
    report = run_demo(serving_family, Path("unused.toml"), family=family,
                      phases=[Phase(50, 0.6), Phase(200, 0.6)], budgets=[0.3, 500.0, None],
                      batch=2)
    assert "offered" in report and "variant/exit" in report and "budget" in report
    assert "slow" in report  # 500 ms and no budget get the most accurate variant
    lines = {line.split()[0]: line for line in report.splitlines() if line.strip()}
    assert lines["500"].split()[-1] == "slow" and lines["none"].split()[-1] == "slow"


def test_summary_counts_budget_attainment_and_accuracy() -> None:
    records = [Record(0, 1.0, "OK", "fast", 0.5, 2, 2), Record(0, 1.0, "OK", "fast", 2.0, 0, 2),
               Record(0, None, "OK", "slow", 9.0, 2, 2),
               Record(0, 1.0, "DEADLINE_EXCEEDED", None, 1.0, None, 2)]
    text = summarize(records, [Phase(10, 1)])
    phase = text.splitlines()[2].split()
    assert phase[:3] == ["10/s", "4", "75.0%"]  # offered, requests, answered
    assert phase[5:7] == ["50.0%", "66.7%"]  # in budget (2 of 4), accuracy (4 of 6 samples)
    assert "errors: DEADLINE_EXCEEDED 1" in text
