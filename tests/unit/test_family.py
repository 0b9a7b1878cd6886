"""The family directory contract: a built family loads; any damage is one FamilyError naming the file."""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from compression import export
from compression.core import encoding
from compression.core.errors import FamilyError
from compression.core.family import (
    SCHEMA_VERSION,
    Exit,
    Family,
    Variant,
    load_family,
    variant_to_json,
    write_artifact,
    write_manifest,
    write_validation,
)
from compression.core.ort import session


@pytest.fixture
def family_copy(quick_family: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "fam"
    shutil.copytree(quick_family, dst)
    return dst


def _graph_file(root: Path) -> Path:
    manifest = json.loads((root / "manifest.json").read_text())
    return root / manifest["variants"][0]["artifacts"][0]["path"]


def test_built_family_loads_and_serves(quick_family: Path) -> None:
    fam = load_family(quick_family)
    assert fam.name == "quick" and "full" in fam.variants
    full = fam.variant("full")
    assert 0.0 < full.accuracy <= 1.0 and full.macs > 0 and full.params_count > 0
    assert set(full.latency_ms) == {"1", "8", "32"}
    assert full.size_bytes == sum(a.bytes for a in full.artifacts)
    logits = export.run(session(fam.graph("full")), np.zeros((3, *fam.input_shape), np.float32))
    assert logits.shape == (3, fam.num_classes)


def test_the_fastest_variant_is_the_lowest_p50_without_early_exits(tmp_path: Path) -> None:
    def variant(name: str, ms: float, exits: list[Exit] | None = None) -> Variant:
        table = {str(b): {"p50": ms * b, "p95": 1.2 * ms * b} for b in (1, 8)}
        return Variant(name=name, method=name, params={}, artifacts=[], accuracy=0.9,
                       params_count=0, macs=0, size_bytes=0, latency_ms=table, exits=exits)

    exits = [Exit(index=0, accuracy=0.9, latency_ms={"1": {"p50": 0.01, "p95": 0.01}},
                  threshold=0.9, exit_share=0.5)]
    variants = [variant("full", 1.0), variant("distilled", 0.2),
                variant("early-exit", 0.05, exits)]  # faster still, but routed by its exits
    fam = Family(tmp_path, "f", {}, {v.name: v for v in variants})
    assert fam.fastest().name == "distilled"
    assert fam.fastest(8).name == "distilled"


def test_tampered_artifact_is_refused(family_copy: Path) -> None:
    path = _graph_file(family_copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.raises(FamilyError, match="sha256 mismatch") as err:
        load_family(family_copy)
    assert path.name in str(err.value)


def test_truncated_artifact_is_refused(family_copy: Path) -> None:
    path = _graph_file(family_copy)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FamilyError, match="truncated") as err:
        load_family(family_copy)
    assert path.name in str(err.value)


def test_missing_artifact_is_refused(family_copy: Path) -> None:
    path = _graph_file(family_copy)
    path.unlink()
    with pytest.raises(FamilyError, match="artifact missing") as err:
        load_family(family_copy)
    assert path.name in str(err.value)


def test_unknown_schema_version_is_refused(family_copy: Path) -> None:
    manifest = json.loads((family_copy / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (family_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FamilyError, match=f"unknown schema_version {SCHEMA_VERSION + 1}"):
        load_family(family_copy)


def test_artifact_path_cannot_escape_the_family(family_copy: Path) -> None:
    manifest = json.loads((family_copy / "manifest.json").read_text())
    manifest["variants"][0]["artifacts"][0]["path"] = "../../etc/passwd"
    (family_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FamilyError, match="escapes the family directory"):
        load_family(family_copy)


def test_not_a_family(tmp_path: Path) -> None:
    with pytest.raises(FamilyError, match=r"manifest\.json: file not found"):
        load_family(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(FamilyError, match="not valid JSON"):
        load_family(tmp_path)


@pytest.mark.parametrize("codec", ["dense", "sparse"])
def test_weight_container_round_trip(codec: str) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0.0
    tensors = {"conv": w, "fc": rng.standard_normal((10, 5)).astype(np.float32)}
    blob = encoding.encode(codec, tensors)
    back = encoding.decode(blob)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
    if codec == "sparse":  # 1 bit per position + the ~10% non-zero values
        assert len(blob) < 0.2 * w.nbytes + tensors["fc"].nbytes + 1024


def test_damaged_container_names_the_source() -> None:
    blob = encoding.encode("sparse", {"w": np.ones((4, 4), np.float32)})
    with pytest.raises(FamilyError, match=r"w\.aiw"):
        encoding.decode(blob[:-8], source="w.aiw")
    with pytest.raises(FamilyError, match="bad magic"):
        encoding.decode(b"PK\x03\x04" + blob[4:], source="w.aiw")


# --- optional manifest fields: older manifests load, newer ones round-trip --------------------

_TABLE = {str(b): {"p50": 0.5 * b, "p95": 0.75 * b} for b in (1, 8, 32)}

# A variant record as manifests were written before val_accuracy and the exits' policy accuracies.
_OLD_EXIT = {"index": 0, "accuracy": 0.9, "latency_ms": _TABLE, "threshold": 0.8,
             "exit_share": 0.6, "criterion": "max_prob"}


def _old_variant(path: str, sha256: str, size: int, *, exits: bool) -> dict[str, object]:
    record: dict[str, object] = {
        "name": "v", "method": "test", "params": {"k": 1},
        "artifacts": [{"path": path, "sha256": sha256, "bytes": size, "role": "graph"}],
        "accuracy": 0.95, "params_count": 10, "macs": 20, "size_bytes": size,
        "latency_ms": _TABLE, "base": None, "details": {}, "build_seconds": 1.0}
    if exits:
        record["exits"] = [_OLD_EXIT, {**_OLD_EXIT, "index": 1, "threshold": 0.0}]
    return record


def _manifest(variants: list[object]) -> dict[str, object]:
    return {"schema_version": SCHEMA_VERSION, "family": "t", "input": {}, "output": {"classes": []},
            "variants": variants}


@pytest.mark.parametrize("exits", [False, True])
def test_manifest_without_the_validation_fields_still_loads(tmp_path: Path, exits: bool) -> None:
    art = write_artifact(tmp_path, "v/model.onnx", b"not parsed by load_family")
    old = _old_variant(art.path, art.sha256, art.bytes, exits=exits)
    (tmp_path / "manifest.json").write_text(json.dumps(_manifest([old])))
    v = load_family(tmp_path).variant("v")
    assert v.val_accuracy is None and v.accuracy == 0.95
    if exits:
        assert v.exits is not None
        assert all(e.val_accuracy is None and e.policy_accuracy is None
                   and e.policy_val_accuracy is None for e in v.exits)
    # and writing it again gives back the old record, key for key (no null fields added)
    assert variant_to_json(v) == old


def test_validation_fields_round_trip_exactly(tmp_path: Path) -> None:
    art = write_artifact(tmp_path, "v/stage_0.onnx", b"stage", role="stage", stage=0)
    exits = [Exit(index=i, accuracy=0.9 + i / 100, latency_ms=_TABLE, threshold=0.8 - i / 10,
                  exit_share=0.5, criterion="entropy", val_accuracy=0.91 + i / 100,
                  policy_accuracy=0.92 + i / 100, policy_val_accuracy=0.93 + i / 100)
             for i in range(2)]
    v = Variant(name="v", method="early-exit", params={}, artifacts=[art], accuracy=0.94,
                params_count=1, macs=2, size_bytes=art.bytes, latency_ms=_TABLE, exits=exits,
                val_accuracy=0.937512)
    write_manifest(tmp_path, _manifest([v]))
    raw = json.loads((tmp_path / "manifest.json").read_text())["variants"][0]
    assert raw["val_accuracy"] == 0.937512
    assert [e["policy_val_accuracy"] for e in raw["exits"]] == [e.policy_val_accuracy for e in exits]
    assert load_family(tmp_path).variant("v") == v


# --- the validation sample ------------------------------------------------------------------

def _family_with_validation(root: Path, x: np.ndarray, y: np.ndarray, **kw: int) -> Path:
    art = write_artifact(root, "v/model.onnx", b"not parsed by load_family")
    manifest = {**_manifest([_old_variant(art.path, art.sha256, art.bytes, exits=False)]),
                "input": {"shape": list(x.shape[1:])},
                "validation": write_validation(root, x, y, seed=0, **kw)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("pixels", ["uint8", "float32"])
def test_the_validation_sample_round_trips_exactly(tmp_path: Path, pixels: str) -> None:
    rng = np.random.default_rng(0)
    if pixels == "uint8":  # k/255 pixels, as every loader makes them from 8-bit images
        x = np.divide(rng.integers(0, 256, (6, 3, 4, 4)), np.float32(255), dtype=np.float32)
    else:  # 16-bit or float sources: not k/255, kept as float32
        x = rng.random((6, 3, 4, 4), dtype=np.float32)
    y = rng.integers(0, 3, 6)
    fam = load_family(_family_with_validation(tmp_path, x, y))
    assert fam.manifest["validation"]["pixels"] == pixels
    assert np.load(tmp_path / "data" / "val_x.npy", allow_pickle=False).dtype == pixels
    got = fam.validation()
    assert got is not None
    np.testing.assert_array_equal(got[0], x)
    np.testing.assert_array_equal(got[1], y)
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64


def test_the_validation_sample_is_a_seeded_subset_past_the_limit(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(12, 1, 1, 1) / 255
    y = np.arange(12)
    a = load_family(_family_with_validation(tmp_path / "a", x, y, limit=5)).validation()
    b = load_family(_family_with_validation(tmp_path / "b", x, y, limit=5)).validation()
    assert a is not None and b is not None
    np.testing.assert_array_equal(a[1], b[1])  # the same sample on a rebuild
    assert len(a[1]) == 5 and list(a[1]) == sorted(a[1])  # in split order
    np.testing.assert_array_equal(a[0].reshape(-1), x.reshape(-1)[a[1]])
    rec = json.loads((tmp_path / "a" / "manifest.json").read_text())["validation"]
    assert rec["samples"] == 5 and rec["of"] == 12


def test_a_tampered_validation_file_is_refused(tmp_path: Path) -> None:
    x = np.zeros((4, 1, 2, 2), np.float32)
    root = _family_with_validation(tmp_path, x, np.zeros(4, np.int64))
    fam = load_family(root)
    path = root / "data" / "val_y.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a label changed, same size
    path.write_bytes(bytes(data))
    with pytest.raises(FamilyError, match=r"val_y\.npy: sha256 mismatch"):
        load_family(root)
    with pytest.raises(FamilyError, match=r"val_y\.npy: sha256 mismatch"):
        fam.validation()  # a family loaded earlier checks again as it reads


def test_a_validation_file_that_needs_pickle_is_refused(tmp_path: Path) -> None:
    """Even with a matching sha256 (a family written by someone else), an object array is never
    unpickled."""
    x = np.zeros((2, 1, 2, 2), np.float32)
    root = _family_with_validation(tmp_path, x, np.zeros(2, np.int64))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    manifest = json.loads((root / "manifest.json").read_text())
    art = write_artifact(root, "data/val_y.npy", buf.getvalue(), role="validation")
    manifest["validation"]["y"] = {k: v for k, v in asdict(art).items() if v is not None}
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FamilyError, match=r"val_y\.npy: not a plain \.npy array"):
        load_family(root).validation()


def test_a_family_built_before_the_sample_has_none(tmp_path: Path) -> None:
    art = write_artifact(tmp_path, "v/model.onnx", b"graph")
    old = _old_variant(art.path, art.sha256, art.bytes, exits=False)
    (tmp_path / "manifest.json").write_text(json.dumps(_manifest([old])))
    assert load_family(tmp_path).validation() is None


def test_a_built_family_carries_its_validation_split(quick_family: Path) -> None:
    from compression import data as datasets

    fam = load_family(quick_family)
    cfg = fam.manifest["build"]["config"]
    splits = datasets.split(datasets.load(cfg["data_spec"]), seed=cfg["seed"],
                            val_fraction=cfg["val_fraction"], test_fraction=cfg["test_fraction"])
    got = fam.validation()
    assert got is not None and fam.manifest["validation"]["pixels"] == "uint8"  # MNIST bytes
    np.testing.assert_array_equal(got[0], splits.x_val)
    np.testing.assert_array_equal(got[1], splits.y_val)
