"""`adaptive-inference demo`: adaptive routing against pinned `full`, on a load ramp crossing
`full`'s capacity on this host.

1. ``families/demo`` is reused when it loads and verifies; otherwise ``configs/demo.toml`` is built
   into it (a lighter preset than the default family, so a fresh clone finishes in minutes).
2. Two ``adaptive-inference serve`` child processes with default flags, on free loopback ports,
   started one after the other (each re-measures its variants at start; doing it at once would
   slow both): one answers adaptively, the other gets every request pinned to the reference
   (``full``: the request's ``model_version``). Their logs go to temp files. A server of its
   own per policy, so what one router learns never comes from the other policy's traffic.
3. Calibration, on the pinned server (before any ramp): images per request (the fewest, from
   `IMAGE_CHOICES`, for which ``full``'s predicted compute reaches `MIN_COMPUTE_MS`: the model,
   not the gRPC round trip, must dominate); the idle round trip of pinned ``full``
   (`client.loadgen.sequential_ms`), whose p99 sets the budgets, uniform over [p99, 2 x p99] as
   in ``bench/policies.py`` (a range ``full`` just meets when idle); ``full``'s capacity
   (`client.loadgen.closed_loop`, 8 requests always in flight).
4. The ramp: phases at `DEFAULT_LOADS` x that capacity, back to back (`client.loadgen.run_phases`),
   the family's held-out test images so accuracy is real, gRPC deadline = budget. Adaptive first,
   then pinned, with the same seed: the same arrivals, budgets and images (a paired comparison).
5. The report (`client.results.compare_policies`): per phase and policy the in-budget share,
   the accuracy of what was answered, requests shed and the variant/exit mix; one sentence of the
   result at the top load; a PNG (`plot`). Then the servers stop (SIGTERM).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.budgets import BudgetSpec
from client.loadgen import (
    OK,
    Phase,
    Record,
    RunConfig,
    TestData,
    choose_images,
    closed_loop,
    load_test_data,
    run_phases,
    sequential_ms,
)
from client.results import compare_policies, in_budget_share, judged_accuracy
from compression.core.errors import BuildError, FamilyError
from compression.core.family import Family, load_family

log = logging.getLogger(__name__)

ADAPTIVE = "adaptive"
REFERENCE = "full"  # the variant the other server pins every request to
DEFAULT_LOADS = (0.5, 1.0, 2.0, 3.0)  # multiples of the reference's capacity (see run_demo)
PHASE_SECONDS = 4.0
IMAGE_CHOICES = (8, 16, 32, 64, 128, 256)
# full's predicted compute per request: well above the gRPC round trip (~1 ms of CPU per request
# in client and server together), so that cheaper variants buy real capacity.
MIN_COMPUTE_MS = 4.0
BUDGET_RANGE = 2.0  # budgets uniform over [p99, BUDGET_RANGE x p99] of full's idle round trip
IDLE_REQUESTS = 200
CAPACITY_SECONDS = 3.0
CAPACITY_CONCURRENCY = 8
MAX_INFLIGHT = 1024  # unanswered requests before arrivals are dropped (the client overloaded)


@dataclass(frozen=True)
class Calibration:
    images: int  # per request
    idle_p50_ms: float  # the reference's idle round trip
    idle_p99_ms: float
    capacity_rps: float  # the reference's closed-loop throughput
    budget: BudgetSpec


@dataclass(frozen=True)
class DemoResult:
    family: str
    variants: list[str]
    reference: str
    calibration: Calibration
    loads: list[float]
    phases: list[Phase]
    records: dict[str, list[Record]]  # policy (ADAPTIVE, "pinned full") → one per arrival
    server_logs: dict[str, str]
    seconds: float  # wall time of the whole run
    plot: Path | None = None

    @property
    def policies(self) -> list[str]:
        return list(self.records)

    def summary(self) -> str:
        """One sentence: the two policies at the top of the ramp."""
        top = len(self.phases) - 1
        a, p = (([r for r in self.records[k] if r.phase == top]) for k in self.policies)
        acc = judged_accuracy([r for r in a if r.status == OK])
        acc_text = "" if acc is None else f" at {100 * acc:.1f} % accuracy"
        return (f"At {self.loads[top]:g}x {self.reference}'s capacity ({self.phases[top].rate:.0f} "
                f"requests/s) the adaptive server answered {100 * in_budget_share(a):.0f} % in "
                f"budget{acc_text}; pinned {self.reference} {100 * in_budget_share(p):.0f} %.")

    def report(self) -> str:
        c = self.calibration
        lo, hi = c.budget.uniform or (0.0, 0.0)
        head = [f"family {self.family!r}: {', '.join(self.variants)}",
                f"{c.images} images per request; pinned {self.reference}'s idle round trip p50 "
                f"{c.idle_p50_ms:.2f} ms, p99 {c.idle_p99_ms:.2f} ms → budgets uniform over "
                f"[{lo:.2f}, {hi:.2f}] ms; {self.reference}'s capacity (closed loop) "
                f"{c.capacity_rps:.0f} requests/s",
                "server logs: " + ", ".join(f"{k} {v}" for k, v in self.server_logs.items())]
        body = compare_policies(self.records, self.phases, self.loads)
        tail = [self.summary()]
        if self.plot is not None:
            tail.append(f"plot: {self.plot}")
        tail.append(f"({self.seconds:.0f} s)")
        return "\n".join([*head, "", body, "", *tail])


def ensure_family(out: Path, config: Path) -> Family:
    """The demo family at ``out``: reused when valid, else built from ``config``."""
    try:
        family = load_family(out)
        log.info("demo family: reusing %s (%d variants)", out, len(family.variants))
        return family
    except FamilyError as exc:
        log.info("demo family: building %s from %s (%s)", out, config, exc)
    from compression.build import build, load_config

    build(load_config(config), out, progress=False)
    return load_family(out)


def test_images(family: Family) -> TestData:
    """The family's held-out test split (same data, seed and fractions as its build); random
    pixels, without labels, for a family whose dataset cannot be loaded here."""
    try:
        return load_test_data(None, family)
    except (BuildError, KeyError, ValueError, OSError) as exc:
        log.warning("demo: no test split for %r (%s); sending random images", family.name, exc)
        return load_test_data("random", family)


def _start(stack: ExitStack, family: Family, label: str) -> tuple[str, str]:
    """A `serve` child with default flags on free ports; its target and log path, once SERVING."""
    from client.process import start_serving

    t0 = time.perf_counter()
    srv = start_serving(stack, family.root, label=f"demo-{label}", metrics=False, ready_timeout=120)
    log.info("demo: %s server ready on %s in %.1f s", label, srv.target, time.perf_counter() - t0)
    return srv.target, srv.log_path


def calibrate(target: str, family: Family, data: TestData, reference: str,
              images: int | None = None) -> Calibration:
    """Images per request, the reference's idle round trip (→ budgets) and its capacity."""
    from client.client import AdaptiveClient

    with AdaptiveClient(target) as client:
        if images is None:
            def predicted(b: int) -> float:
                return next(v.predicted_p50_ms for v in client.variants(batch_size=b)
                            if v.name == reference)
            images = choose_images(predicted, IMAGE_CHOICES, MIN_COMPUTE_MS)
        x = data.x[:images]
        idle = sequential_ms(client, x, IDLE_REQUESTS, variant=reference, warmup=20)
    p50, p99 = float(np.percentile(idle, 50)), float(np.percentile(idle, 99))
    saturated = asyncio.run(closed_loop(target, family.name, x, variant=reference,
                                        concurrency=CAPACITY_CONCURRENCY,
                                        seconds=CAPACITY_SECONDS))
    if saturated.errors:
        log.warning("demo: capacity run errors %s", saturated.errors)
    budget = BudgetSpec.parse(f"uniform:{p99:.3f}:{BUDGET_RANGE * p99:.3f}")
    cal = Calibration(images, p50, p99, saturated.rps, budget)
    log.info("demo: %d images/request; pinned %s idle p50 %.2f ms, p99 %.2f ms; capacity %.0f "
             "requests/s; budgets %s ms", images, reference, p50, p99, cal.capacity_rps, budget)
    return cal


