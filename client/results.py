"""What load runs produced, in figures: summaries, text tables, the per-request CSV, host info.

Everything here reads `client.loadgen.Record`s (or the figures made from them) and measures
nothing, so the bench command, the demo and the benchmark scripts report the same quantities the
same way:

- `summarize_run`: one run's figures for ``results.json`` (throughput, budget attainment,
  goodput, latency percentiles, accuracy, share of each variant/exit, errors by status);
- `summary_table` (the bench command's table of those figures) and `compare_policies` (the
  demo's table: adaptive against pinned, per phase of its ramp), both through `text_table`;
- `write_records_csv` / `read_records`: ``requests.csv``, one row per arrival;
- `host_info` / `host_span`: the machine a figure was measured on.
"""

from __future__ import annotations

import collections
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.loadgen import DROPPED, OK, THROTTLED, Phase, Record, RunConfig

CSV_HEADER = "run,offered_rps,budget_ms,status,candidate,latency_ms,correct,samples"


# --- one run's figures ---------------------------------------------------------------------------

def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def summarize_run(records: Sequence[Record], cfg: RunConfig, wall_s: float,
                  send_lag_ms: Sequence[float] = ()) -> dict[str, Any]:
    """The figures of one run (see `client.loadgen` for how counts relate). Latency runs from
    when a request left the client; ``send_lag_ms`` says how far that trailed the arrival
    schedule (large values: the client, not the server, limited the offered load)."""
    offered = len(records)
    dropped = sum(r.status == DROPPED for r in records)
    throttled = sum(r.status == THROTTLED for r in records)
    sent = offered - dropped - throttled
    ok = [r for r in records if r.status == OK]
    errors = collections.Counter(r.status for r in records
                                 if r.status not in (OK, DROPPED, THROTTLED))
    met = sum(r.met for r in records)
    lat = [r.latency_ms for r in ok]
    judged = [r for r in ok if r.correct is not None]
    samples = sum(r.samples for r in judged)
    correct = sum(r.correct or 0 for r in judged)
    used = collections.Counter(r.candidate or "?" for r in ok)
    out: dict[str, Any] = {
        "offered_rps": cfg.rate, "seconds": cfg.seconds, "wall_s": round(wall_s, 3),
        "offered": offered, "sent": sent, "answered": len(ok), "errors": sum(errors.values()),
        "client_dropped": dropped, "client_throttled": throttled,
        "errors_by_code": dict(errors.most_common()),
        "met": met,
        "throughput_rps": round(len(ok) / cfg.seconds, 3),
        "goodput_rps": round(met / cfg.seconds, 3),
        "attainment": round(met / offered, 5) if offered else None,
        "latency_ms": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99),
                       "mean": round(float(np.mean(lat)), 3) if lat else None,
                       "max": round(max(lat), 3) if lat else None},
        "accuracy": round(correct / samples, 5) if samples else None,
        "samples_judged": samples,
        "share": {c: round(k / len(ok), 5) for c, k in used.most_common()},
        "answers": dict(used.most_common()),
        "send_lag_ms": {"p50": _pct(send_lag_ms, 50), "p99": _pct(send_lag_ms, 99),
                        "max": round(max(send_lag_ms), 3) if len(send_lag_ms) else None},
    }
    if cfg.budget.discrete and len(cfg.budget.values) > 1:
        by: dict[str, dict[str, Any]] = {}
        for b in cfg.budget.values:
            rs = [r for r in records if r.budget_ms == b]
            key = "none" if b is None else f"{b:g}"
            by[key] = {"requests": len(rs),
                       "attainment": round(sum(r.met for r in rs) / len(rs), 5) if rs else None}
        out["by_budget"] = by
    return out


# --- text tables ---------------------------------------------------------------------------------

def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Fixed-width columns, two spaces apart, a dashed rule under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _errors_line(errors: collections.Counter[str]) -> list[str]:
    return ["errors: " + ", ".join(f"{k} {v}" for k, v in errors.most_common())] if errors else []


def summary_table(results: dict[str, Any]) -> str:
    """The per-rate figures of a bench ``results.json`` as a table (the CLI prints it)."""
    header = ["offered/s", "sent", "answered", "errors", "tput/s", "in budget", "goodput/s",
              "p50 ms", "p95 ms", "p99 ms", "accuracy", "most used"]
    rows = []
    for r in results["runs"]:
        lat = r["latency_ms"]
        top = next(iter(r["share"].items()), None)
        rows.append([f"{r['offered_rps']:g}", str(r["sent"]), str(r["answered"]), str(r["errors"]),
                     f"{r['throughput_rps']:.1f}",
                     "-" if r["attainment"] is None else f"{100 * r['attainment']:.1f}%",
                     f"{r['goodput_rps']:.1f}",
                     *("-" if lat[q] is None else f"{lat[q]:.2f}" for q in ("p50", "p95", "p99")),
                     "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%",
                     "-" if top is None else f"{top[0]} ({100 * top[1]:.0f}%)"])
    errors: collections.Counter[str] = collections.Counter()
    for r in results["runs"]:
        errors.update(r["errors_by_code"])
    kept = sum(r.get("client_throttled", 0) for r in results["runs"])
    throttled = [f"kept back by the client's throttle (not sent): {kept}"] if kept else []
    return "\n".join([text_table(header, rows), *_errors_line(errors), *throttled])


