"""A stock KServe v2 client (tritonclient, unmodified) against our server."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from compression.core.family import load_family
from tests.harness import RunningServer

PROBE = Path(__file__).with_name("kserve_probe.py")


def test_tritonclient_talks_to_the_server_unmodified(server: RunningServer,
                                                     serving_family: Path) -> None:
    if importlib.util.find_spec("tritonclient") is None:  # not imported here: see below
        pytest.skip("tritonclient[grpc] (dev extra) is not installed")
    # Its own interpreter: tritonclient and our generated code both define `inference.*` protos.
    proc = subprocess.run([sys.executable, str(PROBE), server.target, "servetest"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["unknown_model_ready"] is False
    assert out["server"] == "adaptive-inference"
    meta = out["metadata"]
    assert meta["name"] == "servetest" and {"fast", "mid", "slow"} <= set(meta["versions"])
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "1", "28", "28"]}]
    assert meta["outputs"][0]["name"] == "logits"
    infer = out["infer"]
    assert infer["shape"] == [3, 10] and infer["finite"]
    assert infer["variant"] == infer["model_version"] == "slow"  # 500 ms fits the best variant
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)  # what the probe sent
    sess = ort.InferenceSession(load_family(serving_family).graph("slow").SerializeToString(),
                                providers=["CPUExecutionProvider"])
    assert infer["sum"] == pytest.approx(float(sess.run(None, {"input": x})[0].sum()), abs=1e-3)
    assert out["pinned_variant"] == "fast"
    assert out["bad_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "inputs[0].shape [1, 3, 28, 28]" in out["bad_shape"]["message"]
