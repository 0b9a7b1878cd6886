"""Policy comparison: adaptive routing against pinned static variants, at steady loads from 0.5x to
8x the `full` variant's capacity on this host and under a load that changes during one run.

1. Calibrate on this host, on a server of its own (`adaptive-inference serve`, default flags,
   loopback, free ports) that is stopped afterwards: ``--images`` per request (32: enough that
   `full`'s compute, not the gRPC round trip, dominates); the idle round trip of pinned `full`
   (three blocks of 100 sequential requests; the median block's p99 sets the budgets, uniform
   over [p99, 2 x p99], a range `full` just meets when idle); `full`'s capacity (closed loop, 8
   requests always in flight, 5 s). Its own server, so that what the measured server's router
   learns (`server.calibration`) comes from the measured runs alone.
2. Static candidates: the Pareto front of the server's candidate table at that batch size
   (ascending predicted p50, each more accurate than every faster one), with `full` and the
   fastest always in, at most ``--max-statics`` (middle ones dropped evenly). Policies: adaptive
   (no pin) and ``pinned NAME`` for each static.
3. Serve the family with default flags: one server for every run (``--fresh-server``: a new one
   per run), SERVING before the first.
4. Steady loads: for each repeat and load, every policy in rotated order (drift on the shared
   host hits all alike), one open loop each (`client.loadgen.run_open_loop`, in this process),
   gRPC deadline = budget, the same seed for every policy at a (load, repeat): the same arrivals,
   budgets and images, a paired comparison. The server is idle before every run; the router's
   state before and after (safety factor, miss ratio, overhead, requests shed) is kept with the
   run.
5. Time-varying load (``--no-varying`` skips it): 0.5x 4 s → 4x 4 s → 0.5x 4 s → burst 8x 1 s →
   0.5x 3 s, back to back in one open loop per policy (`run_phases`), ``--repeats`` times: no
   static choice is right throughout. Counted: correct answers (samples) delivered in budget.
6. Best static in hindsight per load: the pinned static with the highest server-reported
   accuracy whose median in-budget share is ≥ 95 %.
7. ``summary.json``: calibration, host, every run, per-load medians and [min, max], the best
   static per load, the varying scenario and the issue's targets evaluated (`evaluate_targets`);
   one ``requests.csv`` per run under ``runs/``. The tables are printed at the end;
   ``bench/report.py`` renders them into ``docs/results.md``.

    .venv/bin/python bench/policies.py [--family families/mnist5k] [--loads 0.5,1,2,4,8]
        [--repeats 3] [--seconds 5] [--out results/bench/policies]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import shlex
import signal
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from client.budgets import BudgetSpec
from client.client import AdaptiveClient
from client.loadgen import (
    Phase,
    Record,
    RunConfig,
    TestData,
    choose_images,
    closed_loop,
    load_test_data,
    run_open_loop,
    run_phases,
    sequential_ms,
)
from client.process import start_serving
from client.results import (
    host_info,
    host_span,
    percent,
    summarize_run,
    text_table,
    write_records_csv,
)
from compression.core.family import load_family

log = logging.getLogger("bench.policies")
ROOT = Path(__file__).resolve().parents[1]
IMAGE_CHOICES = (1, 2, 4, 8, 16, 32)
ADAPTIVE = "adaptive"
IN_BUDGET_BAR = 0.95  # a static is "servable" at a load when its median in-budget share reaches it
# The time-varying scenario: (load in multiples of full's capacity, seconds).
VARYING = "0.5:4,4:4,0.5:4,8:1,0.5:3"


# --- pure parts: which statics, and what the runs add up to (tests/unit/test_policies_summary.py)

class Candidate(Protocol):
    """One row of the server's candidate table (`client.client.VariantInfo` has these)."""

    @property
    def name(self) -> str: ...
    @property
    def accuracy(self) -> float: ...
    @property
    def predicted_p50_ms(self) -> float: ...


