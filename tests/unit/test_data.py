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


# --- folder:DIR (ImageFolder) ----------------------------------------------------------------

def _png(path: Path, pixels: np.ndarray, fmt: str = "PNG") -> Path:
    """[H, W] uint8 → L, [H, W, 2|3|4] → LA/RGB/RGBA, [H, W] uint16 → I;16 (Pillow's mapping)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def _rgb(seed: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _gray(seed: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def test_folder_rgb_classes_are_sorted_folder_names_and_pixels_exact(tmp_path: Path) -> None:
    # written out of order, one nested: classes and files come back in sorted order
    _png(tmp_path / "zebra" / "b.png", _rgb(1))
    _png(tmp_path / "zebra" / "a.png", _rgb(2))
    _png(tmp_path / "ant" / "sub" / "c.png", _rgb(3))
    _png(tmp_path / "ant" / "B.PNG", _rgb(4))
    flat = np.full((6, 5, 3), (200, 30, 90), np.uint8)  # smooth: JPEG keeps it nearly intact
    _png(tmp_path / "ant" / "d.jpeg", flat, fmt="JPEG")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    _png(tmp_path / "ant" / ".hidden.png", _rgb(6, 9, 9))  # skipped: another size would fail
    _png(tmp_path / ".cache" / "x.png", _rgb(7, 9, 9))  # a hidden folder is no class
    ds = data.load(f"folder:{tmp_path}")
    assert ds.class_names == ("ant", "zebra") and ds.num_classes == 2
    assert ds.x.shape == (5, 3, 6, 5) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.y, [0, 0, 0, 1, 1])
    # order: ant/B.PNG, ant/d.jpeg, ant/sub/c.png, zebra/a.png, zebra/b.png
    for i, seed in ((0, 4), (2, 3), (3, 2), (4, 1)):  # PNG is lossless: exactly uint8 / 255
        np.testing.assert_array_equal(ds.x[i], _rgb(seed).transpose(2, 0, 1) / np.float32(255))
    np.testing.assert_allclose(ds.x[1], flat.transpose(2, 0, 1) / 255, atol=0.04)  # JPEG: lossy
    again = data.load(f"folder:{tmp_path}")
    assert again.fingerprint() == ds.fingerprint()


def test_folder_channels_follow_the_stated_rule(tmp_path: Path) -> None:
    gray = tmp_path / "gray"
    _png(gray / "a" / "1.png", _gray(1))
    _png(gray / "b" / "2.png", (_gray(2) > 127).astype(np.uint8) * 255)
    _png(gray / "b" / "3.png", np.dstack([_gray(3), _gray(4)]))
    _png(gray / "b" / "4.png", _gray(5).astype(np.uint16) * 257)  # 16-bit
    ds = data.load(f"folder:{gray}")
    assert ds.x.shape == (4, 1, 6, 5)  # every image grayscale: one channel
    np.testing.assert_array_equal(ds.x[2, 0], _gray(3) / np.float32(255))  # alpha dropped
    np.testing.assert_allclose(ds.x[3, 0], _gray(5) / 255, atol=1e-6)  # 65535 = 1.0
    mixed = tmp_path / "mixed"
    _png(mixed / "a" / "1.png", _gray(1))
    rgba = np.dstack([_rgb(2), _gray(9)])
    _png(mixed / "b" / "2.png", rgba)
    ds = data.load(f"folder:{mixed}")
    assert ds.x.shape == (2, 3, 6, 5)  # one colour image: all RGB
    for c in range(3):  # grayscale repeated in R, G and B
        np.testing.assert_array_equal(ds.x[0, c], _gray(1) / np.float32(255))
    np.testing.assert_array_equal(ds.x[1], _rgb(2).transpose(2, 0, 1) / np.float32(255))


def test_folder_train_and_test_subfolders_are_the_source_split(tmp_path: Path) -> None:
    for i in range(6):
        _png(tmp_path / "train" / ("cat" if i % 2 else "dog") / f"{i}.png", _rgb(i, 8, 12))
    _png(tmp_path / "test" / "dog" / "t.png", _rgb(99, 8, 12))  # a subset of the classes
    ds = data.load(f"folder:{tmp_path}")
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
    assert ds.x.shape == (6, 3, 8, 12) and ds.x_test is not None and ds.y_test is not None
    assert ds.x_test.shape == (1, 3, 8, 12) and ds.y_test.tolist() == [1]
    s = data.split(ds, seed=0)
    np.testing.assert_array_equal(s.x_test, ds.x_test)  # kept as the source defines it
    assert s.input_shape == (3, 8, 12) and len(s.normalization()["mean"]) == 3


def test_folder_errors_name_the_folder_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    _expect(f"folder:{tmp_path / 'nodir'}", "nodir", "directory not found")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect(f"folder:{empty}", "found 0 class folder(s)", "at least 2")
    _png(tmp_path / "one" / "only" / "a.png", _rgb(0))
    _expect(f"folder:{tmp_path / 'one'}", "found 1 class folder(s) ['only']")
    _png(tmp_path / "bare" / "a" / "x.png", _rgb(0))
    (tmp_path / "bare" / "b").mkdir()
    (tmp_path / "bare" / "b" / "x.bmp").write_bytes(b"BM")
    _expect(f"folder:{tmp_path / 'bare'}", "bare/b: class folder holds no .png/.jpg/.jpeg image")
    monkeypatch.setattr(data, "MAX_CLASSES", 2)
    _png(tmp_path / "many" / "a" / "x.png", _rgb(0))
    _png(tmp_path / "many" / "b" / "x.png", _rgb(0))
    _png(tmp_path / "many" / "c" / "x.png", _rgb(0))
    _expect(f"folder:{tmp_path / 'many'}", "3 class folders, at most 2")


def test_folder_unreadable_or_odd_sized_images_are_named(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _png(root / "a" / "1.png", _rgb(0))
    _png(root / "b" / "2.png", _rgb(1))
    bad = root / "b" / "3.png"
    bad.write_bytes(b"this is no png")
    _expect(f"folder:{root}", f"{bad}: unreadable image")
    good = _png(root / "b" / "3.png", _rgb(2, 64, 64))
    good.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated mid-data
    _expect(f"folder:{root}", f"{good}: unreadable image")
    _png(root / "b" / "3.png", _rgb(2, 7, 5))
    _expect(f"folder:{root}", f"{bad}: image size 5x7 differs from 5x6 of {root / 'a' / '1.png'}")


def test_folder_split_layout_errors(tmp_path: Path) -> None:
    _png(tmp_path / "s" / "train" / "a" / "1.png", _rgb(0))
    _png(tmp_path / "s" / "train" / "b" / "1.png", _rgb(1))
    _png(tmp_path / "s" / "test" / "c" / "1.png", _rgb(2))
    _expect(f"folder:{tmp_path / 's'}", "test: class folder(s) ['c'] not in", "['a', 'b']")
    _png(tmp_path / "s" / "val" / "a" / "1.png", _rgb(3))
    _expect(f"folder:{tmp_path / 's'}", "holds train/ and also ['val']")
    _png(tmp_path / "t" / "test" / "a" / "1.png", _rgb(0))
    _png(tmp_path / "t" / "b" / "1.png", _rgb(0))
    _expect(f"folder:{tmp_path / 't'}", "holds test/ but no train/ folder")
