"""The family's human-facing summaries: the terminal table, ``report.md`` and ``pareto.png``.

Accuracy is the test split's (``Variant.accuracy``), Δ and the plot included; the ``val`` column
is the validation split's (``Variant.val_accuracy``, for routing; ``-`` for manifests written
before it was recorded). Every test accuracy carries its 95 % Wilson interval and every Δ vs
``full`` the exact McNemar p-value on the same test images (`compression.core.stats`, from the
per-image bits the build keeps; ``-`` where a manifest predates them). Speed-ups are the paired
profile's (`compression.profile.paired_latency`), ratios within one round.

The methods' own sections (``MethodOutput.report_md``) print their accuracies with the same cells:
`rate_cell` (an accuracy with its interval over the images it was measured on) and
`paired_cells` (test accuracy, Δ and McNemar p against a reference on the same test images).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from compression.core import stats
from compression.core.family import BATCH_SIZES, Variant

log = logging.getLogger(__name__)

COLUMNS = ("variant", "method", "accuracy", "Δ vs full", "McNemar", "val", "params", "MACs", "size",
           "size ratio", "p50 b1 ms", "p95 b1 ms", "speed-up")
LEGEND = ("accuracy: test split [95% Wilson interval]; McNemar: exact p-value of the Δ vs full on "
          "the same test images; val: validation split (routing) [95% Wilson]; speed-up: paired, "
          "batch 1")


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}".rstrip()
    return f"{n:.0f} {unit}".rstrip()


def accuracy_cell(accuracy: float, correct: dict[str, Any] | None,
                  test_images: int | None = None) -> str:
    """``98.80% [97.91, 99.31]``: a test accuracy with its 95 % Wilson interval, counted from the
    per-image bits, else from ``test_images``; the bare percentage when neither gives a count
    (a manifest is shown, never refused, over a figure that does not fit its split)."""
    if correct is not None:
        return stats.format_bits(stats.decode_bits(correct))
    return split_cell(accuracy, test_images)


def split_cell(accuracy: float | None, images: int | None) -> str:
    """An accuracy measured on a split of ``images`` with its 95 % Wilson interval; bare when
    the split's size is unknown or the figure is no count over it (``-`` when None)."""
    if accuracy is None:
        return "-"
    if images:
        try:
            return stats.format_rate(accuracy, images)
        except ValueError:  # measured on other images than this split: no interval over it
            pass
    return f"{100 * accuracy:.2f}%"


def rate_cell(accuracy: float | None, n: int) -> str:
    """An accuracy measured on ``n`` images with its 95 % Wilson interval (``-`` when None)."""
    return "-" if accuracy is None else stats.format_rate(accuracy, n)


def paired_columns(reference: str) -> list[str]:
    """The header of `paired_cells` in a method's section, against ``reference`` (a variant)."""
    return ["test accuracy [95% Wilson]", f"Δ vs `{reference}`", "McNemar"]


def paired_cells(reference: np.ndarray, correct: np.ndarray) -> list[str]:
    """A model's test accuracy with its interval, its Δ against a reference on the same test
    images and that Δ's exact McNemar p-value, from both per-image correctness vectors."""
    return [stats.format_bits(correct), *stats.format_delta(reference, correct)]


def mcnemar_cell(reference: dict[str, Any] | None, correct: dict[str, Any] | None) -> str:
    """Exact McNemar p-value of a Δ on the same images (``-`` without both bit strings)."""
    if reference is None or correct is None:
        return "-"
    a, b = stats.decode_bits(reference), stats.decode_bits(correct)
    if a.shape != b.shape:
        return "-"
    return stats.format_p(stats.paired(a, b).p_value)


def speedup(v: Variant, full: Variant, batch: int = 1) -> float:
    """The paired speed-up over ``full`` the build recorded, else the ratio of the two p50s."""
    if v.speedup and str(batch) in v.speedup:
        return v.speedup[str(batch)]
    return full.p50(batch) / max(v.p50(batch), 1e-9)


def rows(variants: Sequence[Variant], test_images: int | None = None,
         val_images: int | None = None) -> list[list[str]]:
    """One row per variant, ratios against ``full`` (the first variant when none is named so)."""
    full = next((v for v in variants if v.name == "full"), variants[0])
    out = []
    for v in variants:
        out.append([
            v.name, v.method, accuracy_cell(v.accuracy, v.test_correct, test_images),
            f"{100 * (v.accuracy - full.accuracy):+.2f} pt",
            "—" if v is full else mcnemar_cell(full.test_correct, v.test_correct),
            split_cell(v.val_accuracy, val_images),
            _human(v.params_count),
            _human(v.macs), _human(v.size_bytes, "B"),
            f"{full.size_bytes / max(v.size_bytes, 1):.1f}x smaller",
            f"{v.p50(1):.3f}", f"{v.p95(1):.3f}", f"{speedup(v, full):.2f}x",
        ])
    return out