def pareto_statics(table: Sequence[Candidate], cap: int = 5, always: Iterable[str] = ("full",)
                   ) -> list[str]:
    """Names of the static candidates to pin, fastest first: the Pareto front on (predicted p50
    ascending, accuracy), i.e. each kept candidate is more accurate than every faster one, plus
    the fastest and ``always`` (if present); above ``cap``, middle ones are dropped evenly (the
    fastest, the most accurate and ``always`` stay)."""
    ordered = sorted(table, key=lambda c: (c.predicted_p50_ms, -c.accuracy))
    if not ordered:
        return []
    front: list[Candidate] = []
    for c in ordered:
        if not front or c.accuracy > max(f.accuracy for f in front):
            front.append(c)
    names = [c.name for c in front]
    for name in always:
        if name in {c.name for c in ordered} and name not in names:
            names.append(name)
    p50 = {c.name: c.predicted_p50_ms for c in ordered}
    names.sort(key=lambda n: p50[n])
    required = {names[0], max(front, key=lambda c: c.accuracy).name} | (set(always) & set(names))
    if len(names) <= cap:
        return names
    others = [n for n in names if n not in required]
    k = max(cap - len(required), 0)
    kept = {others[math.floor((j + 0.5) * len(others) / k)] for j in range(k)} if k else set()
    return [n for n in names if n in required or n in kept]


def correct_in_budget(records: Iterable[Record]) -> int:
    """Samples classified correctly in answers that arrived within their budget."""
    return sum(r.correct or 0 for r in records if r.met and r.correct is not None)


def run_figures(records: Sequence[Record], cfg: RunConfig, wall_s: float,
                send_lag_ms: Sequence[float] = ()) -> dict[str, Any]:
    """`client.results.summarize_run`'s figures plus the correct samples delivered in budget."""
    out = summarize_run(records, cfg, wall_s, send_lag_ms)
    out["correct_in_budget"] = correct_in_budget(records)
    return out


def spread(values: Iterable[float | None]) -> dict[str, float | None]:
    """Median, min and max of the values that are not None (all None when none are)."""
    vs = [float(v) for v in values if v is not None]
    if not vs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(vs), "min": min(vs), "max": max(vs)}


def _most_used(runs: Iterable[Mapping[str, Any]]) -> tuple[str, float] | None:
    answers: collections.Counter[str] = collections.Counter()
    for r in runs:
        answers.update(r.get("answers", {}))
    total = sum(answers.values())
    if not total:
        return None
    name, n = answers.most_common(1)[0]
    return name, round(n / total, 5)