def run_demo(family_dir: Path, config: Path, *, loads: Sequence[float] = DEFAULT_LOADS,
             seconds: float = PHASE_SECONDS, reference: str = REFERENCE,
             images: int | None = None, out_dir: Path | None = Path("results/demo"),
             family: Family | None = None) -> DemoResult:
    """Build or reuse the family, serve it twice (adaptive; every request pinned to
    ``reference``), calibrate on this host, drive the same ramp at each; ``out_dir``: where the
    plot goes (None: no plot).

    The default ramp stops at 3x: on a 2-core host shared by client and servers, 4x full's
    capacity is past what even the cheapest candidate sustains once the per-request gRPC cost is
    paid (every arrival is received and decoded before it can be shed), and both policies
    collapse alike; ``--loads 0.5,1,2,4`` shows it."""
    t0 = time.perf_counter()
    family = family or ensure_family(family_dir, config)
    if reference not in family.variants:
        raise FamilyError(f"demo: family {family.name!r} has no variant {reference!r} to pin; "
                          f"it has {', '.join(family.variants)}")
    data = test_images(family)
    pinned = f"pinned {reference}"
    with ExitStack() as stack:
        targets: dict[str, str] = {}
        logs: dict[str, str] = {}
        for label in (ADAPTIVE, pinned):
            targets[label], logs[label] = _start(stack, family, label.replace(" ", "-"))
        cal = calibrate(targets[pinned], family, data, reference, images)
        phases = [Phase(load * cal.capacity_rps, seconds) for load in loads]
        records: dict[str, list[Record]] = {}
        for label, variant in ((ADAPTIVE, None), (pinned, reference)):
            log.info("demo: %s: %s", label, ", ".join(
                f"{p.rate:.0f}/s for {p.seconds:g} s" for p in phases))
            cfg = RunConfig(rate=phases[0].rate, seconds=seconds, budget=cal.budget,
                            variant=variant, images=cal.images, max_inflight=MAX_INFLIGHT,
                            deadline_is_budget=True)
            out = asyncio.run(run_phases(targets[label], family.name, data, cfg, phases))
            records[label] = out.records
            top = [r for r in out.records if r.phase == len(phases) - 1]
            log.info("demo: %s done: %.0f %% in budget at the top load", label,
                     100 * in_budget_share(top))
    result = DemoResult(family.name, list(family.variants), reference, cal, list(loads), phases,
                        records, logs, time.perf_counter() - t0)
    if out_dir is not None:
        try:
            path = plot(result, out_dir / "demo.png")
        except ModuleNotFoundError as exc:  # matplotlib is in the build extra
            log.warning("demo: no plot (%s)", exc)
        else:
            result = DemoResult(**{**result.__dict__, "plot": path,
                                   "seconds": time.perf_counter() - t0})
    return result


