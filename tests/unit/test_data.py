"""Dataset specs: the three sources parse, and every malformed input is one clear DataError."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from compression import data
from compression.core.errors import DataError


def _write_idx(path: Path, array: np.ndarray, *, magic_type: int = 0x08, gz: bool = False) -> None:
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def _idx_dir(root: Path, *, n: int = 40, gz: bool = False) -> Path:
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    _write_idx(root / f"train-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28)), gz=gz)
    _write_idx(root / f"train-labels-idx1-ubyte{sfx}", np.arange(n) % 10, gz=gz)
    _write_idx(root / f"t10k-images-idx3-ubyte{sfx}", rng.integers(0, 256, (20, 28, 28)), gz=gz)
    _write_idx(root / f"t10k-labels-idx1-ubyte{sfx}", np.arange(20) % 10, gz=gz)
    return root


def test_mnist5k_is_the_real_digits() -> None:
    ds = data.load("mnist5k")
    assert ds.x.shape == (5000, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.num_classes == 10
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    assert np.bincount(ds.y).min() > 400  # every digit present


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_plain_and_gzipped(tmp_path: Path, gz: bool) -> None:
    ds = data.load(f"idx:{_idx_dir(tmp_path, gz=gz)}")
    assert ds.x.shape == (40, 1, 28, 28) and ds.x_test is not None and ds.x_test.shape[0] == 20
    assert ds.num_classes == 10


def test_npz_formats(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", x=rng.random((30, 16, 16, 3), dtype=np.float32), y=np.arange(30) % 3)
    ds = data.load(f"npz:{tmp_path / 'a.npz'}")
    assert ds.x.shape == (30, 3, 16, 16) and ds.num_classes == 3
    np.savez(tmp_path / "b.npz", x_train=rng.integers(0, 255, (30, 8, 8), dtype=np.uint8),
             y_train=np.arange(30) % 2, x_test=rng.integers(0, 255, (10, 8, 8), dtype=np.uint8),
             y_test=np.arange(10) % 2)
    ds = data.load(f"npz:{tmp_path / 'b.npz'}")
    assert ds.x.shape == (30, 1, 8, 8) and ds.x_test is not None and ds.x.max() <= 1.0


def test_split_is_seeded_stratified_and_disjoint() -> None:
    ds = data.load("mnist5k")
    a = data.split(ds, seed=3)
    b = data.split(ds, seed=3)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert len(a.y_train) + len(a.y_val) + len(a.y_test) == 5000
    assert len(a.y_test) == 1000 and len(a.y_val) == 500
    # stratified: each class keeps its share of the test split within one sample
    np.testing.assert_allclose(np.bincount(a.y_test) / 1000, np.bincount(ds.y) / 5000, atol=0.002)
    c = data.split(ds, seed=4)
    assert not np.array_equal(a.y_train, c.y_train) or not np.array_equal(a.x_train, c.x_train)


def _expect(spec: str, *fragments: str) -> None:
    with pytest.raises(DataError) as err:
        data.load(spec)
    for f in fragments:
        assert f in str(err.value), str(err.value)


def test_unknown_spec() -> None:
    _expect("cifar", "unknown dataset spec 'cifar'")


def test_missing_file(tmp_path: Path) -> None:
    _expect(f"npz:{tmp_path / 'nope.npz'}", "nope.npz", "file not found")
    _expect(f"idx:{tmp_path / 'nodir'}", "nodir", "directory not found")


def test_wrong_magic_number(tmp_path: Path) -> None:
    _idx_dir(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    _expect(f"idx:{tmp_path}", "train-images-idx3-ubyte", "wrong magic number")


def test_truncated_idx(tmp_path: Path) -> None:
    _idx_dir(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-50])
    _expect(f"idx:{tmp_path}", "train-images-idx3-ubyte", "header promises")


def test_shape_label_mismatch(tmp_path: Path) -> None:
    _idx_dir(tmp_path)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(39) % 10)
    _expect(f"idx:{tmp_path}", "40 images but 39 labels")


def test_labels_out_of_range(tmp_path: Path) -> None:
    np.savez(tmp_path / "neg.npz", x=np.zeros((4, 8, 8)), y=np.array([0, 1, -3, 1]))
    _expect(f"npz:{tmp_path / 'neg.npz'}", "neg.npz", "label -3", "out of range")
    np.savez(tmp_path / "frac.npz", x=np.zeros((2, 8, 8)), y=np.array([0.5, 1.0]))
    _expect(f"npz:{tmp_path / 'frac.npz'}", "non-integer labels")


def test_nan_images(tmp_path: Path) -> None:
    x = np.zeros((4, 8, 8), dtype=np.float32)
    x[2, 3, 3] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.array([0, 1, 0, 1]))
    _expect(f"npz:{tmp_path / 'nan.npz'}", "nan.npz", "NaN")


def test_npz_with_wrong_keys_or_pickled_objects(tmp_path: Path) -> None:
    np.savez(tmp_path / "keys.npz", images=np.zeros((2, 8, 8)))
    _expect(f"npz:{tmp_path / 'keys.npz'}", "expected arrays", "images")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    _expect(f"npz:{tmp_path / 'obj.npz'}", "obj.npz")  # refused, never unpickled
