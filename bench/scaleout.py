"""Goodput as the offered load passes saturation, one server process against ``--workers N``
(issue 12): the routed server with default flags (CPU lanes only), budgets uniform 5-20 ms,
8 test images per request, open-loop Poisson arrivals from several client processes, the rate
doubling per step. Per step: in-budget share and goodput (answers inside their budget per second).
Per server: the peak goodput, the rate it came at, and the goodput at twice that rate as a share of
the peak (the target: ≥ 90 %: past saturation the router sheds what cannot make it instead of
letting every request miss).

    python3 bench/scaleout.py --family families/mnist5k --workers-list 1,8 --json OUT.json

``--flags '--backlog 8'`` (repeatable) ramps one more server per worker count with those serve
flags; ``--client-throttle`` ramps the default-flags server once more with the load generator
throttling itself as `AdaptiveClient` does by default (`client/throttle.py`), or once per
``--throttle 'threshold=0.9'`` (other settings of the throttle, in the same run); ``--server-cpus 0
--client-cpus 1`` pins the server and the load generator apart (on a small host the clients would
otherwise take the server's cores).

About 2 minutes with the defaults on 16 cores; nothing but 127.0.0.1. Shares `bench/gpu.py`'s
spawned client pool, server start-up and JSON-per-phase plumbing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
from pathlib import Path
from typing import Any

# Siblings under bench/ (a script's own folder is on sys.path), not a package.
from gpu import Clients, Run, open_figures, placement_images, start_server

from client.budgets import BudgetSpec
from client.loadgen import RunConfig
from client.process import cpu_set, spawning_on
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


def ramp(run: Run, clients: Clients, family: Path, workers: int, flags: list[str],
         rates: list[float], seconds: float, logs: Path, server_cpus: set[int] | None,
         throttle: ThrottleConfig | None = None) -> dict[str, Any]:
    """One server, one open loop per rate; the figures and the goodput summary. ``throttle``:
    the load generator throttles itself as `AdaptiveClient` does (`client.throttle`)."""
    fam = load_family(family)
    data = placement_images(family, fam.input_shape)
    out: dict[str, Any] = {"workers": workers, "flags": shlex.join(flags),
                           "client_throttle": throttle is not None,
                           "throttle": dataclasses.asdict(throttle) if throttle else None,
                           "steps": []}
    with contextlib.ExitStack() as stack:
        label = "-".join([f"w{workers}", *(f.strip("-") for f in flags),
                          *(["throttle"] if throttle else [])])
        with spawning_on(server_cpus):
            server = start_server(stack, run, family, ["--device", "cpu", *flags], label=label,
                                  workers=workers, logs=logs, timeout=240.0)
        for i, rate in enumerate(rates):
            cfg = RunConfig(rate=rate, seconds=seconds, budget=BudgetSpec.parse(BUDGET),
                            images=IMAGES, seed=10 + i, deadline_is_budget=True,
                            throttle=throttle)
            fig = open_figures(clients, server, fam.name, data, cfg, sample_gpu=False)
            step = {"offered_rps": rate, "attainment": fig["attainment"],
                    "goodput_rps": fig["goodput_rps"], "client_dropped": fig["client_dropped"],
                    "client_throttled": fig["client_throttled"],
                    "answered": fig["answered"], "errors": fig["errors"],
                    "errors_by_code": fig["errors_by_code"], "latency_ms": fig["latency_ms"],
                    "accuracy": fig.get("accuracy"), "send_lag_p99_ms": fig["send_lag_ms"]["p99"]}
            out["steps"].append(step)
            run.say(f"  workers {workers} at {rate:.0f}/s: in budget "
                    f"{100 * (fig['attainment'] or 0):.1f}%, goodput {step['goodput_rps']:.0f}/s")
            run.write()
    steps = out["steps"]
    if not steps:
        return out
    peak = max(steps, key=lambda s: s["goodput_rps"])
    out["peak_goodput_rps"] = peak["goodput_rps"]
    out["peak_at_rps"] = peak["offered_rps"]
    past = [s for s in steps if s["offered_rps"] >= 2 * peak["offered_rps"]]
    if past:
        out["goodput_at_2x_peak_rate_rps"] = past[0]["goodput_rps"]
        out["goodput_at_2x_share_of_peak"] = round(past[0]["goodput_rps"]
                                                   / max(peak["goodput_rps"], 1e-9), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", type=Path, default=Path("families/mnist5k"))
    ap.add_argument("--workers-list", default="1,8")
    ap.add_argument("--rates", default="400,800,1600,3200,6400,12800",
                    help="offered requests/s, one open loop each (default doubling 400-12800)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per rate (default 4)")
    ap.add_argument("--clients", type=int, default=8, help="client processes (default 8)")
    ap.add_argument("--flags", action="append",
                    help="serve flags of one more server per --workers count, e.g. "
                         "'--backlog 8' (repeatable; default: default flags only)")
    ap.add_argument("--client-throttle", action="store_true",
                    help="ramp the default-flags server a second time with the load generator "
                         "throttling itself as AdaptiveClient does by default "
                         "(client/throttle.py)")
    ap.add_argument("--throttle", action="append", metavar="KEY=VALUE,...",
                    help="with --client-throttle: ramp once per throttle setting instead of "
                         "ThrottleConfig's defaults, e.g. 'threshold=0.9,window_s=10' "
                         "(repeatable; 'default': the defaults, beside other settings)")
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
    results: dict[str, Any] = run.data.setdefault("servers_ramp", {})
    with contextlib.ExitStack() as stack:
        clients = Clients(stack, args.clients)
        for w in workers:
            for flags in flag_sets:
                # The key of a server with default flags stays its worker count.
                key = " ".join([str(w), *flags])

                # The product's defaults, both ends: the server's flags and AdaptiveClient's
                # throttle (only the default-flags server is ramped a second time).
                throttles = [None, *(configs if args.client_throttle and not flags else [])]
                for throttle in throttles:
                    label = labels.get(throttle, "default") if throttle else "default"
                    name = key + (" +client-throttle" if throttle else "") + (
                        "" if label == "default" else f" {label}")

                    def phase(w: int = w, flags: list[str] = flags, name: str = name,
                              throttle: ThrottleConfig | None = throttle) -> None:
                        results[name] = ramp(run, clients, args.family, w, flags, rates,
                                             args.seconds, logs, server_cpus, throttle)
                    run.phase(f"workers-{name}", len(rates) * (args.seconds + 3) + 20, phase)
    for key, r in results.items():
        run.say(f"workers {key}: peak goodput {r.get('peak_goodput_rps')}/s at "
                f"{r.get('peak_at_rps')}/s offered; at 2x: "
                f"{r.get('goodput_at_2x_share_of_peak', 'not reached')}")
    run.write()


if __name__ == "__main__":
    main()
