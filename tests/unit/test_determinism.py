"""Same machine, same config, same seed, empty caches → the same family, variant by variant.

Two builds of a small config that trains the base and three variants (channel pruning with
fine-tuning, a distilled student, the early-exit heads) plus an int8 copy, each in its own
process with its own empty base-model cache and a different ``PYTHONHASHSEED`` (so set and dict
orders of strings may differ), must agree on every accuracy, on which test images each variant
and each early exit gets right, and on every artifact's bytes.

Both builds pin torch to 2 intra-op threads: parallel CPU kernels are then exercised, and the
reduction order is the same in both (a different thread count changes the last bits of trained
weights, so the manifest records ``build.host.torch_threads``; set ``OMP_NUM_THREADS`` to it to
rebuild elsewhere, on a CPU with the same kernels).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compression import data as datasets
from compression.core.stats import decode_bits
from tests.build_configs import SMALL_CNN, config_toml, variant

ROOT = Path(__file__).resolve().parents[2]


def det_config(npz: Path) -> str:
    return config_toml(
        family="det", seed=3,
        max_drop=100,  # one try per variant: this test is about repeatability, not the search
        data=f"npz:{npz}",
        arch=SMALL_CNN,
        train={"epochs": 3, "lr": 1e-2, "batch_size": 64,
               "augment_shift": 1,  # the augmentation draws from the seeded generator too
               "patience": 2},
        variants=[
            variant("pruned-neurons", ratio=0.5, steps=1, epochs_per_step=1, final_epochs=0),
            variant("distilled", epochs=1, compare_labels=False,
                    student={"stages": [{"channels": 4, "depth": 1},
                                        {"channels": 8, "depth": 1, "pool": True}]}),
            variant("early-exit", frozen_epochs=1, joint_epochs=1),
            variant("int8", base="pruned-neurons", calibration_images=64),
        ])


def _build(config: Path, out: Path, cache: Path, hash_seed: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "2",
           "ADAPTIVE_CACHE": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-m", "client.cli", "build", str(config), "--out", str(out),
         "--cache-dir", str(cache), "--no-progress", "-q"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    return manifest


def _fingerprint(v: dict[str, Any]) -> dict[str, Any]:
    """Everything about a variant that training and measuring accuracy decide."""
    return {"accuracy": v["accuracy"], "val_accuracy": v.get("val_accuracy"),
            "test_correct": v["test_correct"],
            "artifacts": {a["path"]: a["sha256"] for a in v["artifacts"]},
            "exits": [{k: e.get(k) for k in ("accuracy", "val_accuracy", "policy_accuracy",
                                             "policy_val_accuracy", "threshold", "test_correct")}
                      for e in v.get("exits") or []]}


@pytest.mark.slow
def test_two_builds_from_empty_caches_agree_on_every_variant(tmp_path: Path) -> None:
    # 900 real digits, a seeded sample across all ten classes: accuracies well below 100 %, so
    # a difference in training would show in which images are right
    ds = datasets.load("mnist5k")
    idx = np.sort(np.random.default_rng(0).choice(len(ds.y), 900, replace=False))
    npz = tmp_path / "digits.npz"
    np.savez(npz, x=ds.x[idx], y=ds.y[idx])
    config = tmp_path / "det.toml"
    config.write_text(det_config(npz))

    runs = [_build(config, tmp_path / f"family-{i}", tmp_path / f"cache-{i}", hash_seed)
            for i, hash_seed in enumerate(("1", "2"))]
    for i in range(2):  # each build trained its own base: nothing came from a shared cache
        assert len(list((tmp_path / f"cache-{i}").glob("base-*.safetensors"))) == 1

    a, b = ({v["name"]: v for v in m["variants"]} for m in runs)
    assert list(a) == ["full", "pruned-neurons", "distilled", "early-exit", "int8"]
    assert list(b) == list(a)
    for name in a:
        assert _fingerprint(a[name]) == _fingerprint(b[name]), name
        # the bits are the accuracy's own images: the same split, the same count
        bits = decode_bits(a[name]["test_correct"])
        assert bits.size == runs[0]["dataset"]["splits"]["test"]
        assert round(float(bits.mean()), 6) == a[name]["accuracy"], name
    # a test that can fail: the variants really differ from one another
    assert len({v["test_correct"]["bits"] for v in a.values()}) >= 4
    assert 0.3 < a["full"]["accuracy"] < 0.99
