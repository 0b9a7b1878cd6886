"""`adaptive-inference top`: a live terminal view of a running server.

Each frame reads the server's Prometheus text (``/metrics``) and its candidate table
(`AdaptiveClient.variants`, the ``ModelVariants`` RPC) and shows: requests (total and per
second), the share answered in budget, the accuracy of what was served, the variant/exit mix,
queue depths, host CPU/GPU load, and the router's state (safety factor, miss ratio, overhead, CPU
share per request, requests shed).

`render_frame` is pure (metrics text + table → text); `run_top` scrapes and redraws. Window
figures (per second, in budget, accuracy, mix) come from the difference between two scrapes
``interval_s`` apart; without a previous scrape they cover everything since the server started.

How the figures are made from the metrics:

- requests: ``adaptive_requests_total`` (every status; ``status="OK"`` are the answers);
- in budget: (answers − ``adaptive_budget_misses_total``) / requests; requests without a budget
  count as in budget, failed ones (shed: DEADLINE_EXCEEDED) as missed, as the load generator
  counts them;
- mix: answers per variant; the early-exit variant's answers split by the share of its samples
  that left at each exit (``adaptive_early_exit_total`` counts samples, not requests);
- accuracy: ``adaptive_variant_accuracy_ratio`` (what the router ranks by: validation accuracy of
  each candidate) weighted by that mix: the accuracy of what was served, as the family measured
  it, not a measurement of these requests (the server does not see labels).
"""

from __future__ import annotations

import collections
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client.parser import text_string_to_metric_families

from client.results import percent
from protos.wire import candidate_name

if TYPE_CHECKING:
    from client.client import VariantInfo

CLEAR = "\033[H\033[2J"  # cursor home, clear screen


@dataclass
class Scrape:
    """The figures `render_frame` needs from one ``/metrics`` text."""

    requests: dict[tuple[str, str], float] = field(default_factory=dict)  # (variant, status)
    misses: dict[str, float] = field(default_factory=dict)  # variant → answered late
    exits: dict[str, float] = field(default_factory=dict)  # exit index → samples
    accuracy: dict[str, float] = field(default_factory=dict)  # candidate → ranking accuracy
    queue: dict[str, float] = field(default_factory=dict)  # variant → samples queued
    quarantined: dict[str, float] = field(default_factory=dict)
    gpu: dict[str, float] = field(default_factory=dict)
    shed: float = 0.0
    gauges: dict[str, float] = field(default_factory=dict)  # unlabelled gauges by name

    @classmethod
    def parse(cls, text: str) -> Scrape:
        s = cls()
        for fam in text_string_to_metric_families(text):
            for m in fam.samples:
                if m.name.endswith("_created"):
                    continue
                lb = m.labels
                if m.name == "adaptive_requests_total":
                    key = (lb.get("variant", "?"), lb.get("status", "?"))
                    s.requests[key] = s.requests.get(key, 0.0) + m.value
                elif m.name == "adaptive_budget_misses_total":
                    v = lb.get("variant", "?")
                    s.misses[v] = s.misses.get(v, 0.0) + m.value
                elif m.name == "adaptive_early_exit_total":
                    s.exits[lb.get("exit", "?")] = m.value
                elif m.name == "adaptive_variant_accuracy_ratio":
                    s.accuracy[lb.get("variant", "?")] = m.value
                elif m.name == "adaptive_queue_depth":
                    s.queue[lb.get("variant", "?")] = m.value
                elif m.name == "adaptive_variant_quarantined":
                    s.quarantined[lb.get("variant", "?")] = m.value
                elif m.name == "adaptive_gpu_utilization_ratio":
                    s.gpu[lb.get("gpu", "?")] = m.value
                elif m.name == "adaptive_shed_total":
                    s.shed += m.value
                elif not lb:
                    s.gauges[m.name] = m.value
        return s

    def minus(self, before: Scrape) -> Scrape:
        """The counters' increase since ``before`` (gauges as now)."""
        def sub(now: dict[str, float], then: dict[str, float]) -> dict[str, float]:
            return {k: v - then.get(k, 0.0) for k, v in now.items()}

        out = Scrape(**{**self.__dict__})
        out.requests = {k: v - before.requests.get(k, 0.0) for k, v in self.requests.items()}
        out.misses = sub(self.misses, before.misses)
        out.exits = sub(self.exits, before.exits)
        out.shed = self.shed - before.shed
        return out

    @property
    def total(self) -> float:
        return sum(self.requests.values())

    @property
    def answered(self) -> float:
        return sum(v for (_, status), v in self.requests.items() if status == "OK")

    @property
    def in_budget(self) -> float | None:
        total = self.total
        return (self.answered - sum(self.misses.values())) / total if total else None

    def failed(self) -> dict[str, float]:
        out: dict[str, float] = collections.defaultdict(float)
        for (_, status), v in self.requests.items():
            if status != "OK" and v:
                out[status] += v
        return dict(out)

    def mix(self) -> dict[str, float]:
        """Answers per candidate (the early-exit variant's split by its exits' sample shares)."""
        out: dict[str, float] = {}
        early = {c.partition("@")[0] for c in self.accuracy if "@" in c}
        exit_samples = sum(self.exits.values())
        for (variant, status), v in self.requests.items():
            if status != "OK" or v <= 0:
                continue
            if variant in early and exit_samples > 0:
                for e, n in self.exits.items():
                    if n > 0:
                        name = candidate_name(variant, int(e))
                        out[name] = out.get(name, 0.0) + v * n / exit_samples
            else:
                out[variant] = out.get(variant, 0.0) + v
        return out

    def served_accuracy(self) -> float | None:
        mix = {c: n for c, n in self.mix().items() if c in self.accuracy}
        total = sum(mix.values())
        return sum(self.accuracy[c] * n for c, n in mix.items()) / total if total else None


