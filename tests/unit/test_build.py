"""`adaptive-inference build`: config validation, an end-to-end build, caching and determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compression import data as datasets
from compression import export, report
from compression.build import build, load_config
from compression.core.errors import ConfigError
from compression.core.family import load_family
from compression.core.ort import session

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "configs" / "quick.toml"


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(QUICK.read_text() + "\n" + text)
    return path


def test_shipped_configs_parse() -> None:
    for path in (ROOT / "configs").glob("*.toml"):
        cfg = load_config(path)
        assert cfg.family and cfg.arch["kind"] in ("cnn", "mlp")


@pytest.mark.parametrize("extra, fragment", [
    ("[[variants]]\nname = 'x'\nmethod = 'magic'\n", "unknown method 'magic'; valid methods:"),
    ("[[variants]]\nname = 'x'\nmethod = 'magic'\nbase = 'nope'\n", "base 'nope' must name an earlier"),
    ("[extra]\nkey = 1\n", "unknown key(s) ['extra']"),
    ("[[variants]]\nname = 'full'\nmethod = 'x'\n", "name 'full' must be a unique"),
])
def test_config_errors_list_the_valid_choices(tmp_path: Path, extra: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, extra))
    assert fragment in str(err.value)


@pytest.mark.parametrize("base, fragment", [
    ('model = "tests.fixtures_models:resnet"\n[base.arch]\nkind = "cnn"\n',
     "[base]: model 'tests.fixtures_models:resnet' (your network) and [base.arch] (a built-in "
     "one) exclude each other"),
    ('model_args = { width = 4 }\n', "[base]: model_args {'width': 4} needs model ="),
    ('model = "resnet"\n', "[base] model must be 'package.module:factory', got 'resnet'"),
    ('model = "tests.fixtures_models:nope"\n', "has no attribute 'nope'"),
    ('model = "tests.fixtures_models:resnet"\nmodel_args = 3\n',
     "[base]: model_args must be a table, got 3"),
])
def test_base_model_errors_name_the_key_and_value(tmp_path: Path, base: str,
                                                  fragment: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[base]\n{base}")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert fragment in str(err.value)


def test_base_model_config_names_the_factory(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[base]\nmodel = "tests.fixtures_models:resnet"\n'
                    'model_args = { num_classes = 3 }\n')
    cfg = load_config(path)
    assert cfg.arch == {"kind": "user", "factory": "tests.fixtures_models:resnet",
                        "args": {"num_classes": 3}}
    assert cfg.as_json()["arch"]["factory"] == "tests.fixtures_models:resnet"


def test_unknown_training_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(QUICK.read_text().replace("patience = 2", "patience = 2\nmomentum = 0.9"))
    with pytest.raises(ConfigError, match=r"\[base.train\]: unknown key\(s\) \['momentum'\]"):
        load_config(path)


@pytest.mark.slow
def test_quick_build_end_to_end(quick_family: Path) -> None:
    fam = load_family(quick_family)
    manifest = fam.manifest
    assert manifest["input"] == {**manifest["input"], "datatype": "FP32", "shape": [1, 28, 28]}
    assert len(manifest["input"]["normalization"]["mean"]) == 1
    assert manifest["output"]["classes"] == [str(i) for i in range(10)]
    assert (quick_family / "report.md").read_text().startswith("# Family `quick`")
    assert (quick_family / "pareto.png").stat().st_size > 1000
    # the quick CNN learns something real in seconds
    assert fam.variant("full").accuracy > 0.85


@pytest.mark.slow
def test_rebuild_reuses_the_cached_base_and_is_deterministic(
        quick_family: Path, build_cache: Path, tmp_path: Path) -> None:
    before = sorted(build_cache.glob("base-*.safetensors"))
    assert before  # quick_family trained and cached its base (other tests may cache theirs)
    out = build(load_config(QUICK), tmp_path / "again", cache_dir=build_cache, progress=False)
    assert sorted(build_cache.glob("base-*.safetensors")) == before  # nothing retrained
    a = json.loads((quick_family / "manifest.json").read_text())["variants"]
    b = json.loads((out / "manifest.json").read_text())["variants"]
    assert [v["accuracy"] for v in a] == [v["accuracy"] for v in b]
    assert [v["val_accuracy"] for v in a] == [v["val_accuracy"] for v in b]
    assert [v["artifacts"][0]["sha256"] for v in a] == [v["artifacts"][0]["sha256"] for v in b]


@pytest.mark.slow
def test_every_variant_records_its_validation_accuracy(quick_family: Path) -> None:
    """val_accuracy: the served graph on the build's validation split (accuracy: on test)."""
    fam = load_family(quick_family)
    cfg = fam.manifest["build"]["config"]
    splits = datasets.split(datasets.load(cfg["data_spec"]), seed=cfg["seed"],
                            val_fraction=cfg["val_fraction"], test_fraction=cfg["test_fraction"])
    for name, v in fam.variants.items():
        assert v.val_accuracy is not None and 0.0 <= v.val_accuracy <= 1.0, name
        if v.exits:
            continue  # the early-exit policy: tests/unit/test_compression_ii.py
        sess = session(fam.graph(name))
        for x, y, recorded in ((splits.x_val, splits.y_val, v.val_accuracy),
                               (splits.x_test, splits.y_test, v.accuracy)):
            assert recorded == round(float((export.run(sess, x).argmax(1) == y).mean()), 6), name
    rows = report.table(list(fam.variants.values())).splitlines()
    assert rows[0].split()[:5] == ["variant", "method", "accuracy", "Δ", "vs"]
    assert "val" in rows[0].split()
    full = fam.variant("full")
    assert full.val_accuracy is not None and f"{100 * full.val_accuracy:.2f}%" in rows[2]


def test_cli_reports_bad_input_without_traceback(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "")
    proc = subprocess.run(
        [sys.executable, "-m", "client.cli", "build", str(cfg), "--out", str(tmp_path / "o"),
         "--data", f"npz:{tmp_path / 'missing.npz'}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "missing.npz: file not found" in proc.stderr
    assert "Traceback" not in proc.stderr
