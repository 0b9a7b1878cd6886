"""Reading images for the CLI: ``.npy`` arrays or image files, into float32 [N, C, H, W] in [0, 1]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from server.errors import InvalidArgument


def read_images(path: str | Path, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """``path`` as a batch for a model taking [C, H, W] = ``shape``.

    ``.npy``: [H, W] (one channel), [C, H, W] or [N, C, H, W]; uint8 is scaled by 1/255.
    Other files are opened with Pillow, converted to grey or RGB to match C, resized to H×W.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"file {str(path)!r}: not found")
    c, h, w = (int(d) for d in shape)
    if path.suffix.lower() == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise InvalidArgument(f"file {str(path)!r}: not a plain .npy array ({exc})") from None
        if x.ndim == 2 and c == 1:
            x = x[None]
        if x.ndim == 3:
            x = x[None]
    else:
        x = _read_picture(path, c, h, w)
    if x.ndim != 4 or list(x.shape[1:]) != [c, h, w]:
        raise InvalidArgument(f"file {str(path)!r}: shape {list(x.shape)!r}, the model takes "
                              f"[N, {c}, {h}, {w}]")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    return np.ascontiguousarray(x, dtype=np.float32)


def _read_picture(path: Path, c: int, h: int, w: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img: Any = Image.open(path)
        img = img.convert("L" if c == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidArgument(f"file {str(path)!r}: not a readable image ({exc})") from None
    if img.size != (w, h):
        img = img.resize((w, h))
    a = np.asarray(img, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # HWC → CHW
    return a[None]