def exit_rows(variant: Variant, full: Variant, test_images: int | None = None,
              val_images: int | None = None) -> list[list[str]]:
    """The early-exit network's exits as routed (``variant@k``: the policy capped at exit k):
    test accuracy with its interval, Δ vs ``full`` with its McNemar p-value."""
    out = []
    for e in variant.exits or []:
        acc = e.policy_accuracy if e.policy_accuracy is not None else e.accuracy
        out.append([f"{variant.name}@{e.index}", accuracy_cell(acc, e.test_correct, test_images),
                    f"{100 * (acc - full.accuracy):+.2f} pt",
                    mcnemar_cell(full.test_correct, e.test_correct),
                    split_cell(e.policy_val_accuracy, val_images),
                    f"{e.latency_ms['1']['p50']:.3f}"])
    return out


EXIT_COLUMNS = ("exit (policy capped)", "accuracy", "Δ vs full", "McNemar", "val", "p50 b1 ms")




def table(variants: Sequence[Variant], test_images: int | None = None,
          val_images: int | None = None) -> str:
    """A fixed-width text table for the terminal."""
    return text_table(COLUMNS, rows(variants, test_images, val_images))


def text_table(header: Sequence[str], body_rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width columns, a rule under the header."""
    body = [list(header), *[list(r) for r in body_rows]]
    widths = [max(len(r[i]) for r in body) for i in range(len(header))]
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
    test_images = int(manifest["dataset"]["splits"]["test"])
    val_images = manifest["dataset"]["splits"].get("val")
    full = next((v for v in variants if v.name == "full"), variants[0])
    latency_header = (["variant"] + [f"p50/p95 b{b} ms (speed-up)" for b in BATCH_SIZES]
                      + ["build s"])
    latency_rows = [[v.name] + [f"{v.p50(b):.3f} / {v.p95(b):.3f} ({speedup(v, full, b):.2f}x)"
                                for b in BATCH_SIZES]
                    + [f"{v.build_seconds:.0f}"] for v in variants]
    exits = [r for v in variants if v.exits
             for r in exit_rows(v, full, test_images, val_images)]
    text = [
        f"# Family `{manifest['family']}`\n",
        f"Dataset `{manifest['dataset']['spec']}` (test split: {test_images}"
        f" images), seed {build['seed']}, built in {build['seconds']:.0f} s on {host['cpus']} CPUs "
        f"({host['processor']}), torch {host['torch']}, ONNX Runtime {host['onnxruntime']}. "
        f"{profile_note(build.get('profile'))}\n",
        markdown_table(COLUMNS, rows(variants, test_images, val_images)), f"\n\n{LEGEND}.\n",
        *(["\n## Early exits as routed (`early-exit@k`: the calibrated policy, no deeper than k)\n",
           markdown_table(EXIT_COLUMNS, exits), "\n"] if exits else []),
        "\n## Latency by batch size\n",
        markdown_table(latency_header, latency_rows), "\n", _torch_vs_ort(variants),
        "\n![pareto](pareto.png)\n\n",
        search_section(variants, val_images),
        *sections,
    ]
    (root / "report.md").write_text("\n".join(text))
    try:
        pareto_plot(variants, root / "pareto.png")
    except ImportError:  # matplotlib is a dependency, but the family is valid without the plot
        log.warning("matplotlib missing: pareto.png not written")


def profile_note(meta: dict[str, Any] | None) -> str:
    """One sentence on how the latencies were taken (manifests before the paired profile: wall
    time, one variant after another)."""
    if not meta:
        return "Latency: ONNX Runtime, 1 intra-op thread, wall time, one variant after another."
    cpu = meta.get("cpu", {})
    return (f"Latency: ONNX Runtime, 1 intra-op thread, {meta.get('clock', 'wall time')}, every "
            f"variant in {meta['rounds']} interleaved rounds per batch size (speed-up: median "
            f"over rounds of the in-round ratio to `{meta.get('reference', 'full')}`), on "
            f"{cpu.get('model', '?')} ({', '.join(cpu.get('isa', [])) or 'ISA flags unknown'}).")


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


def search_section(variants: Sequence[Variant], val_images: int | None = None) -> str:
    """The accuracy target's search (``details["search"]``, `compression.build._search`): per
    variant, each strength tried, its validation accuracy, Δ vs ``full`` and which shipped."""
    searched = [v for v in variants if "search" in v.details]
    if not searched:
        return ""
    marked = [v for v in searched if v.details["search"]["within_max_drop"] is False]
    text = ["## Accuracy target (validation, Δ vs `full`)\n",
            "Each variant ships the strongest setting of its knob whose validation accuracy is "
            "within its `max_drop` of `full`'s, tried from the configured setting toward milder ones."
            + (f" **Not within max_drop at any setting, not served by default: "
               f"{', '.join(f'`{v.name}`' for v in marked)}.**" if marked else
               " Every variant is within its max_drop.") + "\n"]
    for v in searched:
        s = v.details["search"]
        rows = [[f"{t['setting']!r}" if s["knob"] else "configured",
                 split_cell(t["val_accuracy"], val_images),
                 "-" if t["drop_pt"] is None else f"{0.0 - t['drop_pt']:+.2f} pt",
                 "yes" if t.get("chosen") else ""] for t in s["trials"]]
        verdict = "within" if s["within_max_drop"] else "**NOT within max_drop (marked)**"
        text += [f"### `{v.name}`: {s['knob'] or 'no knob'}, max_drop {s['max_drop_pt']:g} pt, "
                 f"{verdict}\n",
                 markdown_table([s["knob"] or "setting", "val accuracy", "Δ vs full", "chosen"],
                                rows), ""]
    return "\n".join(text) + "\n"
