"""Honest accuracy statistics: Wilson intervals, exact McNemar tests, per-image correctness bits.

A test split of 1,000 images moves an accuracy by 0.1 pt per image, so every accuracy the family
reports carries a 95 % Wilson score interval, and every difference against ``full`` an exact
McNemar p-value: both models answer the *same* test images, so the test looks only at the images
where exactly one of them is right (b: full right, variant wrong; c: the reverse). The build keeps
which test images each variant (and each early exit) got right as a compact bit string in the
manifest (`encode_bits`), so the paired test can be recomputed from the family alone.

Pure Python and numpy: the server, the CLI and the reports import it without torch.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # two-sided 95 %: the standard normal's 0.975 quantile


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval (low, high) of ``correct`` successes in ``n`` trials.

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or n
    correct, which matters near 99 % accuracy.
    """
    if n <= 0:
        raise ValueError(f"wilson: n must be ≥ 1, got n={n!r}")
    if not 0 <= correct <= n:
        raise ValueError(f"wilson: correct must lie in [0, n={n}], got correct={correct!r}")
    p = correct / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # clamp the rounding noise at the ends (0 or n correct give exactly 0 or 1 in exact arithmetic)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs.

    Under the null each discordant image is a fair coin: p = min(1, 2 · P[Binom(b+c, ½) ≤ min(b,
    c)]), summed in exact integers so large counts lose nothing. No discordant pairs → 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: counts must be ≥ 0, got b={b!r}, c={c!r}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)  # int / int: Python rounds the exact ratio once


@dataclass(frozen=True)
class Paired:
    """A variant against a reference on the same images."""

    b: int  # reference right, variant wrong
    c: int  # reference wrong, variant right
    p_value: float  # exact McNemar

    @property
    def delta(self) -> int:
        """Images gained (positive) or lost by the variant."""
        return self.c - self.b


def paired(reference: np.ndarray, variant: np.ndarray) -> Paired:
    """McNemar's discordant counts and exact p-value of two per-image correctness vectors."""
    ref, var = np.asarray(reference, dtype=bool), np.asarray(variant, dtype=bool)
    if ref.shape != var.shape or ref.ndim != 1:
        raise ValueError(f"paired: correctness vectors must be 1-D and of one length, got shapes "
                         f"{ref.shape} and {var.shape}")
    b, c = int((ref & ~var).sum()), int((~ref & var).sum())
    return Paired(b=b, c=c, p_value=mcnemar_exact(b, c))


# --- per-image correctness in the manifest ------------------------------------------------------

def encode_bits(correct: np.ndarray) -> dict[str, Any]:
    """``{"n": images, "bits": base64(numpy.packbits(correct))}``: 1 = image i answered right.

    1,000 test images take 168 characters, so the manifest holds them directly (plain JSON, no
    pickle, no extra artifact to hash).
    """
    arr = np.asarray(correct, dtype=bool)
    if arr.ndim != 1:
        raise ValueError(f"encode_bits: expected a 1-D correctness vector, got shape {arr.shape}")
    return {"n": int(arr.size), "bits": base64.b64encode(np.packbits(arr).tobytes()).decode()}


def decode_bits(record: Mapping[str, Any]) -> np.ndarray:
    """The bool vector `encode_bits` wrote; a malformed record raises ValueError naming it."""
    try:
        n = int(record["n"])
        raw = base64.b64decode(str(record["bits"]), validate=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"correctness record {dict(record)!r} is malformed ({exc})") from exc
    if n < 0 or len(raw) != (n + 7) // 8:
        raise ValueError(f"correctness record: n={n!r} images need {(n + 7) // 8} bytes, "
                         f"the bits hold {len(raw)}")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=n).astype(bool)


# --- formatting, one style for report.md, inspect and docs/results.md ----------------------------

def format_accuracy(correct: int, n: int, *, digits: int = 2) -> str:
    """``98.80% [97.91, 99.31]``: the accuracy and its 95 % Wilson interval, in percent."""
    lo, hi = wilson(correct, n)
    return f"{100 * correct / n:.{digits}f}% [{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]"


def format_p(p: float) -> str:
    """A p-value at a readable precision (``p=0.029``, ``p<0.001``)."""
    return "p<0.001" if p < 0.001 else f"p={p:.2g}" if p < 0.1 else f"p={p:.2f}"


def correct_count(accuracy: float, n: int) -> int:
    """How many of ``n`` images an accuracy measured on them got right.

    Accuracies are recorded rounded to 6 decimals, which still pins the count for any split
    under 10⁶ images. An accuracy no count over ``n`` gives (measured on another split, or a
    bare guess) raises ValueError instead of becoming an interval over the wrong images.
    """
    if n <= 0:
        raise ValueError(f"correct_count: n must be ≥ 1, got n={n!r}")
    k = round(accuracy * n)
    if not 0 <= k <= n or abs(accuracy * n - k) > 1e-6 * n:
        raise ValueError(f"correct_count: accuracy {accuracy!r} is no count of right answers "
                         f"over n={n} images (measured on another number of images?)")
    return k


def format_rate(accuracy: float, n: int, *, digits: int = 2) -> str:
    """`format_accuracy` of an accuracy (a fraction) measured on ``n`` images: ``0.988`` on
    1,000 → ``98.80% [97.91, 99.31]``."""
    return format_accuracy(correct_count(accuracy, n), n, digits=digits)


def format_bits(correct: np.ndarray, *, digits: int = 2) -> str:
    """`format_accuracy` of a per-image correctness vector (1 = image answered right)."""
    arr = np.asarray(correct, dtype=bool)
    return format_accuracy(int(arr.sum()), arr.size, digits=digits)


def format_delta(reference: np.ndarray, variant: np.ndarray) -> tuple[str, str]:
    """``("-0.30 pt", "p=0.45")``: a variant's accuracy minus a reference's on the same images,
    and the exact McNemar p-value of that difference."""
    test = paired(reference, variant)
    n = max(np.asarray(reference).size, 1)
    return f"{100 * test.delta / n:+.2f} pt", format_p(test.p_value)
