"""`adaptive-inference bench` as a real process against a real server: short runs whose
results.json is well formed, whose counts add up, and whose accuracy is measured on the labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from compression.core.family import load_family
from tests.harness import RunningServer

CLI = [sys.executable, "-m", "client.cli", "bench"]


@pytest.fixture(scope="module")
def labelled_npz(serving_family: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Test images labelled with the `slow` variant's own predictions: pinned to `slow`, the
    bench must measure 100% accuracy (wrong images or labels would not)."""
    rng = np.random.default_rng(0)
    x_test = rng.random((64, 1, 28, 28), dtype=np.float32)
    sess = ort.InferenceSession(load_family(serving_family).graph("slow").SerializeToString(),
                                providers=["CPUExecutionProvider"])
    y_test = sess.run(None, {"input": x_test})[0].argmax(1)
    path = tmp_path_factory.mktemp("bench-data") / "labelled.npz"
    np.savez(path, x_train=x_test[:16], y_train=y_test[:16], x_test=x_test, y_test=y_test)
    return path


def _bench(server: RunningServer, out: Path, *args: str, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, "--target", server.target, "--out", str(out), "--quiet", *args],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _check_counts(run: dict[str, Any], images: int) -> None:
    assert run["offered"] == run["sent"] + run["client_dropped"] + run["client_throttled"]
    assert run["sent"] == run["answered"] + run["errors"]
    assert run["errors"] == sum(run["errors_by_code"].values())
    assert 0 <= run["met"] <= run["answered"]
    assert run["attainment"] == pytest.approx(run["met"] / run["offered"], abs=1e-5)
    assert run["throughput_rps"] == pytest.approx(run["answered"] / run["seconds"], abs=1e-3)
    assert run["goodput_rps"] == pytest.approx(run["met"] / run["seconds"], abs=1e-3)
    assert sum(run["answers"].values()) == run["answered"]
    if run["sent"]:
        assert 0 <= run["send_lag_ms"]["p50"] <= run["send_lag_ms"]["p99"] <= run["send_lag_ms"]["max"]
    if run["answered"]:
        assert sum(run["share"].values()) == pytest.approx(1.0, abs=1e-4)
        lat = run["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert run["samples_judged"] == run["answered"] * images
        assert 0.0 <= run["accuracy"] <= 1.0


def test_adaptive_run_writes_results_whose_counts_add_up(server: RunningServer, tmp_path: Path,
                                                         labelled_npz: Path) -> None:
    proc = _bench(server, tmp_path, "--rate", "40,80", "--duration", "2", "--images", "2",
                  "--budget-ms", "2:0.5,20:0.3,none:0.2", "--data", f"npz:{labelled_npz}",
                  "--seed", "1")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["policy"] == "adaptive" and results["model"] == "servetest"
    assert results["data"]["spec"] == f"npz:{labelled_npz}" and results["data"]["images"] == 64
    assert results["images_per_request"] == 2
    assert {v["name"] for v in results["server_variants"]} >= {"fast", "mid", "slow"}
    runs = results["runs"]
    assert [r["offered_rps"] for r in runs] == [40.0, 80.0]
    for run in runs:
        _check_counts(run, images=2)
        # Poisson arrivals at the offered rate (mean rate × 2 s; a wide band: a busy machine)
        assert 0.5 * 2 * run["offered_rps"] <= run["offered"] <= 1.5 * 2 * run["offered_rps"]
        assert sum(b["requests"] for b in run["by_budget"].values()) == run["offered"]
        assert set(run["share"]) <= {"fast", "mid", "slow", "early-exit@0", "early-exit@1",
                                     "early-exit@2"}
    rows = (tmp_path / "requests.csv").read_text().splitlines()
    assert len(rows) == 1 + sum(r["offered"] for r in runs)
    for png in ("latency_cdf.png", "load.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "offered/s" in proc.stdout and "goodput/s" in proc.stdout


def test_pinned_run_measures_accuracy_on_the_labels(server: RunningServer, tmp_path: Path,
                                                    labelled_npz: Path) -> None:
    _bench(server, tmp_path, "--rate", "30", "--duration", "1.5", "--images", "3",
           "--variant", "slow", "--budget-ms", "none", "--data", f"npz:{labelled_npz}",
           "--no-plots")
    results = json.loads((tmp_path / "results.json").read_text())
    (run,) = results["runs"]
    _check_counts(run, images=3)
    assert results["policy"] == "pinned:slow"
    assert run["errors"] == 0 and run["answered"] > 0
    assert run["share"] == {"slow": 1.0}
    assert run["accuracy"] == 1.0
    assert not (tmp_path / "load.png").exists()


def test_errors_are_counted_by_code(server: RunningServer, tmp_path: Path,
                                    labelled_npz: Path) -> None:
    # The gRPC deadline = a 1 ms budget for a ~5 ms variant: calls end DEADLINE_EXCEEDED.
    _bench(server, tmp_path, "--rate", "30", "--duration", "1", "--images", "8", "--variant",
           "slow", "--deadline-is-budget", "--budget-ms", "1", "--data", f"npz:{labelled_npz}",
           "--no-plots")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["deadline_is_budget"] is True
    (run,) = results["runs"]
    _check_counts(run, images=8)
    assert run["errors_by_code"].get("DEADLINE_EXCEEDED", 0) > 0
    assert run["met"] == 0  # nothing arrives within a 1 ms budget through this stack


def test_the_throttle_keeps_back_what_the_server_keeps_refusing(
        server: RunningServer, tmp_path: Path, labelled_npz: Path) -> None:
    """Every call misses its deadline: past the throttle's first 100 outcomes, 80 % of the
    arrivals are kept in the client, counted apart from the errors and named in the summary."""
    proc = _bench(server, tmp_path, "--rate", "400", "--duration", "1", "--images", "8",
                  "--variant", "slow", "--deadline-is-budget", "--budget-ms", "1", "--throttle",
                  "--data", f"npz:{labelled_npz}", "--no-plots")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["client_throttle"] is True
    (run,) = results["runs"]
    _check_counts(run, images=8)
    assert run["client_throttled"] >= (run["offered"] - 100) // 2, run
    assert f"kept back by the client's throttle (not sent): {run['client_throttled']}" in proc.stdout


def test_user_mistakes_exit_2_with_one_line(server: RunningServer, tmp_path: Path) -> None:
    proc = _bench(server, tmp_path, "--rate", "10", "--duration", "1", "--variant", "nope",
                  "--data", "random", check=False)
    assert proc.returncode == 2 and "'nope'" in proc.stderr and "Traceback" not in proc.stderr
    proc = _bench(server, tmp_path, "--rate", "10", "--budget-ms", "uniform:5", check=False)
    assert proc.returncode == 2 and "uniform:A:B" in proc.stderr
