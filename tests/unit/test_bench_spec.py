"""The bench's pure parts: budget specs, rate lists, and how a run's records become figures."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from client.budgets import BudgetSpec, parse_rates
from client.loadgen import DROPPED, Record, RunConfig
from client.results import read_records, summarize_run, write_records_csv


@pytest.mark.parametrize(("text", "values", "weights", "uniform"), [
    ("5", (5.0,), (1.0,), None),
    ("none", (None,), (1.0,), None),
    ("uniform:2:8", (), (), (2.0, 8.0)),
    ("2:0.5,10:0.3,50:0.2", (2.0, 10.0, 50.0), (0.5, 0.3, 0.2), None),
    ("2:1,none:3", (2.0, None), (0.25, 0.75), None),
])
def test_budget_specs_parse(text: str, values: tuple, weights: tuple, uniform: tuple | None
                            ) -> None:
    spec = BudgetSpec.parse(text)
    assert spec.values == values and spec.uniform == uniform
    assert spec.weights == pytest.approx(weights)
    assert str(spec) == text


@pytest.mark.parametrize(("text", "fragment"), [
    ("uniform:5", "uniform:A:B"), ("uniform:8:2", "above"), ("-1", "positive"),
    ("fast", "'fast' is not a number"), ("2:0.5,10", "VALUE:WEIGHT"), ("2:0", "positive"),
    ("inf", "finite"),
])
def test_bad_budget_specs_name_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        BudgetSpec.parse(text)


def test_budget_samples_follow_the_spec() -> None:
    rng = random.Random(0)
    u = [BudgetSpec.parse("uniform:2:8").sample(rng) for _ in range(2000)]
    assert min(u) >= 2 and max(u) <= 8 and 4.7 < sum(u) / len(u) < 5.3  # type: ignore[arg-type]
    mix = [BudgetSpec.parse("2:0.5,10:0.3,none:0.2").sample(rng) for _ in range(5000)]
    assert mix.count(2.0) / 5000 == pytest.approx(0.5, abs=0.03)
    assert mix.count(None) / 5000 == pytest.approx(0.2, abs=0.03)
    assert BudgetSpec.parse("7").sample(rng) == 7.0


def test_rates_parse() -> None:
    assert parse_rates("50") == [50.0]
    assert parse_rates("25,50.5") == [25.0, 50.5]
    for bad in ("0", "a", "", "10,-1"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_summary_counts_add_up_and_errors_are_misses() -> None:
    recs = [
        Record(0, 5.0, "OK", "full", 3.0, 2, 2),  # in budget, both right
        Record(0, 5.0, "OK", "int8", 7.0, 1, 2),  # late
        Record(0, None, "OK", "full", 9.0, 2, 2),  # no budget: met when answered
        Record(0, 5.0, "DEADLINE_EXCEEDED", None, 11.0, None, 2),
        Record(0, 5.0, "RESOURCE_EXHAUSTED", None, 1.0, None, 2),
        Record(0, 5.0, DROPPED, None, 0.0, None, 2),
    ]
    cfg = RunConfig(rate=3.0, seconds=2.0, budget=BudgetSpec.parse("5:0.8,none:0.2"), images=2)
    s = summarize_run(recs, cfg, wall_s=2.1, send_lag_ms=[0.1, 0.2, 0.3, 0.4, 5.0])
    assert (s["offered"], s["sent"], s["answered"], s["errors"], s["client_dropped"]) == \
        (6, 5, 3, 2, 1)
    assert s["errors_by_code"] == {"DEADLINE_EXCEEDED": 1, "RESOURCE_EXHAUSTED": 1}
    assert s["met"] == 2 and s["attainment"] == pytest.approx(2 / 6, abs=1e-5)
    assert s["goodput_rps"] == 1.0 and s["throughput_rps"] == 1.5
    assert s["accuracy"] == pytest.approx(5 / 6, abs=1e-5) and s["samples_judged"] == 6
    assert s["share"] == {"full": pytest.approx(2 / 3, abs=1e-4),
                          "int8": pytest.approx(1 / 3, abs=1e-4)}
    assert s["latency_ms"]["p50"] == 7.0 and s["latency_ms"]["max"] == 9.0
    assert s["send_lag_ms"]["p50"] == 0.3 and s["send_lag_ms"]["max"] == 5.0
    assert s["by_budget"] == {"5": {"requests": 5, "attainment": 0.2},
                              "none": {"requests": 1, "attainment": 1.0}}


def test_budget_choice_is_an_even_mixture() -> None:
    spec = BudgetSpec.choice([1.0, 25.0, None])
    assert spec.values == (1.0, 25.0, None) and spec.weights == pytest.approx((1 / 3,) * 3)
    assert BudgetSpec.choice([250.0]).values == (250.0,)
    assert BudgetSpec.choice([None]).sample(random.Random(0)) is None
    with pytest.raises(ValueError):
        BudgetSpec.choice([])


def test_deadlines_follow_the_config() -> None:
    spec = BudgetSpec.parse("none")
    assert RunConfig(1, 1, spec).deadline(10.0) == pytest.approx(0.07)  # 2 x budget + 50 ms
    assert RunConfig(1, 1, spec).deadline(None) is None
    assert RunConfig(1, 1, spec, no_budget_timeout_s=10.0).deadline(None) == 10.0
    assert RunConfig(1, 1, spec, timeout_s=3.0).deadline(None) == 3.0
    assert RunConfig(1, 1, spec, deadline_is_budget=True).deadline(10.0) == pytest.approx(0.01)


def test_requests_csv_round_trips(tmp_path: Path) -> None:
    recs = [Record(0, 5.0, "OK", "early-exit@1", 3.25, 2, 2),
            Record(1, None, DROPPED, None, 0.0, None, 2)]
    path = write_records_csv(tmp_path / "requests.csv", recs, [10.0, 20.0])
    assert read_records(path) == recs
