"""Per-process ceiling: saturation throughput and server CPU per answer of the bare gRPC echo
server and of `adaptive-inference serve` (default flags but ``--workers``; CPU lanes only, as the
echo), in one run.

Every server runs as its own process (bench/echo_server.py; `client.process.ServerProcess`) and is
driven to saturation by the same ``--clients`` client processes, each closed-loop: it keeps
``--concurrency`` calls in flight with grpc.aio over ``--channels`` connections of its own (the
kernel spreads *connections* over ``--workers`` processes, so one connection per client would leave
workers idle by chance). Requests carry 1 image (``--images 1,8`` adds 8), are pinned to the
family's fastest variant and have no budget, so nothing is shed and each answer is a computed one.
Clients send pre-serialised bytes and take the answer as bytes, so their cost is the same against
the echo (whose canned answer is as long as the server's) and the server. Two echoes run: the
bare one, gRPC's defaults and the baseline of every "vs echo", and one that reads its sockets as
``serve``'s default ``--grpc-io`` does (`server.grpc_io`), to show what that setting alone buys.

Per server and image count, over a ``--seconds`` window after ``--warmup`` seconds of load:
answers/s, server CPU ms per answer (user + system of the server's process tree: the parent and
every worker, from psutil), client CPU ms per answer, the load average, and how the CPU split over
the workers. Every figure is the median of ``--repeats`` rounds; the rounds visit the servers in a
rotating order so drift in the machine's load does not favour one. The worker servers are also
driven by one client process alone (the default of `adaptive-inference bench`: one process,
`client.loadgen.CONNECTIONS` connections), the case in which more workers must not be slower.
``--stream`` also drives each server over ModelStreamInfer: every call in flight is a stream of
its own that sends its next request when the last one's answer arrived (a stream message costs
gRPC far less than a unary call).

    .venv/bin/python bench/ceiling.py [--family families/mnist5k] [--workers-list 1,2]
        [--clients 4] [--images 1] [--json FILE] [--server-cpus 0 --client-cpus 1]

``--compare 'uvloop=--event-loop uvloop'`` also serves with those flags (label ``1 worker,
uvloop``) in the same rotating rounds: an A/B of a serve option on the same tree, whose
"vs 1 wkr" column is then the ratio to the defaults. ``--compare-tree 'base=/tmp/base'`` serves
the code of another checkout instead (``git worktree add /tmp/base COMMIT``; same family, same
Python environment): the ratio of two versions measured in the same rounds.

``--server-cpus 0 --client-cpus 1`` puts every server process on CPU 0 and the client processes
on CPU 1: on a small host the clients then never take the server's core, and the rounds agree
closely enough to see a 5 % change (2 cores, 5 rounds: unary 0.533–0.560 ms per answer pinned,
0.486–0.528 ms unpinned). Pinned, every thread of the server (its event loop, gRPC's poller, the
inference pool) shares one core, so its CPU per answer is higher than unpinned; compare pinned
runs with pinned runs. A server measured so has one core, from its start (it sizes its pool by
it: `server/cpus.py`): use it with ``--workers-list 1``.

Loopback only; about 1.5 minutes with the defaults on 2 cores, and under 3 minutes with
``--workers-list 1,2,4,8 --clients 8`` on 16.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import shlex
import statistics
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

# Siblings under bench/ (a script's own folder is on sys.path), not a package.
from echo_server import METHOD as ECHO_METHOD
from overhead import start_echo

from client.client import build_request
from client.loadgen import CONNECTIONS
from client.process import LISTENING, SERVING, WORKERS, ServerProcess, cpu_set, spawning_on, tree_cpu
from client.results import host_info
from compression.core.family import load_family
from protos import wire
from protos.generated import grpc_service_pb2 as pb
from server.settings import ServeOptions

ROOT = Path(__file__).resolve().parents[1]
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
ECHO = "echo"  # the bare echo's label: every "vs echo" is against it
# A ModelStreamInferResponse whose first field is error_message (field 1, length-delimited) starts
# with this byte; an answer starts with its infer_response (field 2). Fields are serialised in
# field-number order, so one byte tells an error from an answer without parsing.
STREAM_ERROR_TAG = 0x0A


# --- the client processes -----------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One measurement, as each client process runs it."""

    target: str
    method: str
    payload: bytes
    concurrency: int
    channels: int
    start_at: float  # wall-clock (time.time) start and end of the measured window
    stop_at: float
    variant: str | None  # the first answer must come from it (None: the echo, unchecked)