def render_frame(metrics_text: str, table: Sequence[VariantInfo], *,
                 previous_text: str | None = None, interval_s: float | None = None,
                 title: str = "", now: datetime | None = None) -> str:
    """One frame of `top` from the server's ``/metrics`` text and candidate table. With
    ``previous_text`` (the scrape ``interval_s`` earlier) the window figures cover that interval;
    without, everything since the server started."""
    cur = Scrape.parse(metrics_text)
    win, seconds = cur, 0.0  # the window: since the previous scrape, or since the start
    if previous_text is not None and interval_s is not None and interval_s > 0:
        win, seconds = cur.minus(Scrape.parse(previous_text)), interval_s
    span = f"last {seconds:.1f} s" if seconds else "since start"
    rate = f"{win.total / seconds:.1f}/s" if seconds else "-/s"
    g = cur.gauges
    lines = [f"adaptive-inference top  {title}  {(now or datetime.now()).strftime('%H:%M:%S')}"
             .rstrip(), ""]
    lines.append(f"requests      {rate:>10}   {cur.total:.0f} total, {cur.answered:.0f} answered, "
                 f"in flight {g.get('adaptive_inflight_requests', 0):.0f}")
    lines.append(f"in budget     {percent(win.in_budget):>10}   ({span}; answered in budget / all "
                 f"requests)")
    lines.append(f"accuracy      {percent(win.served_accuracy(), 2):>10}   ({span}; validation "
                 f"accuracy of what answered)")
    shed_rate = f"{win.shed / seconds:.1f}/s" if seconds else "-/s"
    failed = win.failed()
    lines.append(f"shed          {shed_rate:>10}   {cur.shed:.0f} total"
                 + (f"; failed {span}: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                      sorted(failed.items())) if failed else ""))
    factor = g.get("adaptive_router_safety_factor")
    miss = g.get("adaptive_router_miss_ratio")
    overhead = g.get("adaptive_router_overhead_seconds")
    share = g.get("adaptive_router_cpu_share_seconds")
    lines.append(f"router        safety factor {'-' if factor is None else f'{factor:.3f}'}   "
                 f"miss ratio {percent(miss, 2)}   overhead "
                 f"{'-' if overhead is None else f'{overhead * 1e3:.3f} ms'}   CPU share "
                 + ("-" if share is None else "idle" if share < 0 else f"{share * 1e3:.3f} ms"
                    "/request"))
    gpu = ", ".join(f"GPU{k} {percent(v, 0)}" for k, v in sorted(cur.gpu.items())) or "no GPU"
    lines.append(f"host          CPU {percent(g.get('adaptive_cpu_utilization_ratio'), 0)} (server "
                 f"{percent(g.get('adaptive_process_cpu_utilization_ratio'), 0)})   memory "
                 f"{percent(g.get('adaptive_memory_utilization_ratio'), 0)}   {gpu}")
    lines.append("")
    mix = win.mix()
    answered = sum(mix.values())
    header = ["candidate", "served", "share", "accuracy", "pred p50 ms", "queue ms", "queued"]
    rows = []
    for c in table:
        n = mix.get(c.name, 0.0)
        q = cur.queue.get(c.variant)
        flag = " (quarantined)" if cur.quarantined.get(c.variant) else ""
        rows.append([c.name + flag, f"{n:.0f}", percent(n / answered if answered else None),
                     percent(c.accuracy, 2), f"{c.predicted_p50_ms:.3f}", f"{c.queue_ms:.3f}",
                     "-" if q is None or c.exit not in (None, 0) else f"{q:.0f}"])
    from client.results import text_table

    lines.append(f"mix ({span}) and the router's table now (batch 1):")
    lines.append(text_table(header, rows))
    return "\n".join(lines)


def scrape(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def run_top(target: str, metrics_url: str, *, once: bool = False, interval_s: float = 1.0,
            client_kwargs: dict[str, Any] | None = None,
            write: Callable[[str], object] | None = None) -> int:
    """Redraw a frame every ``interval_s`` until interrupted; ``once``: print one frame (two
    scrapes ``interval_s`` apart, so the per-second figures are real) and return."""
    from client.client import AdaptiveClient

    write = write or sys.stdout.write
    with AdaptiveClient(target, **(client_kwargs or {})) as client:
        title = f"{client.model} at {target}"
        previous: tuple[str, float] | None = None
        if once:
            previous = (scrape(metrics_url), time.perf_counter())
            time.sleep(interval_s)
        try:
            while True:
                text, t = scrape(metrics_url), time.perf_counter()
                frame = render_frame(text, client.variants(), title=title,
                                     previous_text=None if previous is None else previous[0],
                                     interval_s=None if previous is None else t - previous[1])
                if once:
                    write(frame + "\n")
                    return 0
                write(CLEAR + frame + "\n")
                sys.stdout.flush()
                previous = (text, t)
                time.sleep(max(interval_s - (time.perf_counter() - t), 0.05))
        except KeyboardInterrupt:
            return 0
