"""Write ``docs/results.md`` (and its plots under ``docs/results/``) from the outputs of one
``make bench``: the default family's manifest, ``policies.py``'s summary (steady-load and
time-varying tables, best static in hindsight, the targets) and per-request records,
``router.py``'s and ``overhead.py``'s figures; a missing one leaves its section short. Nothing
here measures; every number is read from those files, so the page is exactly what the run
produced.

    .venv/bin/python bench/report.py [--family families/mnist5k] [--results results/bench]
        [--docs docs]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client import bench_plots
from client.results import host_info, percent, read_records
from compression.core.family import Variant, load_family
from compression.report import accuracy_cell, markdown_table, mcnemar_cell
from protos import wire

log = logging.getLogger("bench.report")
ROOT = Path(__file__).resolve().parents[1]

# Published anchors (../shared/DESIGN.md, "Reference results"), by compression method.
ANCHORS: dict[str, str] = {
    "full": "—",
    "pruned-weights": "Han 2015: LeNet-5 431K → 36K weights (12x), error 0.80 → 0.77%; "
                      "lottery tickets match down to 3.6% of weights",
    "clustered": "Deep Compression (prune + cluster + Huffman): LeNet-5 39x, LeNet-300-100 40x, "
                 "no accuracy loss",
    "distilled": "Hinton 2015: student 146 errors alone → 74 distilled at T=20 (teacher 67)",
    "int8": "PyTorch int8: ResNet-50 2x faster on CPU, −0.2 pt",
    "depthwise": "MobileNet: MACs ratio 1/N + 1/k² (8–9x fewer for 3×3), −1.1 pt",
    "low-rank": "Denton 2014 ~2x; Jaderberg 2014 2.5x at no loss",
    "early-exit": "BranchyNet B-LeNet: 5.4x faster on CPU, 94% leave at branch 1, +0.05 pt",
    "binary": "BinaryConnect: MNIST MLP 1.29% error (deterministic)",
    "pruned-neurons": "torch-pruning (DESIGN.md): 50% channels, MACs 29.5 M → 7.5 M, "
                      "ORT 351 → 109 µs",
}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "-"


def _ours(v: Variant, full: Variant, test_images: int) -> str:
    """The figure of ours that the method's anchor is about."""
    d = v.details
    size = _ratio(full.size_bytes, v.size_bytes)
    if v.method == "clustered":
        return f"{size} smaller, {100 * (v.accuracy - full.accuracy):+.2f} pt"
    if v.method == "pruned-weights":
        sparsity = d.get("sparsity")
        kept = f", {100 * (1 - sparsity):.1f}% of weights kept" if sparsity is not None else ""
        return (f"error {100 * (1 - full.accuracy):.2f} → {100 * (1 - v.accuracy):.2f}%, "
                f"{size} smaller{kept}")
    if v.method == "distilled":
        acc = d.get("accuracy", {})
        alone = acc.get("labels_only")
        errors = round((1 - v.accuracy) * test_images)
        text = f"{errors} errors distilled (teacher {round((1 - full.accuracy) * test_images)})"
        if alone is not None:
            text = f"student {round((1 - alone) * test_images)} errors alone → " + text
        return text + f" on {test_images} test images"
    if v.method == "int8":
        return (f"{_faster(full, v)} faster (b1), {_faster(full, v, 32)} "
                f"(b32), {100 * (v.accuracy - full.accuracy):+.2f} pt")
    if v.method == "depthwise":
        return (f"{_ratio(full.macs, v.macs)} fewer MACs, {_faster(full, v)} faster, "
                f"{100 * (v.accuracy - full.accuracy):+.2f} pt")
    if v.method == "low-rank":
        return (f"{_ratio(full.macs, v.macs)} fewer MACs, {_faster(full, v)} faster, "
                f"{100 * (v.accuracy - full.accuracy):+.2f} pt")
    if v.method == "early-exit" and v.exits:
        pol = d.get("policy", {})
        shares = pol.get("test_exit_shares") or [e.exit_share for e in v.exits]
        speed = pol.get("measured", {}).get("speedup") or pol.get("expected_speedup_vs_full")
        sp = f"{speed:.2f}x faster on average (measured), " if speed else ""
        return (f"{sp}{100 * shares[0]:.0f}% leave at exit 0, "
                f"{100 * (v.accuracy - full.accuracy):+.2f} pt")
    if v.method == "binary":
        return f"error {100 * (1 - v.accuracy):.2f}%, {size} smaller"
    if v.method == "pruned-neurons":
        return (f"MACs {full.macs / 1e6:.1f} M → {v.macs / 1e6:.1f} M, "
                f"{_faster(full, v)} faster, {100 * (v.accuracy - full.accuracy):+.2f} pt")
    return "-"


def _faster(full: Variant, v: Variant, batch: int = 1) -> str:
    """The paired speed-up the build recorded (a ratio within one profiling round), else the
    ratio of the two p50s (manifests from before paired profiling)."""
    paired = (v.speedup or {}).get(str(batch))
    return f"{paired:.2f}x" if paired else _ratio(full.p50(batch), v.p50(batch))


def compression_section(family_dir: Path) -> str:
    fam = load_family(family_dir)
    m = fam.manifest
    variants = list(fam.variants.values())
    full = fam.variants.get("full", variants[0])
    test_images = int(m["dataset"]["splits"]["test"])
    host = m["build"]["host"]
    rows = []
    for v in variants:
        rows.append([f"`{v.name}`", v.method, accuracy_cell(v.accuracy, v.test_correct, test_images),
                     f"{100 * (v.accuracy - full.accuracy):+.2f}"
                     + ("" if v is full else f" ({mcnemar_cell(full.test_correct, v.test_correct)})"),
                     f"{v.params_count / 1e3:.1f} k", f"{v.macs / 1e6:.2f} M",
                     f"{v.size_bytes / 1e3:.1f} kB ({_ratio(full.size_bytes, v.size_bytes)})",
                     f"{v.p50(1):.3f} ({_faster(full, v)})",
                     _ours(v, full, test_images), ANCHORS.get(v.method, "—")])
    table = markdown_table(["variant", "method", "accuracy [95% CI]", "Δ pt (McNemar)", "params", "MACs",
                            "size (smaller)", "p50 b1 ms (paired speed-up)", "ours, as the anchor counts",
                            "published anchor"], rows)
    ee = [v for v in variants if v.exits]
    exits = ""
    if ee:
        v = ee[0]
        shares = v.details.get("policy", {}).get("test_exit_shares") or \
            [e.exit_share for e in v.exits or []]
        exits = "\n\nEarly exits of `{}`: {}.".format(v.name, "; ".join(
            f"exit {e.index}: accuracy {accuracy_cell(e.accuracy, None, test_images)}, "
            f"p50 b1 {e.latency_ms['1']['p50']:.3f} "
            f"ms cumulative, {100 * s:.1f}% of test samples leave here"
            for e, s in zip(v.exits or [], shares, strict=False)))
    return (f"## Compression: the default family `{fam.name}` against published results\n\n"
            f"From `{os.path.relpath(family_dir, ROOT)}/manifest.json`: dataset "
            f"`{m['dataset']['spec']}` ({test_images} test images), seed {m['build']['seed']}, "
            f"built in {m['build']['seconds']:.0f} s on {host['cpus']} CPUs ({host['machine']}), "
            f"torch {host['torch']}, ONNX Runtime {host['onnxruntime']}. Latency: the build's "
            "measurement, ONNX Runtime, 1 thread, batch 1. Accuracy: test split with its 95% "
            "Wilson interval; Δ: against `full` with the exact McNemar p-value on the same test "
            "images. The anchors are the published figures "
            "(LeNet-scale MNIST models, or ImageNet for int8/MobileNet); the column before them "
            "is our figure of the same kind. Per-method details: the family's `report.md`.\n\n"
            f"{table}{exits}\n")


