"""The default config on a dataset it was not tuned for: does every variant meet ``max_drop``?

Writes scikit-learn's ``load_digits`` (1,797 grayscale 8×8 digits, shipped inside the sklearn
wheel, values 0-16 scaled to [0, 1]) as an npz, builds the family from ``configs/mnist5k.toml``
with only the data spec changed (``adaptive-inference build CONFIG --data npz:FILE``, as a user
would), then prints each variant's validation and test accuracy against ``full`` and whether it
is within its ``max_drop`` on validation or marked (``details["search"]`` in the manifest).

    .venv/bin/python bench/unseen.py [--out /tmp/fam-digits] [--config configs/mnist5k.toml]

Exit status 0 when every variant is within max_drop or explicitly marked, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_digits(path: Path) -> Path:
    """sklearn's digits as ``x`` float32 [N, 1, 8, 8] in [0, 1] and ``y`` int64 [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=digits.target.astype(np.int64))
    return path


def rows(manifest: dict[str, Any]) -> list[list[str]]:
    """One row per variant: val and test accuracy, Δ vs full on both, the max_drop verdict."""
    variants = manifest["variants"]
    full = next(v for v in variants if v["name"] == "full")
    out = []
    for v in variants:
        search = v.get("details", {}).get("search")
        verdict = ("reference" if search is None else
                   f"within ({search['knob']}={search['chosen']!r}, {len(search['trials'])} "
                   "tries)" if search["within_max_drop"] else
                   f"MARKED ({search['knob']}={search['chosen']!r}, {len(search['trials'])} tries)")
        out.append([v["name"], f"{100 * v['val_accuracy']:.2f}%",
                    f"{100 * (v['val_accuracy'] - full['val_accuracy']):+.2f}",
                    f"{100 * v['accuracy']:.2f}%",
                    f"{100 * (v['accuracy'] - full['accuracy']):+.2f}",
                    "-" if search is None else f"{search['max_drop_pt']:g}", verdict])
    return out


def print_table(body: list[list[str]]) -> None:
    header = ["variant", "val", "Δ val pt", "test", "Δ test pt", "max_drop", "verdict"]
    table = [header, *body]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mnist5k.toml"))
    parser.add_argument("--out", default="/tmp/fam-digits", help="family directory to write")
    parser.add_argument("--npz", default="/tmp/digits.npz", help="where to write the dataset")
    args = parser.parse_args()
    npz = write_digits(Path(args.npz))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "client.cli", "build", args.config,
                           "--out", args.out, "--data", f"npz:{npz}"], cwd=ROOT)
    if proc.returncode != 0:
        print(f"build failed with exit status {proc.returncode}", file=sys.stderr)
        return proc.returncode
    manifest = json.loads((Path(args.out) / "manifest.json").read_text())
    splits = manifest["dataset"]["splits"]
    print(f"\nsklearn digits (8×8, {sum(splits.values())} images: train {splits['train']}, "
          f"val {splits['val']}, test {splits['test']}), config {args.config}, built in "
          f"{time.perf_counter() - t0:.0f} s\n")
    body = rows(manifest)
    print_table(body)
    unmarked_misses = [r[0] for r, v in zip(body, manifest["variants"], strict=True)
                       if (s := v.get("details", {}).get("search")) is not None
                       and s["within_max_drop"] is not False
                       and s["drop_pt"] is not None and s["drop_pt"] > s["max_drop_pt"] + 1e-9]
    if unmarked_misses:
        print(f"\nbeyond max_drop but not marked: {unmarked_misses}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