def _ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.2f}" if values else "-"


def percent(v: float | None, nd: int = 1) -> str:
    """A share 0..1 as text for tables: ``"97.5%"``, or ``"-"`` when there is none."""
    return "-" if v is None else f"{100 * v:.{nd}f}%"


def _share(num: int, den: int) -> str:
    return f"{100.0 * num / den:.1f}%" if den else "-"


def in_budget_share(records: Sequence[Record]) -> float:
    """Share of the arrivals answered within their budget (0 for none)."""
    return sum(r.met for r in records) / len(records) if records else 0.0


def judged_accuracy(records: Sequence[Record]) -> float | None:
    """Correct samples over judged samples (None: nothing judged, e.g. no labels)."""
    judged = [r for r in records if r.correct is not None]
    samples = sum(r.samples for r in judged)
    return sum(r.correct or 0 for r in judged) / samples if samples else None


def _mix(records: Sequence[Record], top: int = 3) -> str:
    """The ``top`` candidates that answered most, as shares of all arrivals."""
    used = collections.Counter(r.candidate or "?" for r in records if r.status == OK)
    if not used:
        return "-"
    n = len(records)
    shown = [f"{c} {100 * k / n:.0f}%" for c, k in used.most_common(top)]
    rest = sum(used.values()) - sum(k for _, k in used.most_common(top))
    return ", ".join(shown + ([f"other {100 * rest / n:.0f}%"] if rest else []))


def compare_policies(records: dict[str, list[Record]], phases: Sequence[Phase],
                     loads: Sequence[float]) -> str:
    """The demo's tables: per phase (``loads[i]`` x the reference's capacity) and policy, the
    in-budget share, accuracy of the answers, correct answers in budget per second, the requests
    failed (shed: DEADLINE_EXCEEDED) and the variant/exit mix; then, per policy, the whole ramp's
    answers by candidate."""
    rows: list[list[str]] = []
    for i, (phase, load) in enumerate(zip(phases, loads, strict=True)):
        for k, (policy, recs) in enumerate(records.items()):
            rs = [r for r in recs if r.phase == i]
            ok = [r for r in rs if r.status == OK]
            acc = judged_accuracy(ok)
            good = sum(r.correct or 0 for r in rs if r.met and r.correct is not None)
            failed = len(rs) - len(ok)
            rows.append([f"{load:g}x" if k == 0 else "", f"{phase.rate:.0f}/s" if k == 0 else "",
                         policy, str(len(rs)), f"{100 * in_budget_share(rs):.1f}%",
                         "-" if acc is None else f"{100 * acc:.2f}%",
                         f"{good / phase.seconds:.0f}", _share(failed, len(rs)),
                         _ms([r.latency_ms for r in ok], 99), _mix(rs)])
    out = [text_table(["load", "offered", "policy", "requests", "in budget", "accuracy",
                       "correct in budget/s", "failed", "p99 ms", "answered by (% of requests)"],
                      rows)]
    for policy, recs in records.items():
        errors = collections.Counter(r.status for r in recs if r.status != OK)
        out += [f"{policy}: " + ", ".join(f"{k} {v}" for k, v in errors.most_common())
                if errors else f"{policy}: no errors"]
    return "\n".join(out)


# --- requests.csv --------------------------------------------------------------------------------

def write_records_csv(path: Path, records: Sequence[Record], rates: Sequence[float]) -> Path:
    """One row per arrival; ``rates[r.phase]`` is the rate its run offered."""
    with path.open("w") as fh:
        fh.write(CSV_HEADER + "\n")
        for r in records:
            budget = "" if r.budget_ms is None else f"{r.budget_ms:.4f}"
            fh.write(f"{r.phase},{rates[r.phase]:g},{budget},{r.status},{r.candidate or ''},"
                     f"{r.latency_ms:.4f},{'' if r.correct is None else r.correct},{r.samples}\n")
    return path


def read_records(path: Path) -> list[Record]:
    """``requests.csv`` back into records (for plots across several bench runs)."""
    out = []
    with path.open() as fh:
        next(fh)
        for line in fh:
            run, _rate, budget, status, cand, lat, correct, samples = line.rstrip("\n").split(",")
            out.append(Record(int(run), float(budget) if budget else None, status, cand or None,
                              float(lat), int(correct) if correct else None, int(samples)))
    return out


# --- the host ------------------------------------------------------------------------------------

def host_info() -> dict[str, Any]:
    """The machine, and its load average now (1, 5, 15 min): on a shared host the neighbours'
    load is part of every latency figure."""
    return {"cpus": os.cpu_count(), "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def host_span(load_average_start: Sequence[float]) -> dict[str, Any]:
    """`host_info` for a measurement that began when the load average was
    ``load_average_start``: its ``load_average`` becomes ``load_average_start`` / ``_end``."""
    host = host_info()
    end = host.pop("load_average")
    return {**host, "load_average_start": list(load_average_start), "load_average_end": end}
