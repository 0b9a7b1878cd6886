"""bench/policies.py's pure parts: which statics are pinned, how runs become per-load medians, the
best static in hindsight, and the issue's targets evaluated on a small synthetic summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from bench.policies import (
    ADAPTIVE,
    aggregate_steady,
    aggregate_varying,
    best_static,
    correct_in_budget,
    evaluate_targets,
    pareto_statics,
    parse_phases,
    rotated,
    spread,
)
from client.loadgen import DROPPED, OK, Record


@dataclass(frozen=True)
class Cand:
    name: str
    accuracy: float
    predicted_p50_ms: float


TABLE = [Cand("full", 0.985, 25.0), Cand("low-rank", 0.987, 10.0), Cand("fast", 0.975, 2.0),
         Cand("ee@0", 0.97, 1.0), Cand("slow-bad", 0.96, 30.0), Cand("mid", 0.98, 5.0),
         Cand("mid2", 0.979, 6.0)]


def test_pareto_front_keeps_full_and_the_fastest() -> None:
    # ee@0 (fastest) < fast < mid < low-rank on the front; mid2 is slower and less accurate than
    # mid, slow-bad dominated; full is dominated by low-rank but always kept.
    assert pareto_statics(TABLE, cap=10) == ["ee@0", "fast", "mid", "low-rank", "full"]


def test_pareto_cap_drops_middle_ones_evenly() -> None:
    three = pareto_statics(TABLE, cap=3)
    assert three == ["ee@0", "low-rank", "full"]  # fastest, most accurate, full
    four = pareto_statics(TABLE, cap=4)
    assert len(four) == 4 and four[0] == "ee@0" and {"low-rank", "full"} <= set(four)
    assert pareto_statics([Cand("full", 0.9, 1.0)]) == ["full"]
    assert pareto_statics([]) == []


def test_correct_in_budget_counts_samples_of_met_answers() -> None:
    recs = [Record(0, 10.0, OK, "a", 5.0, 30, 32),  # met
            Record(0, 10.0, OK, "a", 15.0, 32, 32),  # late
            Record(0, 10.0, "DEADLINE_EXCEEDED", None, 10.0, None, 32),
            Record(0, 10.0, DROPPED, None, 0.0, None, 32),
            Record(0, None, OK, "a", 99.0, 20, 32)]  # no budget: met
    assert correct_in_budget(recs) == 50


def test_spread_ignores_none() -> None:
    assert spread([0.9, None, 0.7, 0.8]) == {"median": 0.8, "min": 0.7, "max": 0.9}
    assert spread([None]) == {"median": None, "min": None, "max": None}


def _run(policy: str, load: float, rep: int, attainment: float, accuracy: float | None,
         goodput: float, cib: int, cand: str = "x") -> dict[str, Any]:
    return {"policy": policy, "load": load, "repeat": rep, "offered": 100, "answered": 90 + rep,
            "attainment": attainment, "accuracy": accuracy, "goodput_rps": goodput,
            "correct_in_budget": cib, "latency_ms": {"p99": 10.0 + rep},
            "send_lag_ms": {"p99": 1.0}, "errors_by_code": {"DEADLINE_EXCEEDED": rep},
            "client_dropped": 0, "answers": {cand: 10}, "shed": 2 * rep,
            "server_before": {"safety_factor": 0.5 + rep}}


POLICIES = [ADAPTIVE, "pinned fast", "pinned full"]
# (attainment, accuracy, goodput) per policy and load; three repeats jitter around them.
POINTS = {
    0.5: {ADAPTIVE: (0.99, 0.984, 20.0), "pinned fast": (1.0, 0.970, 20.0),
          "pinned full": (0.97, 0.985, 19.0)},
    2.0: {ADAPTIVE: (0.985, 0.982, 80.0), "pinned fast": (1.0, 0.971, 80.0),
          "pinned full": (0.10, 0.985, 8.0)},
    8.0: {ADAPTIVE: (0.97, 0.975, 290.0), "pinned fast": (0.99, 0.972, 300.0),
          "pinned full": (0.01, 0.98, 1.0)},
}


def _summary() -> dict[str, Any]:
    runs = []
    for load, by in POINTS.items():
        for p, (att, acc, good) in by.items():
            for rep, d in enumerate((0.0, -0.005, 0.004)):
                runs.append(_run(p, load, rep, min(att + d, 1.0), acc, good * (1 + d),
                                 int(good * 5 * 32 * acc), cand=p))
    steady = aggregate_steady(runs, POLICIES)
    reported = {"pinned fast": 0.975, "pinned full": 0.985}
    varying_runs = [{**_run(p, 0.0, rep, 0.9, 0.98, 50.0, cib), "phases": [
        _run(p, 0.5, rep, 0.99, 0.98, 20.0, cib // 2), _run(p, 4.0, rep, 0.8, 0.97, 80.0, cib // 2)]}
        for rep in range(3) for p, cib in ((ADAPTIVE, 1000 + rep), ("pinned fast", 990),
                                           ("pinned full", 300))]
    return {"calibration": {"fastest": "fast"}, "steady": steady,
            "best_static": best_static(steady, reported),
            "varying": {"by_policy": aggregate_varying(varying_runs, POLICIES)}}


def test_aggregate_steady_medians_and_spreads() -> None:
    s = _summary()
    row = next(r for r in s["steady"] if r["load"] == 2.0 and r["policy"] == ADAPTIVE)
    assert row["repeats"] == 3
    assert row["attainment"]["median"] == pytest.approx(0.985)
    assert row["attainment"]["min"] == pytest.approx(0.98)
    assert row["attainment"]["max"] == pytest.approx(0.989)
    assert row["errors"] == {"DEADLINE_EXCEEDED": 3}
    assert row["shed"] == {"median": 2.0, "min": 0.0, "max": 4.0}
    assert row["failed"] == {"median": 9.0, "min": 8.0, "max": 10.0}
    assert row["factor_before"]["median"] == 1.5
    assert row["most_used"] == (ADAPTIVE, 1.0)
    assert [r["load"] for r in s["steady"]] == [0.5] * 3 + [2.0] * 3 + [8.0] * 3


def test_best_static_in_hindsight() -> None:
    best = {b["load"]: b["policy"] for b in _summary()["best_static"]}
    # full reaches 95% only at 0.5x; the fastest everywhere.
    assert best == {0.5: "pinned full", 2.0: "pinned fast", 8.0: "pinned fast"}
    steady = aggregate_steady([_run("pinned full", 1.0, 0, 0.5, 0.98, 1.0, 1)], ["pinned full"])
    assert best_static(steady, {"pinned full": 0.98}) == [{"load": 1.0, "policy": None}]


def test_targets_pass_and_fail_with_measured_values() -> None:
    s = _summary()
    t = evaluate_targets(s)
    rows = {r["id"]: r for r in t["rows"]}
    assert rows["in_budget_0.5x"]["passed"] is True
    assert rows["in_budget_2x"]["passed"] is True
    assert "8x" not in " ".join(k for k in rows if k.startswith("in_budget_") and "vs" not in k)
    assert rows["accuracy_vs_fastest_0.5x"]["passed"] is True  # +1.4 pt
    assert rows["accuracy_vs_fastest_2x"]["passed"] is True  # +1.1 pt
    assert rows["in_budget_vs_fastest_8x"]["passed"] is False  # −2 pt
    assert rows["in_budget_vs_fastest_8x"]["values"]["gap"] == pytest.approx(-0.02)
    # 0.5x: best static is full (98.5%), adaptive 98.4%: −0.1 pt, within 0.3 pt.
    assert rows["accuracy_vs_best_static_0.5x"]["passed"] is True
    assert rows["accuracy_vs_best_static_2x"]["passed"] is True  # adaptive above the fastest
    assert rows["goodput_8x"]["passed"] is True  # its own peak
    assert rows["goodput_8x"]["values"]["peak_load"] == 8.0
    assert rows["varying_correct_in_budget"]["passed"] is True
    assert rows["varying_correct_in_budget"]["values"]["best_other"] == "pinned fast"
    assert t["passed"] + t["failed"] + t["not_evaluated"] == len(t["rows"])
    assert t["failed"] == 1 and t["not_evaluated"] == 0


def test_targets_fail_and_not_evaluated() -> None:
    s = _summary()
    for row in s["steady"]:
        if row["policy"] == ADAPTIVE and row["load"] == 8.0:
            row["goodput_rps"] = spread([50.0])  # collapsed under overload
        if row["policy"] == ADAPTIVE and row["load"] == 0.5:
            row["accuracy"] = spread([0.978])  # below full by 0.7 pt, above fast by only 0.8
    s["best_static"][1] = {"load": 2.0, "policy": None}
    for row in s["varying"]["by_policy"]:
        if row["policy"] == "pinned fast":
            row["correct_in_budget"] = spread([2000])
    rows = {r["id"]: r for r in evaluate_targets(s)["rows"]}
    assert rows["goodput_8x"]["passed"] is False
    assert rows["goodput_8x"]["values"]["peak_load"] == 2.0
    assert rows["accuracy_vs_best_static_0.5x"]["passed"] is False
    assert rows["accuracy_vs_fastest_0.5x"]["passed"] is False
    assert rows["accuracy_vs_best_static_2x"]["passed"] is None
    assert rows["varying_correct_in_budget"]["passed"] is False


def test_varying_per_phase_aggregate() -> None:
    by = {r["policy"]: r for r in _summary()["varying"]["by_policy"]}
    assert by[ADAPTIVE]["correct_in_budget"]["median"] == 1001
    assert [ph["attainment"]["median"] for ph in by[ADAPTIVE]["phases"]] == [0.99, 0.8]


def test_phases_and_rotation() -> None:
    assert parse_phases("0.5:4,8:1") == [(0.5, 4.0), (8.0, 1.0)]
    with pytest.raises(ValueError, match="LOAD:SECONDS"):
        parse_phases("fast")
    with pytest.raises(ValueError, match="positive"):
        parse_phases("0:4")
    assert rotated(["a", "b", "c"], 4) == ["b", "c", "a"]