def _spread(s: dict[str, float | None], pct: bool = True, nd: int = 1) -> str:
    """``median [min–max]`` of a `bench.policies.spread` (just the median when they agree)."""
    if s["median"] is None:
        return "-"

    def f(v: float | None) -> str:
        return "-" if v is None else (f"{100 * v:.{nd}f}" if pct else f"{v:.{nd}f}")

    mid = f(s["median"]) + ("%" if pct else "")
    return mid if s["min"] == s["max"] else f"{mid} [{f(s['min'])}–{f(s['max'])}]"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def policy_plots(summary: dict[str, Any], plots: Path) -> list[tuple[str, str]]:
    """``policies_load.png`` (in budget, accuracy and goodput against load, median with the
    repeats' range) and, with the varying scenario, ``policies_varying.png`` (each phase's in-budget
    share against time); returns (alt text, file name) per plot."""
    plt = _plt()
    plots.mkdir(parents=True, exist_ok=True)
    policies = list(summary["policies"])
    steady = summary["steady"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for p in policies:
        rows = [r for r in steady if r["policy"] == p]
        xs = [r["load"] for r in rows]
        for ax, key, scale in ((axes[0], "attainment", 100), (axes[1], "accuracy", 100),
                               (axes[2], "goodput_rps", 1)):
            pts = [(x, r[key]) for x, r in zip(xs, rows, strict=True) if r[key]["median"] is not None]
            if not pts:
                continue
            med = [scale * s["median"] for _, s in pts]
            lo = [m - scale * s["min"] for m, (_, s) in zip(med, pts, strict=True)]
            hi = [scale * s["max"] - m for m, (_, s) in zip(med, pts, strict=True)]
            ax.errorbar([x for x, _ in pts], med, yerr=[lo, hi], marker="o", capsize=3, label=p,
                        linewidth=2.2 if p == "adaptive" else 1.2)
    for ax, label in zip(axes, ("in budget (% of offered)", "accuracy of answered samples (%)",
                                "goodput (answers in budget / s)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(summary.get("loads") or sorted({r["load"] for r in steady}))
        ax.get_xaxis().set_major_formatter(_fmt_x())
        ax.set_xlabel("offered load (x full's capacity, log)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0, 101)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{summary['family']}: policies against steady load (median, bars: min–max of "
                 f"{summary['calibration']['repeats']} repeat(s))")
    fig.tight_layout()
    fig.savefig(plots / "policies_load.png", dpi=110)
    plt.close(fig)
    out = [("in budget, accuracy and goodput against load", "policies_load.png")]
    varying = summary.get("varying")
    if varying and varying.get("by_policy"):
        phases = varying["phases"]
        edges = [0.0]
        for ph in phases:
            edges.append(edges[-1] + ph["seconds"])
        fig, ax = plt.subplots(figsize=(10, 4.4))
        for row in varying["by_policy"]:
            ys = [100 * (ph["attainment"]["median"] or 0.0) for ph in row["phases"]]
            ax.stairs(ys, edges, label=row["policy"], linewidth=2.2 if row["policy"] == "adaptive"
                      else 1.2, baseline=None)
        ax2 = ax.twinx()
        ax2.stairs([ph["load"] for ph in phases], edges, color="grey", linestyle=":",
                   baseline=None, label="offered load")
        ax2.set_ylabel("offered load (x full's capacity, dotted)")
        ax2.set_ylim(0, 1.1 * max(ph["load"] for ph in phases))
        ax.set_xlabel("time (s)")
        ax.set_ylabel("in budget per phase (% of offered)")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        fig.suptitle("time-varying load: in-budget share per phase (median of repeats)")
        fig.tight_layout()
        fig.savefig(plots / "policies_varying.png", dpi=110)
        plt.close(fig)
        out.append(("in-budget share per phase of the time-varying load", "policies_varying.png"))
    return out


def _fmt_x() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v:g}x")


def _latency_cdf(summary: dict[str, Any], results: Path, plots: Path) -> str | None:
    """Round trip against budget at the load nearest 2x, first repeat, every policy (from the
    runs' requests.csv, when they are there)."""
    runs = [r for r in summary["runs"] if r["repeat"] == 0 and r.get("records_csv")]
    if not runs:
        return None
    load = min({r["load"] for r in runs}, key=lambda v: abs(v - 2.0))
    groups = {}
    for p in summary["policies"]:
        run = next((r for r in runs if r["policy"] == p and r["load"] == load), None)
        path = results / "policies" / run["records_csv"] if run else None
        if path is None or not path.is_file():
            return None
        groups[p] = read_records(path)
    name = f"latency_cdf_{load:g}x.png"
    bench_plots.latency_cdf(groups, plots / name,
                            title=f"round trip against budget at {load:g}x full's capacity "
                                  "(first repeat)")
    return f"![latency CDF at {load:g}x](results/{name})"


def policy_section(summary: dict[str, Any] | None, results: Path, docs: Path) -> str:
    """The policy comparison of ``bench/policies.py``'s ``summary.json`` (None: not run)."""
    title = "## Serving: adaptive routing against static variants\n\n"
    if summary is None:
        return title + ("No policy comparison yet: `bench/policies.py` has not written "
                        f"`{os.path.relpath(results, ROOT)}/policies/summary.json`.\n")
    if summary.get("schema") != 2:
        return title + ("The policy comparison's `summary.json` is from an older "
                        "`bench/policies.py` (one run per point, no repeats or time-varying load); "
                        "rerun `make bench` to fill this section.\n")
    cal = summary["calibration"]
    policies = summary["policies"]
    plots = docs / "results"
    images = policy_plots(summary, plots)
    best = {b["load"]: b for b in summary["best_static"]}
    rows = []
    for r in summary["steady"]:
        first = r["policy"] == next(iter(policies))
        top = r["most_used"]
        is_best = best.get(r["load"], {}).get("policy") == r["policy"]
        rows.append([
            f"{r['load']:g}x" if first else "",
            ("**" + r["policy"] + "**") if r["policy"] == "adaptive" else
            r["policy"] + (" (best static)" if is_best else ""),
            _spread(r["attainment"]), _spread(r["accuracy"], nd=2),
            _spread(r["goodput_rps"], pct=False), f"{r['correct_in_budget']['median']:.0f}",
            "-" if r["p99_ms"]["median"] is None else f"{r['p99_ms']['median']:.1f}",
            _spread(r.get("failed") or {"median": None}, pct=False, nd=0),
            _spread(r.get("shed") or {"median": None}, pct=False, nd=0),
            _spread(r.get("factor_before") or {"median": None}, pct=False, nd=2),
            "-" if top is None else f"{top[0]} {100 * top[1]:.0f}%"])
    steady = markdown_table(["load", "policy", "in budget", "accuracy", "goodput/s",
                             "correct in budget", "p99 ms", "errors", "of which shed",
                             "router safety factor before", "most used"], rows)
    adaptive = {r["load"]: r for r in summary["steady"] if r["policy"] == "adaptive"}
    brows = []
    for load, b in sorted(best.items()):
        a = adaptive.get(load)
        acc_a = None if a is None else a["accuracy"]["median"]
        if b["policy"] is None:
            brows.append([f"{load:g}x", "none reaches 95% in budget", "-", "-", "-",
                          percent(acc_a, 2), "-"])
            continue
        gap = None if acc_a is None or b["accuracy"] is None else 100 * (acc_a - b["accuracy"])
        brows.append([f"{load:g}x", f"`{b['policy'].removeprefix('pinned ')}`",
                      percent(b["reported_accuracy"], 2), percent(b["attainment"]),
                      percent(b["accuracy"], 2), percent(acc_a, 2),
                      "-" if gap is None else f"{gap:+.2f} pt"])
    best_table = markdown_table(["load", "best static in hindsight", "reported accuracy",
                                 "its in budget", "its accuracy", "adaptive accuracy",
                                 "adaptive − best static"], brows)
    varying = summary.get("varying")
    varying_text = ""
    if varying and varying.get("by_policy"):
        phases = varying["phases"]
        vrows = [[("**" + r["policy"] + "**") if r["policy"] == "adaptive" else r["policy"],
                  _spread(r["correct_in_budget"], pct=False, nd=0), _spread(r["attainment"]),
                  _spread(r["accuracy"], nd=2),
                  *(percent(ph["attainment"]["median"]) for ph in r["phases"]),
                  _spread(r.get("failed") or {"median": None}, pct=False, nd=0),
                  _spread(r.get("shed") or {"median": None}, pct=False, nd=0)]
                 for r in varying["by_policy"]]
        vtable = markdown_table(["policy", "correct in budget", "in budget", "accuracy",
                                 *(f"{ph['load']:g}x {ph['seconds']:g} s" for ph in phases),
                                 "errors", "of which shed"], vrows)
        profile = " → ".join(f"{ph['load']:g}x for {ph['seconds']:g} s" for ph in phases)
        varying_text = (
            "### Time-varying load\n\n"
            f"One open loop per policy and repeat: {profile} (in multiples of `full`'s capacity, "
            "back to back; the 8x second is the burst), the same arrivals, budgets and images for "
            "every policy in a repeat. *Correct in budget* counts samples classified correctly in "
            "answers that arrived within their budget (median [min–max] over repeats); the phase "
            "columns give each phase's in-budget share (median).\n\n"
            f"{vtable}\n")
    verdict = {True: "yes", False: "**no**", None: "n/a"}
    t = summary["targets"]
    ttable = markdown_table(["target", "wanted", "measured", "met"],
                            [[r["target"], r["wanted"], r["measured"], verdict[r["passed"]]]
                             for r in t["rows"]])
    codes: dict[str, dict[str, int]] = {}
    for r in summary["steady"]:
        for code, n in r["errors"].items():
            codes.setdefault(r["policy"], {}).setdefault(code, 0)
            codes[r["policy"]][code] += n
    err_text = "; ".join(f"{p}: " + ", ".join(f"{c} {n}" for c, n in e.items())
                         for p, e in codes.items()) or "none"
    lags = sorted(r["send_lag_ms"]["p99"] or 0.0 for r in summary["runs"])
    idle = cal["full_idle_ms"]
    statics = ", ".join(f"`{v['variant']}` ({percent(v['reported_accuracy'], 2)}, predicted p50 "
                        f"{v['predicted_p50_ms']:.2f} ms)" for v in policies.values() if v["variant"])
    flags = " ".join(summary.get("serve_args") or [])
    served = f"`adaptive-inference serve {flags}`" if flags else \
        "`adaptive-inference serve` and its default flags"
    server_note = ("a fresh server for every run" if cal.get("fresh_server_per_run") else
                   "one server for every run, so each run starts from the router state that "
                   "the run before left: see the safety factor column")
    end = summary.get("server_state_end", {})
    return (
        title +
        f"`bench/policies.py` served `{summary['family_dir']}` with {served} (loopback; "
        f"{server_note}) and loaded it from an in-process open loop (`client.loadgen`, Poisson "
        "arrivals, test-split images so accuracy is real, the gRPC deadline of each request = "
        "its budget). Calibration on this host before any load, on a server of its own: "
        f"**{cal['images_per_request']} images per request**; pinned `full` idle round trip p50 "
        f"{idle['p50']:.2f} / p95 {idle['p95']:.2f} / p99 {idle['p99']:.2f} ms; `full`'s capacity "
        f"**{cal['capacity_rps']:.1f} requests/s** (closed loop, 8 in flight); budgets "
        f"**{cal['budget_ms']} ms** (from `full`'s idle p99 to twice that). Policies: adaptive "
        f"(no pin) and each static candidate pinned, the Pareto front of the server's table "
        f"(accuracy against predicted p50 at this batch size, `full` and the fastest always in): "
        f"{statics}. Each point: {cal['seconds_per_point']:g} s, **{cal['repeats']} "
        f"repeat{'' if cal['repeats'] == 1 else 's'}** "
        "(median, [min–max] where they differ), policies in rotated order, the same seed "
        "(arrivals, budgets, images) for every policy at a load and repeat. *In budget*: answers "
        "that reached the client within their budget, as a share of the requests offered "
        "(errors and shed requests are misses); *goodput*: those per second; *accuracy*: of the "
        "answered samples; *correct in budget*: samples classified correctly in answers within "
        "budget, per run; *best static in hindsight*: the pinned static with the highest "
        "reported accuracy whose median in-budget share reaches 95% at that load. Requests left "
        f"the client a little after their scheduled arrival (p99 send lag per run: median "
        f"{lags[len(lags) // 2]:.1f} ms, worst {lags[-1]:.1f} ms: client and server share the "
        "cores).\n\n"
        f"### Steady load\n\n*Errors*: requests not answered, per run (median); *of which shed*: "
        "refused at once by the router (its `adaptive_shed_total`), the rest expired on the way "
        "or were dropped by the client; *router "
        "safety factor before*: what the router multiplied its predictions by when the run "
        "began (median; `server/calibration.py`).\n\n"
        f"{steady}\n\nErrors by code (all repeats): {err_text}. Router state "
        f"at the end: safety factor {end.get('safety_factor', 1.0):.2f}, miss ratio "
        f"{percent(end.get('miss_ratio'))}, {end.get('shed_total', 0):.0f} requests shed in all."
        f"\n\n{best_table}\n\n{varying_text}\n"
        f"### Targets\n\n{t['passed']} met, {t['failed']} not met, {t['not_evaluated']} not "
        "measurable in this run. Medians over repeats; accuracy targets compare the accuracy of "
        "answered samples; *within 0.3 pt of the best static* is one-sided (more accurate "
        "passes).\n\n"
        f"{ttable}\n\n"
        "Anchors: Proteus reports 2–10x fewer timeouts than static variants, INFaaS 1.6x fewer "
        "SLO violations.\n\n"
        + "\n\n".join(f"![{alt}](results/{name})" for alt, name in images)
        + ("\n\n" + cdf if (cdf := _latency_cdf(summary, results, plots)) else "") + "\n")


def overhead_section(router: dict[str, Any] | None, overhead: dict[str, Any] | None) -> str:
    text = ["## Overheads\n"]
    if router:
        text.append(
            f"**Router decision time** (`bench/router.py`): `Router.choose` over "
            f"{router['candidates']} candidates, {router['calls']:,} calls (load average "
            f"{router['load_average']}).\n\n" + markdown_table(
                ["", "p50", "p99", "max", "target"],
                [["`Router.choose`", f"{router['p50_us']:.1f} µs", f"{router['p99_us']:.1f} µs",
                  f"{router['max_us']:.1f} µs",
                  f"p99 ≤ 50 µs {'✔' if router['p99_us'] <= 50 else '✘'}"]]) + "\n")
    if overhead:
        o = overhead
        rows = [[label, f"{o[k]['p50_ms']:.3f}", f"{o[k]['p99_ms']:.3f}",
                 f"{o[k]['overhead_ms']:.3f}", f"{o[k]['ratio']:.2f}x",
                 "✔" if o[k]["ratio"] <= 1.5 else "✘"]
                for k, label in (("pool", "server, thread pool (`--inline-below-ms 0`)"),
                                 ("event_engine", "server, sockets read by gRPC's EventEngine "
                                                  "pool (`--grpc-io event-engine`)"),
                                 ("inline", "server, default flags (`--inline-below-ms "
                                            f"{o.get('inline_below_ms', 0.2):g}`, `--grpc-io "
                                            f"{o.get('grpc_io', 'event-engine')}`)"))
                if k in o]
        echo_poller = (f"; an echo reading its sockets as `--grpc-io {o['grpc_io']}` does: p50 "
                       f"{o['echo_poller_p50_ms']:.3f} ms" if "echo_poller_p50_ms" in o else "")
        text.append(
            f"**Serving overhead** (`bench/overhead.py`): family `{o['family']}`, variant "
            f"`{o['variant']}`, batch 1, {o['requests']:,} sequential requests per server, blocks "
            f"alternating with a bare `grpc.aio` echo server of the same payload sizes (load "
            f"average {o['load_average']}). In-process ORT p50 {o['ort_p50_ms']:.3f} ms; echo p50 "
            f"{o['echo_p50_ms']:.3f} ms (p99 {o['echo_p99_ms']:.3f}){echo_poller}. Overhead = "
            "server p50 − ORT p50; target ≤ 1.5x the (bare) echo p50.\n\n" + markdown_table(
                ["server", "p50 ms", "p99 ms", "overhead ms", "overhead ÷ echo", "≤ 1.5x"], rows)
            + "\n")
    return "\n".join(text)


# --- throughput and scale-out: bench/ceiling.py and bench/scaleout.py (issue 12) ----------------

def _machine(host: dict[str, Any] | None) -> str:
    if not host:
        return "machine not recorded"
    load = host.get("load_average")
    return (f"{host.get('cpus')} cores ({host.get('machine')}, {host.get('system')})"
            + (f", load average {load[0]:.1f} at the start" if load else ""))


def _cpus(cpus: Any) -> str:
    return ", ".join(map(str, cpus)) if isinstance(cpus, list) else str(cpus)


def throughput_section(ceilings: Sequence[dict[str, Any]],
                       scaleouts: Sequence[dict[str, Any]]) -> str:
    """Echo vs server saturation and CPU per answer, 1 vs N workers, unary vs stream, goodput
    past saturation."""
    text = ["## Throughput and scale-out\n"]
    if not ceilings and not scaleouts:
        text.append("Not measured in this run (`bench/ceiling.py`, `bench/scaleout.py`).\n")
        return "\n".join(text)
    for ceiling in ceilings:
        cfg = ceiling.get("config", {})
        rows = []
        for r in ceiling.get("rows", []):
            rows.append([r["server"], str(r["images"]), str(r["clients"]),
                         f"{r['answers_per_s']:,.0f}", f"{r['server_cpu_ms']:.3f}",
                         f"{r['server_cores']:.2f}",
                         "" if r.get("vs_echo") is None else f"{r['vs_echo']:.0%}",
                         "" if r.get("vs_one_worker") is None else f"{r['vs_one_worker']:.2f}x"])
        streams = (" Rows marked *stream* drive the server over ModelStreamInfer instead (each "
                   "call in flight a stream of its own, the next request sent when the last "
                   "answer arrived: `AdaptiveClient.infer_stream`)." if cfg.get("stream") else "")
        text.append(
            f"**Per-process ceiling** (`bench/ceiling.py`, {_machine(ceiling.get('host_start'))}): "
            f"the bare `grpc.aio` echo server and `serve` (default flags but `--workers`) driven "
            f"closed-loop to saturation by {cfg.get('clients')} client processes × "
            f"{cfg.get('concurrency')} calls in flight, pinned to `{ceiling.get('variant')}`, no "
            f"budget; CPU per answer = the server's process tree's CPU seconds ÷ answers; median "
            f"of {cfg.get('repeats')} rounds. "
            + (f"Every server process ran on CPU {cfg['server_cpus']}, the clients on CPU "
               f"{cfg.get('client_cpus') or 'any'}." if cfg.get("server_cpus") else
               "Clients and servers share the machine.") + streams
            + (f" {ceiling['note']}" if ceiling.get("note") else "") + "\n\n"
            + markdown_table(["server", "images", "client procs", "answers/s",
                              "server CPU ms/answer", "server cores", "vs echo", "vs 1 worker"],
                             rows) + "\n")
    for run in scaleouts:
        rows = []
        for key, r in _ramps(run):
            steps = " · ".join(f"{s['offered_rps']:g}/s → {100 * (s['attainment'] or 0):.0f}% "
                               f"({s['goodput_rps']:.0f}/s)" for s in r.get("steps", []))
            share = r.get("goodput_at_2x_share_of_peak")
            rows.append([str(r.get("workers", key)), f"`{r['flags']}`" if r.get("flags") else
                         "defaults", _client(key, r),
                         f"{r.get('peak_goodput_rps', 0):,.0f}/s at {r.get('peak_at_rps', 0):g}/s",
                         "not reached" if share is None else f"{share:.0%}", steps])
        cpus = run.get("cpus")
        pinned = ("" if not cpus or cpus.get("server") == "any" else
                  f" The server ran on CPU {_cpus(cpus['server'])}, the clients on CPU "
                  f"{_cpus(cpus['clients'])}.")
        if run.get("interleaved"):
            pinned += (" The configurations were interleaved (`--interleave`): every server "
                       "started first, each rate offered to them in a rotating order, each step "
                       "once every server was idle.")
        text.append(
            f"**Goodput past saturation** (`bench/scaleout.py`, {_machine(run.get('host'))}): "
            "`serve --device cpu --workers N`, routed, budgets uniform 5–20 ms, 8 test images per "
            "request, open-loop Poisson arrivals from several client processes, each gRPC deadline "
            "the request's budget; goodput = answers inside their budget per second. Target: "
            "goodput at twice the rate of the peak ≥ 90 % of the peak. *client*: whether the load "
            "generator throttles itself as `AdaptiveClient` does by default (`client/throttle.py`: "
            "past 5 % refused, a share of new requests is refused in the client, steered on the "
            "refusals that are load's; those count as misses), with other throttle settings "
            "(`gain=0`: Envoy's formula alone), or sends every request, as a client without a "
            "throttle does."
            f"{pinned}\n\n"
            + markdown_table(["workers", "flags", "client", "peak goodput", "goodput at 2x ÷ peak",
                              "offered → in budget (goodput)"], rows) + "\n")
        if (went := _where_it_went(run)) is not None:
            text.append(went)
    return "\n".join(text)


def _ramps(run: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A scaleout run's ramps by worker count, then name."""
    return sorted(run.get("servers_ramp", {}).items(),
                  key=lambda kv: (int(kv[0].split()[0]), kv[0]))


def _client(key: str, ramp: dict[str, Any]) -> str:
    label = key.partition("+client-throttle")[2].strip()  # scaleout.py --throttle
    return (f"throttled, `{label}`" if label else
            "throttled (`AdaptiveClient`'s default)" if ramp.get("client_throttle")
            else "sends every request")


def _where_it_went(run: dict[str, Any]) -> str | None:
    """Per ramp, at saturation (the lowest rate at which a ramp peaked) and at twice that rate:
    what the clients sent and kept back, what the server answered, refused and never read, and
    the cores it used (runs whose steps carry the server's side, `bench/scaleout.py`'s
    ``server``; None for older ones)."""
    def with_server(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [s for s in steps if "unread" in s.get("server", {})]

    ramps = [(key, r) for key, r in _ramps(run)
             if r.get("peak_at_rps") is not None and with_server(r.get("steps", []))]
    if not ramps:
        return None
    saturation = min(r["peak_at_rps"] for _, r in ramps)
    rows = []
    for key, r in ramps:
        steps = with_server(r["steps"])
        at = [s for s in steps if s["offered_rps"] == saturation]
        at += [s for s in steps if s["offered_rps"] >= 2 * saturation][:1]
        for s in at:
            srv = s["server"]
            counts = (s["answered"] + s["errors"], s["client_throttled"],
                      srv["status"].get("OK", 0), srv["refused"].get("load", 0), srv["unread"],
                      srv["late"])
            rows.append([f"{r.get('workers', key)}, {_client(key, r)}", f"{s['offered_rps']:g}",
                         *(f"{n / s['seconds']:,.0f}" for n in counts), f"{srv['cores']:.2f}",
                         f"{s['goodput_rps']:,.0f}"])
    return (f"Where the load went, at {saturation:g} requests/s (the lowest rate at which a ramp peaked) "
            f"and at twice that (per second; *answered*: "
            "by the server, on time or not; *refused*: by the server for load, "
            "`adaptive_refused_total`; *unread*: sent, but no handler saw it: its deadline "
            "passed while it waited in gRPC's core, or `--backlog` refused it there; *late*: "
            "answered after the budget, "
            "`adaptive_budget_misses_total`; *cores*: the server's CPU over the step's wall "
            "time):\n\n"
            + markdown_table(["server, client", "offered", "sent", "kept back by the client",
                              "answered", "refused", "unread", "late", "server cores",
                              "goodput"], rows) + "\n")


# --- GPU serving: bench/gpu.py's JSON (issue 13) -------------------------------------------------

# The targets, as `gpu_targets` evaluates them.
GPU_THROUGHPUT_SHARE = 0.5  # served images/s at 256/request ≥ this share of the bare CUDA graph
GPU_THROUGHPUT_FLOOR = 150_000.0  # images/s: the figure, used when bare was not measured
GPU_LATENCY_SLACK_MS = 0.5  # served batch-1 p50 ≤ echo p50 + CUDA-graph time + this
PLACEMENT_AUTO_MIN = 0.98  # --device auto's in-budget share under the saturating load
PLACEMENT_CPU_MAX = 0.80  # ... where --device cpu's falls below this (else: not saturated)


def _at(d: Any, *keys: str) -> Any:
    """``d[k1][k2]...``, or None where any level is missing (a phase that failed or was skipped
    leaves its part of the JSON out)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def gpu_measured_on_gpu(data: dict[str, Any]) -> tuple[bool, str]:
    """Whether the JSON's figures are a GPU's, and if not, why (the targets are then n/a)."""
    if data.get("quick"):
        return False, "a `--quick` run (seconds per phase, to test the script)"
    if data.get("accelerator") != "cuda":
        return False, (f"a run with the GPU lanes on `--accelerator {data.get('accelerator')}`, "
                       "not a GPU")
    if _at(data, "host", "torch", "cuda_available") is not True:
        return False, "a run on a host where torch saw no CUDA device"
    return True, ""


def _target(target: str, wanted: str, measured: str, passed: bool | None) -> dict[str, Any]:
    return {"target": target, "wanted": wanted, "measured": measured, "passed": passed}


def gpu_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against ``data`` (bench/gpu.py's JSON): one row each with what was
    wanted, what was measured and whether it was met (None: not measured, or not a GPU run)."""
    on_gpu, _ = gpu_measured_on_gpu(data)
    dtype = data.get("served_dtype") or "fp32"
    rows = []

    # 1. Served throughput at 256 images per request against the bare CUDA graph.
    bare = _at(data, "bare", dtype, "graph", "256", "images_per_s")
    want = (GPU_THROUGHPUT_SHARE * bare) if bare else GPU_THROUGHPUT_FLOOR
    wanted = (f"≥ {100 * GPU_THROUGHPUT_SHARE:.0f}% of bare {dtype} batch 256 ({bare:,.0f}) = "
              f"{want:,.0f} images/s" if bare else f"≥ {want:,.0f} images/s (bare not measured)")
    served = [r for r in _at(data, "served", "throughput") or []
              if r.get("images") == 256 and r.get("images_per_s") is not None]
    if served:
        best = max(served, key=lambda r: r["images_per_s"])
        share = f", {100 * best['images_per_s'] / bare:.0f}% of bare" if bare else ""
        rows.append(_target(
            "Served throughput of `full`, 256 images per request", wanted,
            f"{best['images_per_s']:,.0f} images/s (`--workers {best['workers']}`{share})",
            best["images_per_s"] >= want if on_gpu else None))
    else:
        rows.append(_target("Served throughput of `full`, 256 images per request", wanted,
                            "not measured", None))

    # 2. Batch-1 latency against the bare gRPC round trip plus the CUDA graph.
    lat = _at(data, "served", "latency_b1") or {}
    echo = lat.get("echo_paired_p50_ms") or _at(data, "echo", "p50_ms")
    graph = _at(data, "bare", dtype, "graph", "1", "ms_p50")
    p50 = lat.get("p50_ms")
    title = "Served batch-1 latency p50, pinned to the GPU lane"
    if echo is None or graph is None:
        rows.append(_target(title, f"≤ echo p50 + CUDA-graph batch 1 + {GPU_LATENCY_SLACK_MS} ms",
                            "not measured" if p50 is None else f"{p50:.3f} ms (no reference)",
                            None))
    else:
        limit = echo + graph + GPU_LATENCY_SLACK_MS
        wanted = (f"≤ echo {echo:.3f} + graph {graph:.3f} + {GPU_LATENCY_SLACK_MS} = "
                  f"{limit:.3f} ms")
        if p50 is None:
            rows.append(_target(title, wanted, "not measured", None))
        else:
            by = lat.get("answered_by")
            on_lane = wire.device_of(by or "") != wire.CPU
            rows.append(_target(title, wanted, f"{p50:.3f} ms (answered by `{by}`)",
                                (p50 <= limit and on_lane) if on_gpu else None))

    # 3. Placement: the GPU takes the overflow of saturated CPU lanes.
    cpu = _at(data, "placement", "runs", "cpu", "attainment")
    auto = _at(data, "placement", "runs", "auto", "attainment")
    rate = _at(data, "placement", "rate_rps")
    title = "In budget under a load that saturates the CPU lanes"
    wanted = (f"`--device auto` ≥ {100 * PLACEMENT_AUTO_MIN:.0f}% where `--device cpu` < "
              f"{100 * PLACEMENT_CPU_MAX:.0f}%")
    if cpu is None or auto is None:
        rows.append(_target(title, wanted, "not measured", None))
    else:
        measured = (f"auto {100 * auto:.1f}%, cpu {100 * cpu:.1f}% at {rate or 0:,.0f} "
                    "requests/s")
        if cpu >= PLACEMENT_CPU_MAX:  # the premise failed: nothing to take over
            measured += "; the CPU lanes were not saturated (cpu ≥ " \
                        f"{100 * PLACEMENT_CPU_MAX:.0f}%), so this does not test the overflow"
            rows.append(_target(title, wanted, measured, None))
        else:
            rows.append(_target(title, wanted, measured,
                                auto >= PLACEMENT_AUTO_MIN if on_gpu else None))

    # 4. The router uses both devices under that load.
    share = _at(data, "placement", "runs", "auto", "devices", "share")
    title = "`--device auto` answers on both devices under that load"
    if share is None:
        rows.append(_target(title, "some answers on each", "not measured", None))
    else:
        gpu_share = sum(v for d, v in share.items() if d != "cpu")
        rows.append(_target(title, "some answers on each",
                            f"GPU {100 * gpu_share:.1f}%, CPU {100 * share.get('cpu', 0.0):.1f}% "
                            "of answers",
                            (gpu_share > 0 and share.get("cpu", 0.0) > 0) if on_gpu else None))
    return rows


def _ms(v: Any, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _per_s(v: Any) -> str:
    return "-" if v is None else f"{v:,.0f}"


def gpu_section(data: dict[str, Any] | None, source: str = "results/bench/gpu.json") -> str:
    """The "GPU serving" section of docs/results.md from bench/gpu.py's JSON (None: no run)."""
    title = "## GPU serving\n\n"
    if data is None:
        return title + (
            f"Not measured: no GPU in this run. `bench/gpu.py` (issue 13's device check) writes "
            f"`{source}` on a machine with an NVIDIA GPU; this page was generated without one, "
            "so it shows no GPU figure.\n")
    on_gpu, why = gpu_measured_on_gpu(data)
    host = data.get("host") or {}
    torch_info = host.get("torch") or {}
    gpus = _at(host, "nvidia_smi", "gpus") or []
    gpu = (f"{gpus[0].get('name')} (driver {gpus[0].get('driver_version')}, "
           f"{gpus[0].get('memory.total')})" if gpus else torch_info.get("device_name")
           or "no GPU")
    ort = host.get("onnxruntime") or {}
    machine = (f"{gpu}; {host.get('cpus', '?')} cores ({host.get('machine', '?')}, "
               f"{host.get('system', '?')}), Python {host.get('python', '?')}, torch "
               f"{torch_info.get('version', '?')} (CUDA {torch_info.get('cuda') or '-'}), ONNX "
               f"Runtime {ort.get('version', '?')} ({', '.join(ort.get('providers') or []) or '?'})"
               f"; load average {(host.get('load_average') or ['?'])[0]} at the start")
    status = ("Measured on a GPU." if on_gpu else
              f"**Not measured on a GPU**: `{source}` is from {why}. The figures below show the "
              "script ran end to end; they are not the GPU's, and no target is evaluated.")
    verdict = {True: "yes", False: "**no**", None: "n/a"}
    targets = gpu_targets(data)
    out = [title + f"{status} `bench/gpu.py` ({data.get('started', '?')}, "
           f"{data.get('seconds_total', 0):.0f} s), family `{_at(data, 'family', 'name')}`:\n\n"
           f"```bash\n{data.get('command', 'python3 bench/gpu.py')}\n```\n\n"
           f"Machine: {machine}.\n"
           + (f"\n{data['note']}\n" if data.get("note") else ""),
           "### Targets\n\n" + markdown_table(
               ["target", "wanted", "measured", "met"],
               [[r["target"], r["wanted"], r["measured"], verdict[r["passed"]]] for r in targets])
           + "\n"]

    bare = data.get("bare")
    if bare:
        rows = []
        anchor = bare.get("anchor_ms") or {}
        for dtype in ("fp32", "fp16", "bf16"):
            per = bare.get(dtype)
            if not isinstance(per, dict):
                continue
            batches = sorted({*(per.get("graph") or {}), *(per.get("runner") or {})} - {"error"},
                             key=int)
            for b in batches:
                g = _at(per, "graph", b) or {}
                r = _at(per, "runner", b) or {}
                rows.append([dtype, b, _ms(g.get("ms_p50"), 4), _per_s(g.get("images_per_s")),
                             _ms(anchor.get(b), 3) if dtype == "fp32" else "-",
                             _ms(r.get("ms_p50"), 4), _per_s(r.get("images_per_s"))])
            for key in ("model_error", "runner_error"):
                if per.get(key):
                    rows.append([dtype, "-", f"{key.split('_')[0]} failed: {per[key][:160]}",
                                 "", "", "", ""])
        eager = _at(bare, "eager_b1_fp32", "ms_p50")
        out.append(
            "### The model alone\n\n"
            f"`full` ({(bare.get('macs') or 0) / 1e6:.1f} M MACs) in torch on "
            f"`{bare.get('device')}`, {bare.get('mode')}: milliseconds per call, the median of "
            "blocks of calls timed between two synchronisations. *Runner*: "
            "`server.torch_runner.TorchGraphRunner`, NumPy in and out (the copies a served "
            "batch pays). *Anchor*: the issue's figure (fp32), measured on an H200 machine like "
            "the device one."
            + (f" Eager batch 1 (fp32, synchronised per call): {_ms(eager, 3)} ms (anchor 0.43)."
               if eager is not None else "") + "\n\n"
            + markdown_table(["dtype", "batch", "graph ms", "graph images/s", "anchor ms",
                              "runner ms", "runner images/s"], rows) + "\n")

    served = data.get("served") or {}
    lat = served.get("latency_b1") or {}
    echo = data.get("echo") or {}
    tput = served.get("throughput") or []
    if lat or echo or tput:
        prose = []
        if lat.get("p50_ms") is not None:
            prose.append(
                f"Batch 1 pinned to `{lat.get('pinned')}` (answered by `{lat.get('answered_by')}`),"
                f" {lat.get('requests')} sequential requests in blocks alternating with a bare "
                f"`grpc.aio` echo server (bench/echo_server.py) of the same payload: p50 "
                f"{_ms(lat['p50_ms'])} ms (p99 {_ms(lat.get('p99_ms'))}); echo alongside p50 "
                f"{_ms(lat.get('echo_paired_p50_ms'))} ms."
                + (f" Of the round trip, the server reports {_ms(lat['queue_ms_p50'])} ms in the "
                   f"queue and {_ms(lat['compute_ms_p50'])} ms computing (p50 of 300 more calls)."
                   if lat.get("compute_ms_p50") is not None else ""))
        if echo.get("p50_ms") is not None:
            prose.append(f"The echo alone: p50 {_ms(echo['p50_ms'])} ms (p99 "
                         f"{_ms(echo.get('p99_ms'))}), {echo.get('requests')} sequential calls.")
        table = ""
        if tput:
            rows = []
            for r in tput:
                gpu_use = r.get("gpu") or {}
                procs = r.get("processes")
                rows.append([r.get("workers"), r.get("images"),
                             _per_s(r.get("images_per_s")) if "error" not in r else
                             f"failed: {r['error'][:120]}",
                             _per_s(r.get("requests_per_s")),
                             f"{procs} x {r.get('in_flight', 0) // procs}" if procs else "-",
                             ", ".join(f"{k} {v}" for k, v in (r.get("errors") or {}).items())
                             or "none",
                             f"{gpu_use['util_mean_pct']:.0f}% / {gpu_use['util_max_pct']:.0f}%"
                             if gpu_use else "-"])
            prose.append(f"Throughput pinned to `{served.get('lane')}`, closed loop from several "
                         "client processes (each with its own connections), no budget; *GPU "
                         "busy*: nvidia-smi's utilisation during the window.")
            table = "\n\n" + markdown_table(
                ["--workers", "images/request", "images/s", "requests/s",
                 "clients x in flight", "errors", "GPU busy mean / max"], rows)
        out.append("### Served: `--device cuda`\n\n" + " ".join(prose) + table + "\n")

    place = data.get("placement") or {}
    if place.get("runs") or place.get("ramp"):
        rows = []
        for label, r in (place.get("runs") or {}).items():
            if "error" in r:
                rows.append([f"`--device {label}`", "-", f"failed: {r['error'][:160]}",
                             *[""] * 7])
                continue
            lat_ms = r.get("latency_ms") or {}
            share = _at(r, "devices", "share") or {}
            gpu_share = sum(v for d, v in share.items() if d != "cpu")
            rows.append([f"`--device {label}`", f"{r.get('offered_rps', 0):,.0f}",
                         percent(r.get("attainment")), f"{r.get('answered')}/{r.get('offered')}",
                         percent(r.get("accuracy"), 2),
                         f"{_ms(lat_ms.get('p50'), 2)} / {_ms(lat_ms.get('p99'), 2)}",
                         percent(gpu_share), percent(share.get("cpu")),
                         ", ".join(f"{k} {v}" for k, v in (r.get("errors_by_code") or {}).items())
                         or "none", _router_after(r.get("router") or {})])
        ref = _at(place, "reference_capacity", "requests_per_s")
        ramp = place.get("ramp") or []
        how = (f" The rate: {place.get('rate_rule')}; `--device cpu` without budgets answered "
               f"{_per_s(ref)} requests/s; the ramp, in budget per rate: "
               + ", ".join(f"{_per_s(s['rate_rps'])}/s {percent(s['attainment'])}" for s in ramp)
               + "." if ramp else f" The rate: {place.get('rate_rule', '-')}.")
        out.append(
            "### Placement under load\n\n"
            "Two fresh servers with default flags but `--device`"
            + (f" and `--workers {place['workers']}`" if (place.get("workers") or 1) > 1 else "")
            + ", the same Poisson open loop "
            f"against each: {_per_s(place.get('rate_rps'))} requests/s, budgets "
            f"`{place.get('budget')}` ms, {place.get('images')} test images per request, gRPC "
            f"deadline = budget.{how} *In budget*: answers back within their budget, as a share "
            "of the requests offered; *on GPU*: answers from a GPU lane (a `cuda:` "
            "candidate); *router after*: its safety factor and additive margin at the end of the "
            "run (they bound how late it expects an answer to be) and the requests it shed.\n\n"
            + markdown_table(["server", "offered/s", "in budget", "answered", "accuracy",
                              "p50 / p99 ms", "on GPU", "on CPU", "errors", "router after"],
                             rows) + "\n")

    trouble = [f"`{name}` {p['status']}: {p.get('error') or p.get('reason') or ''}".strip()
               for name, p in (data.get("phases") or {}).items() if p.get("status") != "ok"]
    trouble += [f"`serve --device {label}` did not start: {err}"
                for label, err in (place.get("errors") or {}).items()]
    if trouble:
        out.append("Phases that did not finish: " + "; ".join(t[:300] for t in trouble) + ".\n")
    return "\n".join(out)


def _router_after(router: dict[str, Any]) -> str:
    """`bench/gpu.py`'s `router_state` of a placement run, in one cell (older runs: '-')."""
    if "safety_factor" not in router:
        return "-"
    return (f"x{router['safety_factor']:.1f}, +{_ms(router['margin_seconds'] * 1e3, 1)} ms, "
            f"shed {router.get('shed', 0):,.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--family", default="families/mnist5k")
    ap.add_argument("--results", default="results/bench")
    ap.add_argument("--docs", default="docs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results, docs = ROOT / args.results, ROOT / args.docs
    docs.mkdir(parents=True, exist_ok=True)

    def read(name: str) -> dict[str, Any] | None:
        path = results / name
        return json.loads(path.read_text()) if path.is_file() else None

    def present(*runs: dict[str, Any] | None) -> list[dict[str, Any]]:
        return [r for r in runs if r is not None]

    summary = read("policies/summary.json")
    if summary is None:
        log.warning("%s: missing; the policy section says so", results / "policies/summary.json")
    if summary is not None and "load_average_start" in summary.get("host", {}):
        h = summary["host"]
        when = (f"; the policy comparison started {summary['started']} and took "
                f"{summary['seconds_total']:.0f} s")
        load = (f"load average {h['load_average_start'][0]:.1f} at the start of the comparison "
                f"and {h['load_average_end'][0]:.1f} at its end (1-minute)")
    else:
        h, when = host_info(), ""
        load = f"load average {h['load_average'][0]:.1f} now (1-minute)"
    header = (
        "# Results\n\n"
        f"Generated by `make bench` ({datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}{when}). "
        f"Machine: {h['cpus']} cores ({h['machine']}, {h['system']}, Python {h['python']}), "
        f"no GPU; {load}. Client, server and any other "
        "work share these cores, so absolute latencies are this machine's; the comparisons "
        "inside one run are paired and fair. Regenerate with `make bench`; the raw figures are "
        f"under `{args.results}/`.\n\n"
        "To load your own server the same way:\n\n"
        "```bash\nadaptive-inference bench --target 127.0.0.1:8001 --rate 50,100,200 --duration 10 "
        "\\\n    --budget-ms uniform:5:20 --images 8 --family families/mnist5k --out results/my-run"
        "\n```\n\n"
        "`--budget-ms` takes a value, `uniform:A:B` or a mixture `2:0.5,10:0.3,50:0.2`; `--variant` "
        "pins; `--deadline-is-budget` sets each gRPC deadline to the budget. It writes "
        "`results.json` (per rate: offered, sent, answered, errors by code, throughput, budget "
        "attainment, goodput, p50/p95/p99, accuracy, share of each variant/exit), "
        "`requests.csv`, `latency_cdf.png` and `load.png`.\n")
    parts = [header, compression_section((ROOT / args.family).resolve()),
             policy_section(summary, results, docs),
             overhead_section(read("router.json"), read("overhead.json")),
             throughput_section(present(read("ceiling.json"), read("ceiling-2core.json"),
                                        read("ceiling-2core-pinned.json")),
                                present(read("scaleout.json"), read("scaleout-2core.json"),
                                        read("scaleout-2core-throttle.json"))),
             gpu_section(read("gpu.json"), f"{args.results}/gpu.json")]
    (docs / "results.md").write_text("\n".join(parts))
    log.info("wrote %s", docs / "results.md")


if __name__ == "__main__":
    main()