def mix(records: Sequence[Record]) -> dict[str, float]:
    """Share of the arrivals answered by each candidate, and the rest by status (shed = the
    server's DEADLINE_EXCEEDED), most answered first."""
    n = len(records)
    out: dict[str, float] = {}
    for r in records:
        key = (r.candidate or "?") if r.status == OK else r.status
        out[key] = out.get(key, 0.0) + 1.0 / n
    return dict(sorted(out.items(), key=lambda kv: (kv[0] not in _answer_keys(records), -kv[1])))


def _answer_keys(records: Sequence[Record]) -> set[str]:
    return {r.candidate or "?" for r in records if r.status == OK}


def plot(result: DemoResult, path: Path) -> Path:
    """Left: in-budget share and accuracy against load, both policies. Right: what answered each
    phase (share of arrivals per variant/exit; failed requests on top), both policies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {ADAPTIVE: "tab:blue"}
    for k, label in enumerate(result.policies):
        color = styles.get(label, "tab:red")
        by_phase = [[r for r in result.records[label] if r.phase == i]
                    for i in range(len(result.phases))]
        ax.plot(result.loads, [100 * in_budget_share(rs) for rs in by_phase], "o-", color=color,
                label=f"{label}: in budget")
        acc = [judged_accuracy([r for r in rs if r.status == OK]) for rs in by_phase]
        if any(a is not None for a in acc):
            ax.plot(result.loads, [np.nan if a is None else 100 * a for a in acc], "s--",
                    color=color, alpha=0.7, label=f"{label}: accuracy of answers")
        # stacked bars, the two policies side by side per phase
        x = np.arange(len(result.phases)) + (k - 0.5) * 0.4
        bottom = np.zeros(len(by_phase))
        mixes = [mix(rs) for rs in by_phase]
        keys: list[str] = []
        for m in mixes:
            keys += [n for n in m if n not in keys]
        for n in keys:
            h = np.array([100 * m.get(n, 0.0) for m in mixes])
            ax2.bar(x, h, width=0.38, bottom=bottom, color=_color(n), edgecolor="white",
                    label=n if n not in ax2.get_legend_handles_labels()[1] else None)
            bottom += h
        for xi in x:
            ax2.text(xi, 101, "A" if label == ADAPTIVE else "P", ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(result.loads, [f"{v:g}x" for v in result.loads])
    ax.set_xlabel(f"offered load (x {result.reference}'s capacity, "
                  f"{result.calibration.capacity_rps:.0f} requests/s)")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("in-budget share and accuracy vs load")
    ax2.set_xticks(np.arange(len(result.phases)), [f"{v:g}x" for v in result.loads])
    ax2.set_ylabel("% of requests")
    ax2.set_ylim(0, 108)
    ax2.set_title(f"what answered (A: adaptive, P: pinned {result.reference})")
    ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"family {result.family!r}, {result.calibration.images} images/request, "
                 f"budgets {result.calibration.budget} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _color(name: str) -> str:
    fixed = {"full": "#1f4e79", "int8": "#2e75b6", "pruned-neurons": "#70ad47",
             "distilled": "#a9d18e", "early-exit@2": "#7030a0", "early-exit@1": "#b284d6",
             "early-exit@0": "#dcc5ec", "DEADLINE_EXCEEDED": "#c00000",
             "CLIENT_DROPPED": "#7f7f7f"}
    return fixed.get(name) or f"C{sum(map(ord, name)) % 10}"