@dataclass
class Drive:
    """What one client process measured in the window."""

    answers: int = 0
    seconds: float = 0.0
    cpu_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # gRPC status name → count


@dataclass
class _Tally:
    """What a client process's calls count, shared by them (one event loop: no locks)."""

    answers: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    running: bool = True


Caller = Callable[[], Coroutine[None, None, None]]


async def _drive(job: Job) -> Drive:
    # Each channel on its own TCP connection: channels with equal arguments share a subchannel.
    options = [*wire.channel_options(), ("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(job.target, options) for _ in range(job.channels)]
    tally = _Tally()
    caller = _stream_caller if job.method == STREAM_METHOD else _unary_caller
    callers = [await caller(ch, job, tally) for ch in channels]  # connected and checked
    tasks = [asyncio.create_task(callers[i % len(callers)]()) for i in range(job.concurrency)]
    await asyncio.sleep(max(job.start_at - time.time(), 0.0))
    n0, cpu0, t0 = tally.answers, time.process_time(), time.monotonic()
    await asyncio.sleep(max(job.stop_at - time.time(), 0.0))
    out = Drive(tally.answers - n0, time.monotonic() - t0, time.process_time() - cpu0)
    tally.running = False
    await asyncio.gather(*tasks)
    for ch in channels:
        await ch.close()
    out.errors = dict(tally.errors)
    return out


async def _unary_caller(channel: grpc.aio.Channel, job: Job, tally: _Tally) -> Caller:
    """One call in flight at a time on ``channel``, each answer followed by the next call."""
    # No serializers: bytes out, bytes in, the same client work for the echo and the server.
    call = channel.unary_unary(job.method)
    answer = await call(job.payload, timeout=30)  # connect, and check what answers
    if job.variant is not None:
        got = pb.ModelInferResponse.FromString(answer).model_version
        if got != job.variant:
            raise RuntimeError(f"answered by {got!r}, not the pinned {job.variant!r}")

    async def run() -> None:
        while tally.running:
            try:
                await call(job.payload, timeout=30)
                tally.answers += 1
            except grpc.aio.AioRpcError as exc:
                tally.errors[exc.code().name] += 1
    return run


async def _stream_caller(channel: grpc.aio.Channel, job: Job, tally: _Tally) -> Caller:
    """A ModelStreamInfer stream of its own per call in flight, writing the next request once
    the last one's answer came back."""
    call = channel.stream_stream(job.method)
    stream = call()  # connect, and check what answers
    await stream.write(job.payload)
    got = pb.ModelStreamInferResponse.FromString(await stream.read())
    await stream.done_writing()
    answered = got.error_message or got.infer_response.model_version
    if answered != job.variant:
        raise RuntimeError(f"stream answered {answered!r}, not the pinned {job.variant!r}")

    async def run() -> None:
        stream = call()
        try:
            while tally.running:
                await stream.write(job.payload)
                if (await stream.read())[0] == STREAM_ERROR_TAG:
                    tally.errors["stream error_message"] += 1
                else:
                    tally.answers += 1
            await stream.done_writing()
        except grpc.aio.AioRpcError as exc:
            tally.errors[exc.code().name] += 1
    return run


def _client_main(conn: multiprocessing.connection.Connection) -> None:
    """A client process: run each `Job` it is sent, send back its `Drive` (or the exception that
    stopped it); None ends it."""
    while (job := conn.recv()) is not None:
        try:
            conn.send(asyncio.run(_drive(job)))
        except Exception as exc:
            conn.send(exc)


class Clients:
    """``count`` client processes, started once for the whole run (spawned, not forked: no gRPC
    state may be inherited)."""

    def __init__(self, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[multiprocessing.connection.Connection] = []
        self._procs = []
        for _ in range(count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(child,), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)

    def start(self, job: Job, count: int) -> None:
        """``job`` on the first ``count`` clients; `results` waits for them."""
        for conn in self._conns[:count]:
            conn.send(job)

    def results(self, count: int) -> list[Drive]:
        drives = [conn.recv() for conn in self._conns[:count]]
        for d in drives:
            if isinstance(d, Exception):
                raise RuntimeError(f"a client failed: {type(d).__name__}: {d}") from d
        return drives

    def close(self) -> None:
        for conn in self._conns:
            conn.send(None)
        for proc in self._procs:
            proc.join(timeout=10)


# --- the servers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Server:
    """A started server: the root of its process tree and how to reach it."""

    label: str
    pid: int
    target: str
    method: str
    workers: int  # processes that answer (1 for the echo)


@dataclass(frozen=True)
class Compare:
    """A server measured against the defaults in the same rounds: other flags, or the code of
    another checkout (``tree``: its root, served with this environment's packages)."""

    label: str
    flags: tuple[str, ...] = ()
    tree: Path | None = None


def serve(family_dir: Path, workers: int, stack: contextlib.ExitStack,
          compare: Compare | None = None) -> Server:
    """`adaptive-inference serve` with default flags but ``--workers``, on the CPU lanes only,
    SERVING, until ``stack`` closes. (On a GPU host the default ``--device auto`` would also
    start GPU lanes in every worker, which the pinned CPU variant never uses.) ``compare``
    adds flags, or serves another checkout's code, to measure against the defaults."""
    flags = list(compare.flags) if compare else []
    sp = stack.enter_context(ServerProcess(
        [str(family_dir), "--port", "0", "--metrics-port", "-1", "--device", "cpu", "--workers",
         str(workers), *flags], cwd=compare.tree if compare else None))
    port = sp.port(WORKERS if workers > 1 else LISTENING)
    sp.wait_for(SERVING, count=workers)
    label = f"{workers} worker{'s' if workers > 1 else ''}"
    return Server(f"{label}, {compare.label}" if compare else label, sp.proc.pid,
                  f"127.0.0.1:{port}", INFER_METHOD, workers)


def echo(response_bytes: int, stack: contextlib.ExitStack, io: str | None = None) -> Server:
    """bench/echo_server.py answering ``response_bytes`` bytes, until ``stack`` closes: bare
    gRPC (the baseline), or reading its sockets as ``serve --grpc-io IO`` does."""
    proc, port = start_echo(response_bytes, io)

    def stop() -> None:
        proc.terminate()
        proc.wait(timeout=30)

    stack.callback(stop)
    label = ECHO if io is None else f"{ECHO}, --grpc-io {io}"
    return Server(label, proc.pid, f"127.0.0.1:{port}", ECHO_METHOD, 1)


# --- one measurement ----------------------------------------------------------------------------

def measure(clients: Clients, server: Server, payload: bytes, variant: str | None, *,
            count: int, args: argparse.Namespace) -> dict[str, Any]:
    """``count`` clients load ``server`` for ``args.warmup`` s, then for the ``args.seconds``
    window the figures are taken over."""
    start_at = time.time() + 0.5 + args.warmup  # 0.5 s for the clients to connect
    clients.start(Job(server.target, server.method, payload, args.concurrency, args.channels,
                      start_at, start_at + args.seconds, variant), count)
    load = os.getloadavg()[0]
    time.sleep(max(start_at - time.time(), 0.0))
    cpu0, t0 = tree_cpu(server.pid), time.monotonic()
    time.sleep(max(start_at + args.seconds - time.time(), 0.0))
    cpu1, wall = tree_cpu(server.pid), time.monotonic() - t0
    drives = clients.results(count)
    answers = sum(d.answers for d in drives)
    per_pid = sorted((cpu1[pid] - cpu0.get(pid, 0.0) for pid in cpu1), reverse=True)
    errors: collections.Counter[str] = collections.Counter()
    for d in drives:
        errors.update(d.errors)
    # The answering processes' shares of the server's CPU (the parent of --workers N idles).
    busy = per_pid[:server.workers]
    return {
        "answers_per_s": sum(d.answers / d.seconds for d in drives if d.seconds > 0),
        "server_cpu_ms": sum(per_pid) / max(answers, 1) * 1e3,
        "server_cores": sum(per_pid) / wall,
        "client_cpu_ms": sum(d.cpu_s for d in drives) / max(answers, 1) * 1e3,
        "load_average": load,
        "worker_cpu_share": [round(c / max(sum(busy), 1e-9), 3) for c in busy],
        "errors": dict(errors),
    }


FIGURES = ("answers_per_s", "server_cpu_ms", "server_cores", "client_cpu_ms", "load_average")


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over the repeats (errors summed), and the repeats themselves."""
    row: dict[str, Any] = {k: round(statistics.median(r[k] for r in runs), 4) for k in FIGURES}
    errors: collections.Counter[str] = collections.Counter()
    for r in runs:
        errors.update(r["errors"])
    row["errors"] = dict(errors)
    row["repeats"] = runs
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="families/mnist5k", help="a built family directory")
    ap.add_argument("--workers-list", default="1,2", help="--workers counts to serve with")
    ap.add_argument("--clients", type=int, default=4, help="client processes")
    ap.add_argument("--concurrency", type=int, default=16, help="calls in flight per client")
    ap.add_argument("--channels", type=int, default=CONNECTIONS,
                    help="connections per client (default: the bench's)")
    ap.add_argument("--images", default="1", help="images per request, e.g. 1,8")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=1.0, help="load before each window, s")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; figures are their medians")
    ap.add_argument("--stream", action="store_true",
                    help="also drive each server over ModelStreamInfer (each call in flight a "
                         "stream of its own; the client library's infer_stream)")
    ap.add_argument("--server-cpus", help="pin every server process to these CPUs, e.g. 0")
    ap.add_argument("--client-cpus", help="pin the client processes to these CPUs, e.g. 1")
    ap.add_argument("--compare", action="append", default=[], metavar="LABEL=FLAGS",
                    help="also serve with these flags, in the same rounds (an A/B), e.g. "
                         "'uvloop=--event-loop uvloop'; repeatable")
    ap.add_argument("--compare-tree", action="append", default=[], metavar="LABEL=PATH",
                    help="also serve the code of the checkout at PATH (e.g. a `git worktree` of "
                         "an older commit), in the same rounds: an A/B of two versions; "
                         "repeatable")
    ap.add_argument("--json", help="also write every figure to this file")
    args = ap.parse_args()
    def split(option: str, text: str, what: str) -> tuple[str, str]:
        label, sep, value = text.partition("=")
        if not sep or not label:
            ap.error(f"{option} {text!r}: expected LABEL={what}")
        return label, value

    compares: list[Compare | None] = [None]
    for c in args.compare:
        label, flags = split("--compare", c, "FLAGS")
        compares.append(Compare(label, tuple(shlex.split(flags))))
    for c in args.compare_tree:
        label, tree = split("--compare-tree", c, "PATH")
        if not (Path(tree) / "client" / "cli.py").is_file():
            ap.error(f"--compare-tree {c!r}: {tree!r} is not a checkout of this project")
        compares.append(Compare(label, tree=Path(tree).resolve()))
    family_dir = Path(args.family) if Path(args.family).is_absolute() else ROOT / args.family
    if not (family_dir / "manifest.json").is_file():
        raise SystemExit(f"no family in {family_dir} (build it: make family)")
    workers_list = [int(n) for n in args.workers_list.split(",")]
    images = [int(n) for n in args.images.split(",")]
    fam = load_family(family_dir)
    fastest = fam.fastest().name
    rng = np.random.default_rng(0)
    requests = {b: build_request(fam.name, rng.random((b, *fam.input_shape), dtype=np.float32),
                                 variant=fastest).SerializeToString() for b in images}
    host_start = host_info()
    began = time.monotonic()
    runs: dict[tuple[str, int, int], list[dict[str, Any]]] = collections.defaultdict(list)
    try:
        server_cpus, client_cpus = cpu_set(args.server_cpus), cpu_set(args.client_cpus)
    except ValueError as exc:
        ap.error(str(exc))
    with contextlib.ExitStack() as stack:
        with spawning_on(client_cpus):
            clients = Clients(args.clients)
        stack.callback(clients.close)
        # One after another: each warms up and re-measures its variants on a quiet machine.
        with spawning_on(server_cpus):
            servers = [serve(family_dir, n, stack, c) for n in workers_list for c in compares]
        with grpc.insecure_channel(servers[0].target, wire.channel_options()) as ch:
            infer = ch.unary_unary(INFER_METHOD)
            # The echo's canned answer is as long as the server's answer to the same request.
            sizes = {b: len(infer(requests[b], timeout=30)) for b in images}
        # The bare echo is the baseline; the second reads its sockets as serve's default does.
        with spawning_on(server_cpus):
            echoes = {b: [echo(sizes[b], stack), echo(sizes[b], stack, ServeOptions.grpc_io)]
                      for b in images}
        if args.stream:
            servers += [replace(s, label=f"{s.label}, stream", method=STREAM_METHOD)
                        for s in servers]
        passes = [(s, b, args.clients) for b in images for s in (*echoes[b], *servers)]
        passes += [(s, b, 1) for b in images for s in servers]  # the bench's single client
        for r in range(args.repeats):
            for server, b, count in passes[r % len(passes):] + passes[:r % len(passes)]:
                runs[(server.label, b, count)].append(measure(
                    clients, server, requests[b],
                    None if server.method == ECHO_METHOD else fastest, count=count, args=args))
    rows = {key: median_row(v) for key, v in runs.items()}
    report(rows, fam.name, fastest, workers_list, args, host_start, time.monotonic() - began)


def report(rows: dict[tuple[str, int, int], dict[str, Any]], family: str, variant: str,
           workers_list: list[int], args: argparse.Namespace, host_start: dict[str, Any],
           elapsed_s: float) -> None:
    """The table on stdout; every figure and the host in ``args.json``."""
    host = host_info()
    print(f"family {family!r}, variant {variant!r} pinned; {args.clients} client processes "
          f"(and 1) × {args.concurrency} in flight over {args.channels} connections each; "
          f"{args.seconds:g} s windows, median of {args.repeats}; {host['cpus']} cores, "
          f"load average {host_start['load_average'][0]:.2f} → {host['load_average'][0]:.2f}")
    print(f"{'server':<26}{'img':>4}{'clients':>8}{'answers/s':>11}{'srv CPU ms':>11}"
          f"{'cli CPU ms':>11}{'srv cores':>10}{'vs echo':>9}{'vs 1 wkr':>9}{'load':>6}  errors")
    figures: dict[str, Any] = {"family": family, "variant": variant, "host_start": host_start,
                               "host_end": host, "elapsed_s": round(elapsed_s, 1),
                               "config": vars(args), "rows": []}
    one_worker = "1 worker" if 1 in workers_list else None
    for (label, b, count), row in sorted(rows.items(), key=lambda kv: (
            kv[0][1], -kv[0][2], not kv[0][0].startswith(ECHO), kv[0])):
        echo_row = rows.get((ECHO, b, count))
        base = rows.get((one_worker, b, count)) if one_worker else None
        is_echo = label.startswith(ECHO)
        vs_echo = (row["answers_per_s"] / echo_row["answers_per_s"]
                   if echo_row is not None and label != ECHO else None)
        vs_one = (row["answers_per_s"] / base["answers_per_s"]
                  if base is not None and not is_echo and label != one_worker else None)
        print(f"{label:<26}{b:>4}{count:>8}{row['answers_per_s']:>11.0f}"
              f"{row['server_cpu_ms']:>11.3f}{row['client_cpu_ms']:>11.3f}"
              f"{row['server_cores']:>10.2f}"
              f"{'' if vs_echo is None else f'{vs_echo:.0%}':>9}"
              f"{'' if vs_one is None else f'{vs_one:.2f}x':>9}"
              f"{row['load_average']:>6.2f}  {row['errors'] or ''}")
        figures["rows"].append({"server": label, "images": b, "clients": count, **row,
                                "vs_echo": vs_echo, "vs_one_worker": vs_one})
    print(f"({elapsed_s:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
