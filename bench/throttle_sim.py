"""The client's throttle against a simulated server: goodput and refused share per offered rate.

A discrete-event model of what `bench/scaleout.py` measures on a real server, without the
host's noise (±10 % between runs on 2 cores): open-loop Poisson arrivals from ``--clients``
clients, each with its own `client.throttle.AdaptiveThrottle` on the simulated clock, and one
FIFO server that takes ``--answer-ms`` per answer and ``--refusal-ms`` per refusal (the gRPC
per-call path a refusal still costs). The server admits a request when it can finish inside
its budget (uniform 5–20 ms, as the benchmark), else refuses it for load; the client hears the
refusal when the server gets to it or at the deadline, whichever comes first, and counts only
the outcomes of what it sent since its last step, as the real clients do.

    .venv/bin/python bench/throttle_sim.py [--throttle default --throttle gain=0 ...]
"""

from __future__ import annotations

import argparse
import heapq
import random

# A sibling under bench/ (a script's own folder is on sys.path), not a package.
from scaleout import throttle_config

from client.throttle import AdaptiveThrottle, ThrottleConfig

BUDGET_MS = (5.0, 20.0)
NETWORK_MS = 0.1  # each way


def simulate(offered: float, config: ThrottleConfig | None, *, seconds: float, clients: int,
             answer_ms: float, refusal_ms: float, seed: int) -> tuple[float, float]:
    """(goodput/s, refused share of what was sent) of one run at ``offered`` requests/s."""
    rng = random.Random(seed)
    now = [0.0]
    throttles = [None if config is None else
                 AdaptiveThrottle(config, clock=lambda: now[0], rng=random.Random(seed + 1 + c))
                 for c in range(clients)]
    # (time, kind, client, budget or (answered, sent at)); kind 0: an arrival at a client, 1: an
    # outcome back at it.
    events: list[tuple[float, int, int, object]] = []
    for c in range(clients):
        t = rng.expovariate(offered / clients)
        while t < seconds:
            events.append((t, 0, c, rng.uniform(*BUDGET_MS) / 1e3))
            t += rng.expovariate(offered / clients)
    heapq.heapify(events)
    server_free = 0.0
    good = sent = refused = 0
    while events:
        t, kind, c, data = heapq.heappop(events)
        now[0] = t
        throttle = throttles[c]
        if kind == 0:
            if throttle is not None and not throttle.admit():
                continue
            sent += 1
            assert isinstance(data, float)
            deadline = t + data
            start = max(server_free, t + NETWORK_MS / 1e3)
            answered = start + answer_ms / 1e3 + NETWORK_MS / 1e3 <= deadline
            server_free = start + (answer_ms if answered else refusal_ms) / 1e3
            back = server_free + NETWORK_MS / 1e3
            heapq.heappush(events, (back if answered else min(back, deadline), 1, c,
                                    (answered, t)))
        else:
            answered, sent_at = data  # type: ignore[misc]
            if throttle is not None:
                throttle.record_status("OK" if answered else "DEADLINE_EXCEEDED", "load",
                                       sent_at=sent_at)
            good += answered
            refused += not answered
    return good / seconds, refused / max(sent, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--throttle", action="append", metavar="KEY=VALUE,...",
                    help="a throttle setting to simulate ('default', 'gain=0', ...; repeatable; "
                         "default: none, default and gain=0)")
    ap.add_argument("--rates", default="1000,1250,1500,2000,2600,4000")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--answer-ms", type=float, default=0.75)
    ap.add_argument("--refusal-ms", type=float, default=0.33)
    ap.add_argument("--seeds", type=int, default=3, help="runs per point, averaged")
    args = ap.parse_args()
    settings = args.throttle or ["none", "default", "gain=0"]
    rates = [float(r) for r in args.rates.split(",")]
    print(f"capacity {1e3 / args.answer_ms:,.0f} answers/s; {args.clients} clients, "
          f"{args.seconds:g} s per point, mean of {args.seeds} seeds; goodput/s (refused %)")
    for setting in settings:
        config = None if setting == "none" else throttle_config(setting)
        cells = []
        for rate in rates:
            runs = [simulate(rate, config, seconds=args.seconds, clients=args.clients,
                             answer_ms=args.answer_ms, refusal_ms=args.refusal_ms, seed=s)
                    for s in range(args.seeds)]
            good = sum(g for g, _ in runs) / len(runs)
            share = sum(r for _, r in runs) / len(runs)
            cells.append(f"{rate:g}: {good:5.0f} ({100 * share:2.0f} %)")
        print(f"{setting:10s} " + "  ".join(cells))


if __name__ == "__main__":
    main()
