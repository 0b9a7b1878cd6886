"""bench/report.py's GPU section: the issue's targets evaluated on a small bench/gpu.py JSON, the
table rendered from them, and the honest wording when there is no GPU run or only a CPU one."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from bench.report import gpu_section, gpu_targets


def gpu_run() -> dict[str, Any]:
    """A GPU run as bench/gpu.py writes it, trimmed to what the report reads."""
    return {
        "schema": 1, "command": "python3 bench/gpu.py --family families/mnist5k",
        "started": "2026-11-20 10:00 UTC", "seconds_total": 300.0, "quick": False,
        "accelerator": "cuda", "served_dtype": "fp32", "family": {"name": "mnist5k"},
        "host": {"cpus": 16, "machine": "x86_64", "system": "Linux 6.18", "python": "3.12.3",
                 "load_average": [0.5, 0.4, 0.3],
                 "nvidia_smi": {"gpus": [{"name": "NVIDIA H200", "driver_version": "580.159.04",
                                          "memory.total": "143771 MiB"}]},
                 "torch": {"version": "2.11.0", "cuda": "13.0", "cuda_available": True},
                 "onnxruntime": {"version": "1.30.0", "providers": ["CPUExecutionProvider"]}},
        "bare": {"variant": "full", "device": "cuda", "mode": "cuda-graph replay",
                 "macs": 29_000_000, "anchor_ms": {"1": 0.090, "32": 0.186, "256": 0.83},
                 "eager_b1_fp32": {"ms_p50": 0.43},
                 "fp32": {"graph": {"1": {"ms_p50": 0.1, "images_per_s": 10_000.0},
                                    "256": {"ms_p50": 0.8, "images_per_s": 320_000.0}},
                          "runner": {"1": {"ms_p50": 0.15, "images_per_s": 6_666.0}}}},
        "echo": {"p50_ms": 0.2, "p99_ms": 0.4, "requests": 3000},
        "served": {"lane": "cuda:full",
                   "latency_b1": {"pinned": "cuda:full", "answered_by": "cuda:full",
                                  "p50_ms": 0.75, "p99_ms": 1.2, "requests": 3000,
                                  "echo_paired_p50_ms": 0.21},
                   "throughput": [
                       {"workers": 1, "images": 256, "images_per_s": 90_000.0,
                        "requests_per_s": 351.6, "processes": 6, "in_flight": 24, "errors": {}},
                       {"workers": 4, "images": 256, "images_per_s": 170_000.0,
                        "requests_per_s": 664.1, "processes": 6, "in_flight": 24, "errors": {},
                        "gpu": {"util_mean_pct": 61.0, "util_max_pct": 80.0}},
                       {"workers": 4, "images": 32, "images_per_s": 400_000.0,
                        "requests_per_s": 12_500.0, "processes": 6, "in_flight": 24,
                        "errors": {}}]},
        "placement": {"images": 8, "budget": "uniform:5:20", "rate_rps": 800.0,
                      "rate_rule": "the first rate of the ramp ...",
                      "reference_capacity": {"requests_per_s": 100.0},
                      "ramp": [{"rate_rps": 100.0, "attainment": 0.99},
                               {"rate_rps": 200.0, "attainment": 0.9},
                               {"rate_rps": 400.0, "attainment": 0.85},
                               {"rate_rps": 800.0, "attainment": 0.6}],
                      "runs": {"cpu": {"offered_rps": 800.0, "attainment": 0.55, "answered": 4400,
                                       "offered": 8000, "accuracy": 0.97,
                                       "latency_ms": {"p50": 6.0, "p99": 19.0},
                                       "errors_by_code": {"DEADLINE_EXCEEDED": 3600},
                                       "devices": {"share": {"cpu": 1.0}}},
                               "auto": {"offered_rps": 800.0, "attainment": 0.991,
                                        "answered": 7950, "offered": 8000, "accuracy": 0.985,
                                        "latency_ms": {"p50": 1.0, "p99": 4.0},
                                        "errors_by_code": {},
                                        "devices": {"share": {"cuda": 0.7, "cpu": 0.3}}}}},
        "phases": {"host": {"status": "ok"}, "bare": {"status": "ok"}},
    }


def test_targets_on_a_gpu_run() -> None:
    rows = gpu_targets(gpu_run())
    assert len(rows) == 4
    tput, latency, placement, both = rows
    # the best served figure at 256/request (workers 4) against half of bare's 320k
    assert tput["passed"] is True
    assert "160,000 images/s" in tput["wanted"] and "170,000 images/s" in tput["measured"]
    assert "`--workers 4`" in tput["measured"] and "53% of bare" in tput["measured"]
    # limit = paired echo 0.21 + graph 0.1 + 0.5 = 0.81 ms; 0.75 is inside it
    assert latency["passed"] is True and "0.810 ms" in latency["wanted"]
    assert placement["passed"] is True and "auto 99.1%, cpu 55.0%" in placement["measured"]
    assert both["passed"] is True and "GPU 70.0%, CPU 30.0%" in both["measured"]


def test_targets_fail_when_the_figures_miss() -> None:
    data = gpu_run()
    data["served"]["throughput"][1]["images_per_s"] = 150_000.0  # < 160k: half of bare
    data["served"]["latency_b1"]["p50_ms"] = 0.9  # > 0.81
    data["placement"]["runs"]["auto"]["attainment"] = 0.97
    data["placement"]["runs"]["auto"]["devices"]["share"] = {"cpu": 1.0}
    assert [r["passed"] for r in gpu_targets(data)] == [False, False, False, False]


def test_latency_answered_on_the_cpu_is_not_the_gpu_lane() -> None:
    data = gpu_run()
    data["served"]["latency_b1"]["answered_by"] = "full"
    assert gpu_targets(data)[1]["passed"] is False


def test_unsaturated_cpu_makes_the_placement_target_inconclusive() -> None:
    data = gpu_run()
    data["placement"]["runs"]["cpu"]["attainment"] = 0.9
    row = gpu_targets(data)[2]
    assert row["passed"] is None and "not saturated" in row["measured"]


def test_missing_phases_are_not_measured() -> None:
    data = gpu_run()
    for key in ("served", "placement", "echo"):
        del data[key]
    rows = gpu_targets(data)
    assert [r["passed"] for r in rows] == [None] * 4
    assert all(r["measured"] == "not measured" for r in rows)
    assert "Phases that did not finish" not in gpu_section(data)  # none recorded as failed
    data["phases"]["placement"] = {"status": "error", "error": "Unavailable: serve exited (2)"}
    assert "`placement` error: Unavailable: serve exited (2)" in gpu_section(data)


def test_section_renders_the_targets_table_and_the_machine() -> None:
    text = gpu_section(gpu_run())
    assert text.startswith("## GPU serving\n\nMeasured on a GPU.")
    assert "python3 bench/gpu.py --family families/mnist5k" in text
    assert "NVIDIA H200 (driver 580.159.04, 143771 MiB); 16 cores" in text
    assert ("| Served throughput of `full`, 256 images per request | ≥ 50% of bare fp32 batch 256 "
            "(320,000) = 160,000 images/s | 170,000 images/s (`--workers 4`, 53% of bare) | yes |"
            ) in text
    assert "| fp32 | 256 | 0.8000 | 320,000 | 0.830 | - | - |" in text
    assert "| `--device auto` | 800 | 99.1% | 7950/8000 | 98.50% | 1.00 / 4.00 | 70.0% | 30.0% |" in text
    assert "| 4 | 256 | 170,000 | 664 | 6 x 4 | none | 61% / 80% |" in text
    assert "100/s 99.0%, 200/s 90.0%, 400/s 85.0%, 800/s 60.0%." in text


@pytest.mark.parametrize("change, why", [
    ({"quick": True}, "a `--quick` run"),
    ({"accelerator": "cpu"}, "`--accelerator cpu`"),
])
def test_a_cpu_run_is_labelled_and_evaluates_nothing(change: dict[str, Any], why: str) -> None:
    data = copy.deepcopy(gpu_run())
    data.update(change)
    assert [r["passed"] for r in gpu_targets(data)] == [None] * 4
    text = gpu_section(data)
    assert "**Not measured on a GPU**" in text and why in text
    assert "| yes |" not in text and "| **no** |" not in text


def test_no_json_says_no_gpu() -> None:
    text = gpu_section(None, "results/bench/gpu.json")
    assert "Not measured: no GPU in this run" in text and "results/bench/gpu.json" in text


def test_placement_rows_show_the_router_state_a_run_ended_with() -> None:
    """The router's margins at the end of a placement run, or '-' for a run that has none."""
    data = gpu_run()
    data["placement"]["runs"]["auto"]["router"] = {
        "safety_factor": 10.52, "margin_seconds": 0.00976, "shed": 187.0, "misses": {}}
    section = gpu_section(data)
    auto = next(line for line in section.splitlines() if line.startswith("| `--device auto` |"))
    cpu = next(line for line in section.splitlines() if line.startswith("| `--device cpu` |"))
    assert auto.endswith("| x10.5, +9.8 ms, shed 187 |"), auto
    assert cpu.endswith("| - |"), cpu
