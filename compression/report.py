"""The family's human-facing summaries: the terminal table, ``report.md`` and ``pareto.png``.

Accuracy is the test split's (``Variant.accuracy``), Δ and the plot included; the ``val`` column
is the validation split's (``Variant.val_accuracy``, for routing; ``-`` for manifests written
before it was recorded).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compression.core.family import BATCH_SIZES, Variant

log = logging.getLogger(__name__)

COLUMNS = ("variant", "method", "accuracy", "Δ vs full", "val", "params", "MACs", "size", "size ratio",
           "p50 b1 ms", "p95 b1 ms", "speed-up")


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip()


def rows(variants: Sequence[Variant]) -> list[list[str]]:
    """One row per variant, ratios against ``full`` (the first variant when none is named so)."""
    full = next((v for v in variants if v.name == "full"), variants[0])
    out = []
    for v in variants:
        out.append([
            v.name, v.method, f"{100 * v.accuracy:.2f}%",
            f"{100 * (v.accuracy - full.accuracy):+.2f} pt",
            "-" if v.val_accuracy is None else f"{100 * v.val_accuracy:.2f}%",
            _human(v.params_count),
            _human(v.macs), _human(v.size_bytes, "B"),
            f"{full.size_bytes / max(v.size_bytes, 1):.1f}x smaller",
            f"{v.p50(1):.3f}", f"{v.p95(1):.3f}", f"{full.p50(1) / max(v.p50(1), 1e-9):.2f}x",
        ])
    return out


def table(variants: Sequence[Variant]) -> str:
    """A fixed-width text table for the terminal."""
    body = [list(COLUMNS), *rows(variants)]
    widths = [max(len(r[i]) for r in body) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in body]
    return "\n".join(lines)


def write(root: Path, manifest: dict[str, Any], variants: Sequence[Variant],
          sections: Sequence[str]) -> None:
    """``report.md`` (tables, latency per batch size, method sections) and ``pareto.png``."""
    build = manifest["build"]
    host = build["host"]
    latency_header = ["variant"] + [f"p50/p95 b{b} ms" for b in BATCH_SIZES] + ["build s"]
    latency_rows = [[v.name] + [f"{v.p50(b):.3f} / {v.p95(b):.3f}" for b in BATCH_SIZES]
                    + [f"{v.build_seconds:.0f}"] for v in variants]
    text = [
        f"# Family `{manifest['family']}`\n",
        f"Dataset `{manifest['dataset']['spec']}` (test split: {manifest['dataset']['splits']['test']}"
        f" images), seed {build['seed']}, built in {build['seconds']:.0f} s on {host['cpus']} CPUs "
        f"({host['processor']}), torch {host['torch']}, ONNX Runtime {host['onnxruntime']}. "
        "Latency: ONNX Runtime, 1 intra-op thread.\n",
        markdown_table(COLUMNS, rows(variants)), "\n\n## Latency by batch size\n",
        markdown_table(latency_header, latency_rows), "\n", _torch_vs_ort(variants),
        "\n![pareto](pareto.png)\n\n",
        *sections,
    ]
    (root / "report.md").write_text("\n".join(text))
    try:
        pareto_plot(variants, root / "pareto.png")
    except ImportError:  # matplotlib is a dependency, but the family is valid without the plot
        log.warning("matplotlib missing: pareto.png not written")


def _torch_vs_ort(variants: Sequence[Variant]) -> str:
    """The full model on eager torch against ONNX Runtime, both on one thread."""
    full = next((v for v in variants if v.name == "full"), None)
    if full is None or "torch_latency_ms" not in full.details:
        return ""
    eager = full.details["torch_latency_ms"]
    body = [[f"batch {b}", f"{full.p50(b):.3f} / {full.p95(b):.3f}",
             f"{eager[str(b)]['p50']:.3f} / {eager[str(b)]['p95']:.3f}",
             f"{eager[str(b)]['p50'] / max(full.p50(b), 1e-9):.2f}x"] for b in BATCH_SIZES]
    return ("\n## `full` on ONNX Runtime against eager torch (1 thread)\n\n"
            + markdown_table(["", "ORT p50 / p95 ms", "torch p50 / p95 ms", "ORT speed-up"], body)
            + "\n")


def pareto_plot(variants: Sequence[Variant], path: Path) -> None:
    """Accuracy against p50 latency and against size, one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, xs, label in (
        (axes[0], [v.p50(1) for v in variants], "p50 latency, batch 1 (ms, ONNX Runtime, 1 thread)"),
        (axes[1], [v.size_bytes / 1e3 for v in variants], "artifact size (kB, log scale)"),
    ):
        ys = [100 * v.accuracy for v in variants]
        ax.scatter(xs, ys, s=36, zorder=3)
        for i, (v, x, y) in enumerate(zip(variants, xs, ys, strict=True)):
            # Alternate above/below: variants of equal accuracy often sit side by side.
            ax.annotate(v.name, (x, y), textcoords="offset points",
                        xytext=(4, 4 if i % 2 == 0 else -11), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    fig.suptitle("Model family: accuracy against cost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
