"""The benchmark's PNG plots: latency CDF against the budget, and figures against offered load.

Used by `adaptive-inference bench` (one policy, its rates) and by ``bench/report.py`` (the
policies side by side). Latency plots read `client.loadgen.Record`s; load curves read the run
figures of `client.results.summarize_run`. matplotlib runs headless (Agg).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.loadgen import DROPPED, OK, Record


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(values: Sequence[float], total: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and the share of ``total`` at or below each (errors never arrive, so a
    curve tops out at the share answered)."""
    xs = np.sort(np.asarray(values, dtype=float))
    return xs, np.arange(1, len(xs) + 1) / max(total, 1)


def latency_cdf(groups: Mapping[str, Sequence[Record]], path: Path, *, title: str = "") -> Path:
    """Left: CDF of the round-trip latency of each group beside the CDF of the budgets asked.
    Right: CDF of latency ÷ budget, where the curve crosses 1 is the budget attainment."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    budgets: list[float] = []
    for label, recs in groups.items():
        sent = [r for r in recs if r.status != DROPPED]
        ok = [r for r in sent if r.status == OK]
        if not ok:
            continue
        xs, ys = _cdf([r.latency_ms for r in ok], len(recs))
        (line,) = ax.step(xs, 100 * ys, where="post", label=label)
        judged = [r.latency_ms / r.budget_ms for r in ok if r.budget_ms is not None]
        if judged:
            xs, ys = _cdf(judged,
                          sum(r.budget_ms is not None for r in recs))
            ax2.step(xs, 100 * ys, where="post", color=line.get_color(), label=label)
        budgets += [r.budget_ms for r in recs if r.budget_ms is not None]
    if budgets:
        xs, ys = _cdf(budgets, len(budgets))
        ax.step(xs, 100 * ys, where="post", color="black", linestyle="--", label="budget asked")
    ax2.axvline(1.0, color="black", linestyle="--", linewidth=1)
    from matplotlib.ticker import FuncFormatter

    for a in (ax, ax2):
        a.set_xscale("log")
        a.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        a.xaxis.set_minor_formatter(FuncFormatter(
            lambda v, _pos: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    ax.set_xlabel("round-trip latency (ms, log)")
    ax2.set_xlabel("latency ÷ budget (log; ≤ 1 is within budget)")
    for a in (ax, ax2):
        a.set_ylabel("requests (%)")
        a.set_ylim(0, 101)
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    fig.suptitle(title or "latency CDF against the budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def load_curves(series: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, *,
                capacity: float | None = None, title: str = "") -> Path:
    """Budget attainment, goodput and accuracy of each series (a policy) against offered load;
    with ``capacity`` the x axis is in multiples of it."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for label, runs in series.items():
        xs = [r["offered_rps"] / capacity if capacity else r["offered_rps"] for r in runs]
        axes[0].plot(xs, [100 * (r["attainment"] or 0) for r in runs], marker="o", label=label)
        axes[1].plot(xs, [r["goodput_rps"] for r in runs], marker="o", label=label)
        acc = [(x, 100 * r["accuracy"]) for x, r in zip(xs, runs, strict=True)
               if r["accuracy"] is not None]
        if acc:
            axes[2].plot(*zip(*acc, strict=True), marker="o", label=label)
    xlabel = "offered load (× full variant's capacity)" if capacity else "offered load (requests/s)"
    for ax, ylabel in zip(axes, ("budget attainment (%)", "goodput (answers in budget / s)",
                                 "accuracy of answers (%)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(0, 101)
    fig.suptitle(title or "against offered load")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