def _errors(runs: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    errors: collections.Counter[str] = collections.Counter()
    for r in runs:
        errors.update(r.get("errors_by_code", {}))
        if r.get("client_dropped"):
            errors["CLIENT_DROPPED"] += r["client_dropped"]
    return dict(errors.most_common())


def _agg(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median and [min, max] over repeats of one point's figures."""
    return {
        "repeats": len(runs),
        "offered": spread(r["offered"] for r in runs),
        "attainment": spread(r["attainment"] for r in runs),
        "accuracy": spread(r["accuracy"] for r in runs),
        "goodput_rps": spread(r["goodput_rps"] for r in runs),
        "correct_in_budget": spread(r["correct_in_budget"] for r in runs),
        "p99_ms": spread(r["latency_ms"]["p99"] for r in runs),
        "send_lag_p99_ms": spread(r.get("send_lag_ms", {}).get("p99") for r in runs),
        "factor_before": spread(r.get("server_before", {}).get("safety_factor") for r in runs),
        "failed": spread(r["offered"] - r["answered"] for r in runs),
        "shed": spread(r.get("shed") for r in runs),
        "errors": _errors(runs),
        "most_used": _most_used(runs),
    }


def aggregate_steady(runs: Sequence[Mapping[str, Any]], policies: Sequence[str]
                     ) -> list[dict[str, Any]]:
    """One row per (load, policy), loads ascending and policies in ``policies`` order."""
    rows = []
    for load in sorted({r["load"] for r in runs}):
        for p in policies:
            rs = [r for r in runs if r["load"] == load and r["policy"] == p]
            if rs:
                rows.append({"load": load, "policy": p, **_agg(rs)})
    return rows


def best_static(steady: Sequence[Mapping[str, Any]], reported: Mapping[str, float],
                bar: float = IN_BUDGET_BAR) -> list[dict[str, Any]]:
    """Per load, the pinned policy (a key of ``reported``: policy → the server's accuracy of its
    variant) with the highest reported accuracy whose median in-budget share is ≥ ``bar``
    (ties: the higher measured accuracy); ``policy`` None when no static reaches the bar."""
    out = []
    for load in sorted({row["load"] for row in steady}):
        ok = [row for row in steady if row["load"] == load and row["policy"] in reported
              and (row["attainment"]["median"] or 0.0) >= bar]
        if not ok:
            out.append({"load": load, "policy": None})
            continue
        best = max(ok, key=lambda row: (reported[row["policy"]], row["accuracy"]["median"] or 0.0))
        out.append({"load": load, "policy": best["policy"],
                    "reported_accuracy": reported[best["policy"]],
                    "attainment": best["attainment"]["median"],
                    "accuracy": best["accuracy"]["median"]})
    return out


def aggregate_varying(runs: Sequence[Mapping[str, Any]], policies: Sequence[str]
                      ) -> list[dict[str, Any]]:
    """Per policy: the whole scenario's figures and each phase's, median and [min, max] over
    repeats (each run: ``policy``, the figures of `run_figures` and ``phases``, a list of them)."""
    out = []
    for p in policies:
        rs = [r for r in runs if r["policy"] == p]
        if not rs:
            continue
        phases = [_agg([r["phases"][i] for r in rs]) for i in range(len(rs[0]["phases"]))]
        out.append({"policy": p, **_agg(rs), "phases": phases})
    return out


def _row(rows: Sequence[Mapping[str, Any]], load: float, policy: str) -> Mapping[str, Any] | None:
    return next((r for r in rows if r["load"] == load and r["policy"] == policy), None)


def _med(row: Mapping[str, Any] | None, key: str) -> float | None:
    return None if row is None else row[key]["median"]


def _pt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.2f} pt"


def _target(tid: str, target: str, wanted: str, measured: str, passed: bool | None,
            **values: Any) -> dict[str, Any]:
    return {"id": tid, "target": target, "wanted": wanted, "measured": measured,
            "passed": passed, "values": values}


def evaluate_targets(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's targets, from ``summary``'s ``steady``, ``best_static``, ``varying`` and
    ``calibration["fastest"]``: one row per target and load with the measured values and
    ``passed`` (None: not measurable in this run, e.g. no static reached 95 % at that load).
    Medians over repeats throughout; accuracy is that of the answered samples."""
    steady = summary["steady"]
    fastest = f"pinned {summary['calibration']['fastest']}"
    loads = sorted({r["load"] for r in steady})
    rows = []
    for load in loads:
        a, f = _row(steady, load, ADAPTIVE), _row(steady, load, fastest)
        att_a, att_f = _med(a, "attainment"), _med(f, "attainment")
        acc_a, acc_f = _med(a, "accuracy"), _med(f, "accuracy")
        if 0.5 <= load <= 2:
            rows.append(_target(
                f"in_budget_{load:g}x", f"{load:g}x: adaptive in budget", "≥ 98%", percent(att_a),
                None if att_a is None else att_a >= 0.98, adaptive=att_a))
            gap = None if acc_a is None or acc_f is None else acc_a - acc_f
            rows.append(_target(
                f"accuracy_vs_fastest_{load:g}x", f"{load:g}x: accuracy, adaptive − {fastest}",
                "≥ +1 pt", f"{_pt(gap)} ({percent(acc_a, 2)} vs {percent(acc_f, 2)})",
                None if gap is None else gap >= 0.01 - 1e-9, adaptive=acc_a, fastest=acc_f,
                gap=gap))
        if load >= 4:
            gap = None if att_a is None or att_f is None else att_a - att_f
            rows.append(_target(
                f"in_budget_vs_fastest_{load:g}x", f"{load:g}x: in budget, adaptive − {fastest}",
                "≥ −1 pt", f"{_pt(gap)} ({percent(att_a)} vs {percent(att_f)})",
                None if gap is None else gap >= -0.01 - 1e-9, adaptive=att_a, fastest=att_f,
                gap=gap))
    for best in summary["best_static"]:
        load = best["load"]
        acc_a = _med(_row(steady, load, ADAPTIVE), "accuracy")
        if best["policy"] is None:
            rows.append(_target(f"accuracy_vs_best_static_{load:g}x",
                                f"{load:g}x: accuracy, adaptive − best static in hindsight",
                                "≥ −0.3 pt", f"no static ≥ {100 * IN_BUDGET_BAR:.0f}% in budget",
                                None, adaptive=acc_a, best_static=None))
            continue
        acc_b = best["accuracy"]
        gap = None if acc_a is None or acc_b is None else acc_a - acc_b
        rows.append(_target(
            f"accuracy_vs_best_static_{load:g}x",
            f"{load:g}x: accuracy, adaptive − best static in hindsight ({best['policy']})",
            "≥ −0.3 pt", f"{_pt(gap)} ({percent(acc_a, 2)} vs {percent(acc_b, 2)})",
            None if gap is None else gap >= -0.003 - 1e-9, adaptive=acc_a, best_static=acc_b,
            gap=gap))
    goodput = {load: _med(_row(steady, load, ADAPTIVE), "goodput_rps") for load in loads}
    measured = {k: v for k, v in goodput.items() if v is not None}
    if measured:
        top = max(loads)
        peak_load = max(measured, key=lambda k: measured[k])
        peak, at_top = measured[peak_load], goodput[top]
        ratio = None if at_top is None or not peak else at_top / peak
        rows.append(_target(
            f"goodput_{top:g}x", f"{top:g}x: adaptive goodput ÷ its peak over the loads",
            "≥ 90%", "-" if ratio is None else
            f"{100 * ratio:.1f}% ({at_top:.1f}/s vs {peak:.1f}/s at {peak_load:g}x)",
            None if ratio is None else ratio >= 0.9 - 1e-9, goodput=at_top, peak=peak,
            peak_load=peak_load, ratio=ratio))
    varying = summary.get("varying")
    if varying and varying.get("by_policy"):
        cib = {row["policy"]: row["correct_in_budget"]["median"] for row in varying["by_policy"]}
        others = {p: v for p, v in cib.items() if p != ADAPTIVE and v is not None}
        mine = cib.get(ADAPTIVE)
        rival = max(others, key=lambda p: others[p]) if others else None
        passed = None if mine is None or rival is None else mine > others[rival]
        rows.append(_target(
            "varying_correct_in_budget", "time-varying load: adaptive delivers the most correct "
            "answers in budget", "most of all policies",
            "-" if mine is None or rival is None else
            f"{mine:.0f} vs {others[rival]:.0f} ({rival}, the best other)",
            passed, adaptive=mine, best_other=rival,
            best_other_value=None if rival is None else others[rival]))
    verdicts = [r["passed"] for r in rows]
    return {"rows": rows, "passed": verdicts.count(True), "failed": verdicts.count(False),
            "not_evaluated": verdicts.count(None)}


def parse_phases(text: str) -> list[tuple[float, float]]:
    """``"0.5:4,4:4"`` → [(load, seconds), ...]."""
    out = []
    for item in text.split(","):
        load, _, seconds = item.partition(":")
        try:
            pair = (float(load), float(seconds))
        except ValueError:
            raise ValueError(f"phases {text!r}: expected LOAD:SECONDS,...") from None
        if pair[0] <= 0 or pair[1] <= 0:
            raise ValueError(f"phases {text!r}: loads and seconds must be positive")
        out.append(pair)
    return out


def rotated(names: Sequence[str], k: int) -> list[str]:
    k %= len(names)
    return [*names[k:], *names[:k]]


# --- text tables (printed at the end) ------------------------------------------------------------

def _range(s: Mapping[str, float | None], fmt: str = "pct") -> str:
    def f(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.1f}" if fmt == "pct" else f"{v:.1f}"

    if s["median"] is None:
        return "-"
    mid = f(s["median"]) + ("%" if fmt == "pct" else "")
    return mid if s["min"] == s["max"] else f"{mid} [{f(s['min'])}–{f(s['max'])}]"


def steady_text(summary: Mapping[str, Any]) -> str:
    best = {b["load"]: b["policy"] for b in summary["best_static"]}
    rows = []
    for row in summary["steady"]:
        top = row["most_used"]
        acc = row["accuracy"]
        rows.append([f"{row['load']:g}x", row["policy"] + (" *" if best.get(row["load"]) ==
                                                           row["policy"] else ""),
                     _range(row["attainment"]),
                     "-" if acc["median"] is None else f"{100 * acc['median']:.2f}%",
                     _range(row["goodput_rps"], "num"),
                     f"{row['correct_in_budget']['median']:.0f}",
                     "-" if row["p99_ms"]["median"] is None else f"{row['p99_ms']['median']:.1f}",
                     str(sum(row["errors"].values())),
                     "-" if top is None else f"{top[0]} ({100 * top[1]:.0f}%)"])
    return text_table(["load", "policy (* best static)", "in budget", "accuracy", "goodput/s",
                       "correct in budget", "p99 ms", "errors", "most used"], rows)


def varying_text(summary: Mapping[str, Any]) -> str:
    v = summary["varying"]
    labels = [f"{p['load']:g}x {p['seconds']:g}s" for p in v["phases"]]
    rows = []
    for row in v["by_policy"]:
        acc = row["accuracy"]["median"]
        rows.append([row["policy"], _range(row["correct_in_budget"], "num"),
                     _range(row["attainment"]), "-" if acc is None else f"{100 * acc:.2f}%",
                     *(percent(ph["attainment"]["median"]) for ph in row["phases"])])
    return text_table(["policy", "correct in budget", "in budget", "accuracy",
                       *(f"in budget {lab}" for lab in labels)], rows)


def targets_text(targets: Mapping[str, Any]) -> str:
    verdict = {True: "pass", False: "FAIL", None: "n/a"}
    return text_table(["target", "wanted", "measured", ""],
                      [[t["target"], t["wanted"], t["measured"], verdict[t["passed"]]]
                       for t in targets["rows"]])


# --- the server and the runs ---------------------------------------------------------------------

def server_busy(metrics_url: str) -> float:
    """Requests in flight plus samples queued, from the server's /metrics."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name in ("adaptive_inflight_requests", "adaptive_queue_depth"))


GAUGES = {"adaptive_router_safety_factor": ("safety_factor", 1.0),
          "adaptive_router_margin_seconds": ("margin_ms", 1e3),
          "adaptive_router_miss_ratio": ("miss_ratio", 1.0),
          "adaptive_router_overhead_seconds": ("overhead_ms", 1e3),
          "adaptive_shed_total": ("shed_total", 1.0)}


def server_state(metrics_url: str) -> dict[str, float]:
    """The router's learned state from /metrics: its safety factor, overhead (ms), observed
    miss ratio, and requests shed so far. It carries over from one run to the next."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in GAUGES:
                key, scale = GAUGES[s.name]
                out[key] = round(out.get(key, 0.0) + s.value * scale, 4)
    return out


def wait_idle(metrics_url: str, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server_busy(metrics_url) == 0:
            return
        time.sleep(0.25)  # polling the server's gauges: there is no event to wait on
    log.warning("server still busy after %.0f s; going on", timeout)


def idle_state(metrics_url: str) -> dict[str, float]:
    """Wait until the server is idle; then its router's state (`server_state`)."""
    wait_idle(metrics_url)
    return server_state(metrics_url)


def policy_dir(policy: str) -> str:
    return policy.replace(", ", "-").replace(" ", "-").replace("@", "-at-")


def start_server(stack: contextlib.ExitStack, family_dir: Path, flags: list[str]
                 ) -> tuple[str, str]:
    """`adaptive-inference serve` until ``stack`` closes; its target and metrics URL."""
    srv = start_serving(stack, family_dir, flags, label="bench-serve")
    assert srv.metrics_url is not None
    log.info("server %s ready (flags %r); its log: %s", srv.target, " ".join(flags), srv.log_path)
    return srv.target, srv.metrics_url


class Server:
    """The measured server: one for the whole comparison, or a fresh one per run
    (``--fresh-server``) so that no run inherits the router state another left behind."""

    def __init__(self, family_dir: Path, flags: list[str], fresh: bool) -> None:
        self.family_dir, self.flags, self.fresh = family_dir, flags, fresh
        self.stack = contextlib.ExitStack()
        self.target, self.metrics_url = start_server(self.stack, family_dir, flags)
        self.used = False

    def before_run(self) -> dict[str, float]:
        """Idle (restarted first with ``fresh``, except for the first run): the router's state."""
        if self.fresh and self.used:
            self.stack.close()
            self.stack = contextlib.ExitStack()
            self.target, self.metrics_url = start_server(self.stack, self.family_dir, self.flags)
        self.used = True
        return idle_state(self.metrics_url)

    def close(self) -> None:
        self.stack.close()


def _log_run(label: str, policy: str, fig: Mapping[str, Any]) -> None:
    top = next(iter(fig["share"].items()), ("-", 0.0))
    errors = ", ".join(f"{k} {v}" for k, v in fig["errors_by_code"].items()) or "0"
    if fig["client_dropped"]:
        errors += f", dropped {fig['client_dropped']}"
    factor = (fig["server_before"].get("safety_factor"), fig["server_after"].get("safety_factor"))
    log.info("%-12s %-26s offered %5d  in budget %6s  goodput %6.1f/s  accuracy %7s  "
             "correct in budget %6d  p99 %s ms  errors %s (shed %d)  most used %s (%.0f%%)  send lag "
             "p99 %s ms  router safety factor %s → %s", label, policy, fig["offered"],
             percent(fig["attainment"]), fig["goodput_rps"], percent(fig["accuracy"], 2),
             fig["correct_in_budget"], fig["latency_ms"]["p99"], errors, fig["shed"], top[0],
             100 * top[1], fig["send_lag_ms"]["p99"], *factor)


def _server_delta(fig: dict[str, Any], before: dict[str, float], after: dict[str, float]) -> None:
    """The router's state before and after a run, and the requests it shed during it."""
    fig["server_before"], fig["server_after"] = before, after
    fig["shed"] = int(after.get("shed_total", 0.0) - before.get("shed_total", 0.0))


async def measure(server: Server, model: str, data: TestData, args: argparse.Namespace,
                  policies: Mapping[str, str | None], base: RunConfig, capacity: float,
                  loads: Sequence[float], phases: Sequence[tuple[float, float]], out: Path
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every steady run, then every varying run (each server-idle first); their figures."""
    names = list(policies)
    steady: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for i, load in enumerate(loads):
            seed = 1000 * rep + i
            for k, policy in enumerate(rotated(names, rep + i)):
                before = await asyncio.to_thread(server.before_run)
                cfg = replace(base, rate=load * capacity, seconds=args.seconds,
                              variant=policies[policy], seed=seed)
                res = await run_open_loop(server.target, model, data, cfg)
                fig = run_figures(res.records, cfg, res.wall_s, res.send_lag_ms)
                _server_delta(fig, before, await asyncio.to_thread(idle_state, server.metrics_url))
                csv = out / "runs" / policy_dir(policy) / f"{load:g}x-r{rep}.csv"
                csv.parent.mkdir(parents=True, exist_ok=True)
                write_records_csv(csv, res.records, [cfg.rate])
                steady.append({"policy": policy, "load": load, "repeat": rep, "seed": seed,
                               "order": k, "records_csv": os.path.relpath(csv, out), **fig})
                _log_run(f"{load:g}x r{rep + 1}", policy, fig)
    varying: list[dict[str, Any]] = []
    if not phases:
        return steady, varying
    plan = [Phase(load * capacity, seconds) for load, seconds in phases]
    total = sum(p.seconds for p in plan)
    for rep in range(args.repeats):
        seed = 9000 + rep
        for k, policy in enumerate(rotated(names, rep)):
            before = await asyncio.to_thread(server.before_run)
            cfg = replace(base, rate=sum(p.rate * p.seconds for p in plan) / total, seconds=total,
                          variant=policies[policy], seed=seed)
            res = await run_phases(server.target, model, data, cfg, plan)
            fig = run_figures(res.records, cfg, res.wall_s, res.send_lag_ms)
            _server_delta(fig, before, await asyncio.to_thread(idle_state, server.metrics_url))
            fig["phases"] = [
                run_figures([r for r in res.records if r.phase == j],
                            replace(cfg, rate=ph.rate, seconds=ph.seconds), res.wall_s)
                for j, ph in enumerate(plan)]
            csv = out / "runs" / policy_dir(policy) / f"varying-r{rep}.csv"
            csv.parent.mkdir(parents=True, exist_ok=True)
            write_records_csv(csv, res.records, [p.rate for p in plan])
            varying.append({"policy": policy, "repeat": rep, "seed": seed, "order": k,
                            "records_csv": os.path.relpath(csv, out), **fig})
            _log_run(f"varying r{rep + 1}", policy, fig)
            log.info("%-12s %-26s in budget per phase: %s", "", policy, "  ".join(
                f"{ld:g}x {percent(ph['attainment'])}" for (ld, _), ph in zip(phases, fig["phases"],
                                                                          strict=True)))
    return steady, varying


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--family", default="families/mnist5k")
    ap.add_argument("--loads", default="0.5,1,2,4,8",
                    help="steady offered loads in multiples of full's capacity")
    ap.add_argument("--repeats", type=int, default=3, help="runs per point (median and spread)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per steady load, policy and repeat")
    ap.add_argument("--varying", default=VARYING, metavar="LOAD:SECONDS,...",
                    help=f"the time-varying scenario's phases (default {VARYING})")
    ap.add_argument("--no-varying", action="store_true", help="skip the time-varying scenario")
    ap.add_argument("--max-statics", type=int, default=5,
                    help="at most this many pinned static candidates (default 5)")
    ap.add_argument("--images", type=int, default=32,
                    help="images per request (default 32, the server's batch limit: full's "
                         "compute then outweighs the gRPC round trip); 0: the fewest for which "
                         "full's predicted compute reaches --min-compute-ms")
    ap.add_argument("--min-compute-ms", type=float, default=20.0)
    ap.add_argument("--budget-range", type=float, default=2.0,
                    help="budgets uniform over [p99, RANGE x p99] of full's idle round trip")
    ap.add_argument("--serve-args", default="",
                    help="extra `adaptive-inference serve` flags, for experiments only (make "
                         "bench uses none: the comparison is of the defaults)")
    ap.add_argument("--fresh-server", action="store_true",
                    help="restart the server before every run (no run inherits what the router "
                         "learned in the one before; make bench keeps one server)")
    ap.add_argument("--out", default="results/bench/policies")
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the servers this script started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.repeats < 1 or args.seconds <= 0 or args.max_statics < 2:
        ap.error("--repeats ≥ 1, --seconds > 0 and --max-statics ≥ 2, please")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    family_dir = (ROOT / args.family).resolve()
    fam = load_family(family_dir)
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    loads = [float(v) for v in args.loads.split(",") if v.strip()]
    phases = [] if args.no_varying else parse_phases(args.varying)
    data = load_test_data(None, family_dir)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    load_avg_start = host_info()["load_average"]
    t_start = time.perf_counter()
    flags = shlex.split(args.serve_args)

    # Calibration on a server of its own: the measured server's router then learns from the
    # measured runs alone.
    with contextlib.ExitStack() as stack:
        target, _ = start_server(stack, family_dir, flags)
        with AdaptiveClient(target) as client:
            images = args.images or choose_images(
                lambda b: next(v.predicted_p50_ms for v in client.variants(batch_size=b)
                               if v.name == "full"), IMAGE_CHOICES, args.min_compute_ms)
            x = data.x[:images]
            table = client.variants(batch_size=images)
            statics = pareto_statics(table, args.max_statics)
            fastest = statics[0]
            # Three blocks, the median block's p99: one burst of a neighbour's CPU use must not
            # set the budgets for the whole run.
            blocks = [sequential_ms(client, x, 100, variant="full", warmup=10) for _ in range(3)]
            idle_fastest = sequential_ms(client, x, 100, variant=fastest, warmup=10)
        saturated = asyncio.run(closed_loop(target, fam.name, x, variant="full", concurrency=8,
                                            seconds=5.0, timeout_s=30.0))
    idle = np.concatenate(blocks)
    p50, p95 = (float(np.percentile(idle, q)) for q in (50, 95))
    p99 = float(np.median([np.percentile(b, 99) for b in blocks]))
    budget = BudgetSpec.parse(f"uniform:{p99:.3f}:{args.budget_range * p99:.3f}")
    if saturated.errors:
        log.warning("capacity run: errors %s", saturated.errors)
    capacity = saturated.rps
    policies: dict[str, str | None] = {ADAPTIVE: None, **{f"pinned {s}": s for s in statics}}
    log.info("%d images/request; full idle round trip p50 %.2f / p95 %.2f / p99 %.2f ms; "
             "capacity %.1f req/s; budgets %s ms; statics %s (fastest %s, idle p50 %.2f ms)",
             images, p50, p95, p99, capacity, budget, ", ".join(statics), fastest,
             float(np.median(idle_fastest)))
    base = RunConfig(rate=capacity, seconds=args.seconds, budget=budget, images=images,
                     deadline_is_budget=True)
    server = Server(family_dir, flags, args.fresh_server)
    try:
        with AdaptiveClient(server.target) as client:  # the fresh server's table (what it ranks by)
            table = client.variants(batch_size=images)
        runs, varying_runs = asyncio.run(measure(server, fam.name, data, args, policies, base,
                                                 capacity, loads, phases, out))
        final_state = server_state(server.metrics_url)
    finally:
        server.close()

    info = {v.name: v for v in table}
    reported = {p: info[v].accuracy for p, v in policies.items() if v is not None}
    steady = aggregate_steady(runs, list(policies))
    summary: dict[str, Any] = {
        "schema": 2,
        "started": started, "seconds_total": round(time.perf_counter() - t_start, 1),
        "family": fam.name, "family_dir": os.path.relpath(family_dir, ROOT),
        "host": host_span(load_avg_start), "serve_args": flags,
        "calibration": {
            "images_per_request": images,
            "full_idle_ms": {"p50": round(p50, 3), "p95": round(p95, 3), "p99": round(p99, 3)},
            "fastest": fastest, "fastest_idle_p50_ms": round(float(np.median(idle_fastest)), 3),
            "capacity_rps": round(capacity, 2), "budget_ms": str(budget),
            "seconds_per_point": args.seconds, "repeats": args.repeats,
            "deadline_is_budget": True, "max_statics": args.max_statics,
            "separate_server": True,  # calibrated on a server of its own, then a fresh one
            "fresh_server_per_run": args.fresh_server,
            "server_variants": [
                {"name": v.name, "accuracy": v.accuracy, "predicted_p50_ms": v.predicted_p50_ms,
                 "predicted_p95_ms": v.predicted_p95_ms} for v in table]},
        "policies": {p: {"variant": v, "dir": policy_dir(p),
                         "reported_accuracy": None if v is None else info[v].accuracy,
                         "predicted_p50_ms": None if v is None else info[v].predicted_p50_ms}
                     for p, v in policies.items()},
        "loads": loads,
        "server_state_end": final_state,
        "runs": runs,
        "steady": steady,
        "best_static": best_static(steady, reported),
        "varying": None if not phases else {
            "phases": [{"load": ld, "seconds": s, "rate": round(ld * capacity, 3)}
                       for ld, s in phases],
            "runs": varying_runs,
            "by_policy": aggregate_varying(varying_runs, list(policies))},
    }
    summary["targets"] = evaluate_targets(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nSteady loads (median [min–max] over repeats; * = best static in hindsight):\n")
    print(steady_text(summary))
    if summary["varying"]:
        print("\nTime-varying load (" + " → ".join(
            f"{p['load']:g}x {p['seconds']:g} s" for p in summary["varying"]["phases"]) + "):\n")
        print(varying_text(summary))
    print("\nTargets:\n")
    print(targets_text(summary["targets"]))
    log.info("policy comparison written to %s (%.0f s)", out / "summary.json",
             summary["seconds_total"])


if __name__ == "__main__":
    main()
