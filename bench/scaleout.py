"""Goodput as the offered load passes saturation, one server process against ``--workers N``
(issue 12): the routed server with default flags (CPU lanes only), budgets uniform 5-20 ms,
8 test images per request, open-loop Poisson arrivals from several client processes, the rate
doubling per step. Per step: in-budget share and goodput (answers inside their budget per second),
and the server's side from its /metrics and its CPU: the cores it used, its answers by variant,
refusals by cause, calls sent that no handler saw (their deadline passed while they waited
unread in gRPC's core, or `--backlog` refused them there), late answers, samples per batch.
Per server: the peak goodput, the rate it came at, and the goodput at twice that rate as a share of
the peak (the target: ≥ 90 %: past saturation the router sheds what cannot make it instead of
letting every request miss).

    python3 bench/scaleout.py --family families/mnist5k --workers-list 1,8 --json OUT.json

``--flags '--backlog 8'`` (repeatable; ``--flags ''`` for the defaults beside it) ramps a server
per worker count with those serve flags; ``--client-throttle`` ramps the default-flags server once
more with the load generator throttling itself as `AdaptiveClient` does by default
(`client/throttle.py`), or once per ``--throttle 'threshold=0.9'`` (other settings of the
throttle, in the same run); ``--server-cpus 0 --client-cpus 1`` pins the server and the load
generator apart (on a small host the clients would otherwise take the server's cores). The
configurations ramp one after another, or with ``--interleave`` side by side: every server started
first, each rate then offered to them in a rotating order, each step once every server is idle
(the last one drains what its step left unread: on the shared CPUs it would slow the next); on a
host whose speed drifts by ±10 % within minutes, the sequential ramps were not comparable.

About 2 minutes with the defaults on 16 cores; nothing but 127.0.0.1. Shares `bench/gpu.py`'s
spawned client pool, server start-up and JSON-per-phase plumbing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import re
import shlex
import time
import urllib.request
from pathlib import Path
from typing import Any

# Siblings under bench/ (a script's own folder is on sys.path), not a package.
from gpu import Clients, Run, Served, open_figures, placement_images, start_server

from client.budgets import BudgetSpec
from client.loadgen import RunConfig, TestData
from client.process import cpu_set, spawning_on, tree_cpu
from client.results import host_info
from client.throttle import ThrottleConfig
from compression.core.family import load_family
from server.errors import InvalidArgument

BUDGET = "uniform:5:20"
IMAGES = 8


def throttle_config(setting: str) -> ThrottleConfig:
    """``threshold=0.9,window_s=10`` → that `ThrottleConfig` (each value as its field's type);
    ``default`` → the defaults."""
    defaults = ThrottleConfig()
    if setting == "default":
        return defaults
    values: dict[str, Any] = {}
    for key, _, value in (kv.partition("=") for kv in setting.split(",")):
        values[key] = type(getattr(defaults, key))(value)
    return ThrottleConfig(**values)


@dataclasses.dataclass
class Ramp:
    """One configuration's ramp — a server (``workers``, ``flags``) loaded open-loop at each rate,
    the load generator throttling itself as `AdaptiveClient` does when ``throttle`` is given
    (`client.throttle`) — and its figures: the steps, the peak goodput, the goodput at twice the
    peak's rate."""

    name: str
    workers: int
    flags: list[str]
    throttle: ThrottleConfig | None
    server: Served | None = None
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def start(self, stack: contextlib.ExitStack, run: Run, family: Path, logs: Path,
              server_cpus: set[int] | None) -> None:
        # Unique per ramp (interleaved, every server is alive at once): its log's name.
        label = "w" + re.sub(r"[^A-Za-z0-9=.]+", "-", self.name).strip("-")
        with spawning_on(server_cpus):
            self.server = start_server(stack, run, family, ["--device", "cpu", *self.flags],
                                       label=label, workers=self.workers, logs=logs,
                                       timeout=240.0, metrics=True)

    def step(self, run: Run, clients: Clients, model: str, data: TestData, index: int,
             rate: float, seconds: float) -> None:
        """One open loop at ``rate`` (seeded by its ``index``: every configuration is offered the
        same arrivals, budgets and images at a rate)."""
        assert self.server is not None, "start() first"
        cfg = RunConfig(rate=rate, seconds=seconds, budget=BudgetSpec.parse(BUDGET), images=IMAGES,
                        seed=10 + index, deadline_is_budget=True, throttle=self.throttle)
        before = server_counts(self.server)
        fig = open_figures(clients, self.server, model, data, cfg, sample_gpu=False)
        # Per second of the load's own wall time (sending to the last outcome): the server idles
        # while the clients connect and between steps.
        served = server_step(before, server_counts(self.server), fig["wall_s"])
        # Sent (not kept back by the client's throttle) and never seen by a handler: the deadline
        # passed while the call waited unread in gRPC's core, or `--backlog` refused it there.
        served["unread"] = max(fig["answered"] + fig["errors"] - sum(served["status"].values()), 0)
        step = {"offered_rps": rate, "seconds": seconds, "attainment": fig["attainment"],
                "goodput_rps": fig["goodput_rps"], "client_dropped": fig["client_dropped"],
                "client_throttled": fig["client_throttled"], "answered": fig["answered"],
                "errors": fig["errors"], "errors_by_code": fig["errors_by_code"],
                "latency_ms": fig["latency_ms"], "accuracy": fig.get("accuracy"),
                "send_lag_p99_ms": fig["send_lag_ms"]["p99"], "server": served}
        self.steps.append(step)
        refused = served["refused"]
        run.say(f"  {self.name} at {rate:.0f}/s: in budget {100 * (fig['attainment'] or 0):.1f}%, "
                f"goodput {step['goodput_rps']:.0f}/s; server {served['cores']:.2f} cores, "
                f"answered {sum(served['answered'].values())}, refused "
                f"{refused.get('load', 0)} for load and {refused.get('budget', 0)} for budget, "
                f"{served['unread']} unread, {served['late']} late, "
                f"{served['mean_batch_samples']} samples per batch")
        run.write()

    def figures(self) -> dict[str, Any]:
        """The ramp as the JSON records it (`bench/report.py` reads it): steps and summary."""
        out: dict[str, Any] = {"workers": self.workers, "flags": shlex.join(self.flags),
                               "client_throttle": self.throttle is not None,
                               "throttle": dataclasses.asdict(self.throttle) if self.throttle
                               else None, "steps": self.steps}
        if not self.steps:
            return out
        peak = max(self.steps, key=lambda s: s["goodput_rps"])
        out["peak_goodput_rps"] = peak["goodput_rps"]
        out["peak_at_rps"] = peak["offered_rps"]
        past = [s for s in self.steps if s["offered_rps"] >= 2 * peak["offered_rps"]]
        if past:
            out["goodput_at_2x_peak_rate_rps"] = past[0]["goodput_rps"]
            out["goodput_at_2x_share_of_peak"] = round(past[0]["goodput_rps"]
                                                       / max(peak["goodput_rps"], 1e-9), 3)
        return out


def server_counts(server: Served) -> collections.Counter[str]:
    """What the server has done so far, from its /metrics and its processes' CPU: requests by
    status and answers by variant, refusals by cause, late answers, batches and their samples,
    CPU seconds; a step's figures are the differences of two (`server_step`)."""
    from prometheus_client.parser import text_string_to_metric_families

    assert server.metrics_url is not None, "started with metrics=True"
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    out: collections.Counter[str] = collections.Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "adaptive_requests_total":
                out[f"status {s.labels['status']}"] += s.value
                if s.labels["status"] == "OK":
                    out[f"answered {s.labels['variant']}"] += s.value
            elif s.name == "adaptive_refused_total":
                out[f"refused {s.labels['reason']}"] += s.value
            elif s.name == "adaptive_budget_misses_total":
                out["late"] += s.value
            elif s.name == "adaptive_batch_size_count":
                out["batches"] += s.value
            elif s.name == "adaptive_batch_size_sum":
                out["batch samples"] += s.value
    out["cpu_s"] = cpu_s(server)
    return out


def cpu_s(server: Served) -> float:
    """CPU seconds the server's processes (the parent and its workers) have used so far."""
    return sum(tree_cpu(server.proc.proc.pid).values())


def server_step(before: collections.Counter[str], after: collections.Counter[str],
                seconds: float) -> dict[str, Any]:
    """Where a step's load went on the server's side: the cores it used, its requests by status,
    answers by variant, refusals by cause (`protos.wire`'s load or budget), answers after their
    budget, and the mean samples per batch."""
    d = after - before  # counters only grow: what is left is this step's

    def part(prefix: str) -> dict[str, int]:
        return {k.removeprefix(prefix): int(v) for k, v in sorted(d.items()) if k.startswith(prefix)}

    return {"cores": round(d["cpu_s"] / max(seconds, 1e-9), 3), "status": part("status "),
            "answered": part("answered "), "refused": part("refused "), "late": int(d["late"]),
            "mean_batch_samples": round(d["batch samples"] / d["batches"], 2) if d["batches"]
            else None}


def settle(server: Served, *, idle_share: float = 0.1, most_s: float = 10.0) -> None:
    """Wait until ``server``'s processes use less than ``idle_share`` of a core (it has drained
    the calls a past step left unread), at most ``most_s``."""
    began = time.monotonic()
    while time.monotonic() - began < most_s:
        c0 = cpu_s(server)
        time.sleep(0.2)
        if cpu_s(server) - c0 < idle_share * 0.2:
            break


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", type=Path, default=Path("families/mnist5k"))
    ap.add_argument("--workers-list", default="1,8")
    ap.add_argument("--rates", default="400,800,1600,3200,6400,12800",
                    help="offered requests/s, one open loop each (default doubling 400-12800)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per rate (default 4)")
    ap.add_argument("--clients", type=int, default=8, help="client processes (default 8)")
    ap.add_argument("--flags", action="append",
                    help="serve flags of a server per --workers count, e.g. '--backlog 8' "
                         "(repeatable, in place of the default-flags server: add --flags '' to "
                         "keep it; default: default flags only)")
    ap.add_argument("--client-throttle", action="store_true",
                    help="ramp the default-flags server a second time with the load generator "
                         "throttling itself as AdaptiveClient does by default "
                         "(client/throttle.py)")
    ap.add_argument("--throttle", action="append", metavar="KEY=VALUE,...",
                    help="with --client-throttle: ramp once per throttle setting instead of "
                         "ThrottleConfig's defaults, e.g. 'threshold=0.9,window_s=10' "
                         "(repeatable; 'default': the defaults, beside other settings)")
    ap.add_argument("--interleave", action="store_true",
                    help="start every configuration's server first, then visit them in a "
                         "rotating order at each rate, each step once every server is idle: "
                         "a drift of the host then moves all of them alike")
    ap.add_argument("--server-cpus", help="pin the server's processes to these CPUs, e.g. 0")
    ap.add_argument("--client-cpus", help="pin the client processes to these CPUs, e.g. 1 "
                                          "(on a small host: the load generator then does not "
                                          "take the server's cores)")
    # No default: results/bench/scaleout.json holds the 16-core device run that docs/results.md
    # renders, and a run on another machine must not silently replace it.
    ap.add_argument("--json", type=Path, required=True, help="where the figures go")
    ap.add_argument("--logs", type=Path, help="servers' logs (default: beside --json)")
    ap.add_argument("--max-seconds", type=float, default=300.0)
    args = ap.parse_args()
    args.quick, args.accelerator, args.gpu_dtype = False, "cpu", "fp32"  # what `Run` records
    run = Run(args.json, args)
    run.data["tool"] = "bench/scaleout.py"
    run.data["host"] = host_info()
    rates = [float(r) for r in args.rates.split(",")]
    workers = [int(w) for w in args.workers_list.split(",")]
    flag_sets = [shlex.split(f) for f in args.flags or [""]]
    try:
        labels = {throttle_config(setting): setting for setting in args.throttle or []}
    except (AttributeError, TypeError, ValueError, InvalidArgument) as exc:  # unknown key, bad value
        ap.error(f"--throttle: {exc}")
    configs = list(labels) or [ThrottleConfig()]
    logs = args.logs or args.json.parent
    try:
        server_cpus, client_cpus = cpu_set(args.server_cpus), cpu_set(args.client_cpus)
    except ValueError as exc:
        ap.error(str(exc))
    if client_cpus is not None:
        os.sched_setaffinity(0, client_cpus)  # the client processes spawned next inherit it
    run.data["cpus"] = {"server": sorted(server_cpus) if server_cpus else "any",
                        "clients": sorted(client_cpus) if client_cpus else "any"}
    ramps: list[Ramp] = []
    for w in workers:
        for flags in flag_sets:
            # The key of a server with default flags stays its worker count.
            key = " ".join([str(w), *flags])
            # The product's defaults, both ends: the server's flags and AdaptiveClient's
            # throttle (only the default-flags server is ramped a second time).
            for throttle in [None, *(configs if args.client_throttle and not flags else [])]:
                label = labels.get(throttle, "default") if throttle else "default"
                ramps.append(Ramp(key + (" +client-throttle" if throttle else "") + (
                    "" if label == "default" else f" {label}"), w, flags, throttle))
    run.data["interleaved"] = args.interleave
    results: dict[str, Any] = run.data.setdefault("servers_ramp", {})
    fam = load_family(args.family)
    data = placement_images(args.family, fam.input_shape)
    with contextlib.ExitStack() as stack:
        clients = Clients(stack, args.clients)
        if args.interleave:
            def interleaved() -> None:
                for r in ramps:
                    r.start(stack, run, args.family, logs, server_cpus)
                servers = [r.server for r in ramps if r.server is not None]
                for i, rate in enumerate(rates):
                    for r in ramps[i % len(ramps):] + ramps[:i % len(ramps)]:
                        for server in servers:  # the last step's server above all
                            settle(server)
                        r.step(run, clients, fam.name, data, i, rate, args.seconds)
                        results[r.name] = r.figures()
            run.phase("interleaved", len(ramps) * (len(rates) * (args.seconds + 5) + 30),
                      interleaved)
        else:
            for r in ramps:
                def phase(r: Ramp = r) -> None:
                    with contextlib.ExitStack() as own:
                        r.start(own, run, args.family, logs, server_cpus)
                        for i, rate in enumerate(rates):
                            r.step(run, clients, fam.name, data, i, rate, args.seconds)
                            results[r.name] = r.figures()
                run.phase(f"workers-{r.name}", len(rates) * (args.seconds + 3) + 20, phase)
    for key, r in results.items():
        run.say(f"workers {key}: peak goodput {r.get('peak_goodput_rps')}/s at "
                f"{r.get('peak_at_rps')}/s offered; at 2x: "
                f"{r.get('goodput_at_2x_share_of_peak', 'not reached')}")
    run.write()


if __name__ == "__main__":
    main()
