"""The family directory contract: a built family loads; any damage is one FamilyError naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from compression import export
from compression.core import encoding
from compression.core.errors import FamilyError
from compression.core.family import (
    SCHEMA_VERSION,
    Exit,
    Variant,
    load_family,
    variant_to_json,
    write_artifact,
    write_manifest,
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
