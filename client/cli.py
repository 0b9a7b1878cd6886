"""The ``adaptive-inference`` command. Each subcommand parses its flags here and calls into its
room (``compression`` for build/inspect, ``server`` for serve, ``client`` for infer, bench, demo
and top), importing it lazily so ``--help`` stays fast. User mistakes exit 2 with one line, no traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from server.settings import (  # pure data: the serve flags' defaults and choices
    ACCELERATORS,
    BACKENDS,
    DEVICES,
    EVENT_LOOPS,
    GPU_DTYPES,
    GRPC_IO,
    MAX_PORT,
    ON_MISS,
    ServeOptions,
    Settings,
    is_duration,
)

Handler = Callable[[argparse.Namespace], int]
# The gRPC port `serve` listens on and the client commands' default --target use when set: one
# setting for both, so a container's health check follows the server to another port.
PORT_ENV = "ADAPTIVE_INFERENCE_PORT"
DEFAULT_PORT = ServeOptions.port  # the server's own default, written once
# Packages of the `build` extra: a command that needs one says how to install it.
BUILD_ONLY = ("torch", "torch_pruning", "onnxscript", "safetensors", "tqdm", "matplotlib")


def _build(args: argparse.Namespace) -> int:
    from compression import report
    from compression.build import build, load_config
    from compression.core.family import load_family

    cfg = load_config(args.config, data_spec=args.data, seed=args.seed)
    out = build(cfg, args.out, base_checkpoint=args.base_checkpoint, cache_dir=args.cache_dir,
                progress=not args.no_progress)
    family = load_family(out)
    splits = family.manifest["dataset"]["splits"]
    print(report.table(list(family.variants.values()), splits.get("test"), splits.get("val")))
    print(f"\nfamily {family.name!r} written to {out} ({family.manifest['build']['seconds']:.0f} s); "
          f"report: {out / 'report.md'}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from compression import report
    from compression.core.family import load_family

    family = load_family(args.family)
    m = family.manifest
    variants = list(family.variants.values())
    full = family.variants.get("full", variants[0])
    # accuracies on the test split, with their 95 % intervals over its size
    test_images = m.get("dataset", {}).get("splits", {}).get("test")
    print(f"family {family.name!r}: {len(family.variants)} variants, input "
          f"{m['input']['shape']}, dataset {m['dataset']['spec']!r}, {test_images} test images")
    val_images = m.get("dataset", {}).get("splits", {}).get("val")
    print(report.table(variants, test_images, val_images))
    print(f"\n{report.LEGEND}.\n{report.profile_note(m.get('build', {}).get('profile'))}")
    exits = [r for v in variants if v.exits
             for r in report.exit_rows(v, full, test_images, val_images)]
    if exits:
        print("\nearly exits as routed (the calibrated policy, no deeper than exit k):")
        print(report.text_table(report.EXIT_COLUMNS, exits))
    return 0


def _serve(args: argparse.Namespace) -> int:
    options = serve_options(args)
    from server import grpc_io

    grpc_io.configure(options.grpc_io)  # before anything imports grpc: gRPC reads it once
    from server.app import main

    return main(args.family, options)


def serve_options(args: argparse.Namespace) -> ServeOptions:
    """`serve`'s flags as the server's options."""
    return ServeOptions(
        host=args.host, port=args.port, metrics_host=args.metrics_host,
        metrics_port=None if args.metrics_port == -1 else args.metrics_port, workers=args.workers,
        backend=args.backend, device=args.device, gpu_dtype=args.gpu_dtype,
        gpu_max_batch=args.gpu_max_batch, accelerator=args.accelerator,
        event_loop=args.event_loop, grpc_io=args.grpc_io,
        **({"threads": args.threads} if args.threads is not None else {}),
        settings=Settings(max_batch=args.max_batch, max_queue_delay_ms=args.max_queue_delay_ms,
                          max_queue=args.max_queue, on_miss=args.on_miss,
                          target_miss_rate=args.target_miss_rate,
                          intra_op_threads=args.intra_op_threads,
                          deadline_margin_ms=args.deadline_margin_ms,
                          inline_below_ms=args.inline_below_ms,
                          batch_timeout_ms=args.batch_timeout_ms,
                          quarantine_s=args.quarantine_s),
        grace_s=args.grace_s, max_message_bytes=int(args.max_message_mb * (1 << 20)),
        backlog=args.backlog,
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file, faults=tuple(args.inject_fault))


def _client_security(args: argparse.Namespace) -> dict[str, Any]:
    """AdaptiveClient keyword arguments from the --tls-ca/--tls-cert/--tls-key/--token-file flags."""
    from server.security import read_token

    return {"root_certificates": args.tls_ca, "client_cert": args.tls_cert,
            "client_key": args.tls_key, "tls": args.tls or None,
            "token": read_token(args.token_file) if args.token_file else None}


def _add_client_security(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls", action="store_true", help="TLS with the system's CAs")
    p.add_argument("--tls-ca", help="PEM of the CA that signed the server's certificate (TLS)")
    p.add_argument("--tls-cert", help="client certificate PEM (mutual TLS; with --tls-key)")
    p.add_argument("--tls-key", help="client key PEM (mutual TLS)")
    p.add_argument("--token-file", help="file holding the bearer token the server requires")


def _add_client_io(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grpc-io", choices=GRPC_IO, default=ServeOptions.grpc_io,
                   help="which threads read this process's connections: poller: gRPC's asyncio "
                        "poller thread itself (less CPU per request: more left to a server on the "
                        "same host); event-engine: gRPC's own default, its EventEngine thread "
                        f"pool (default {ServeOptions.grpc_io})")


def _infer(args: argparse.Namespace) -> int:
    from client.client import AdaptiveClient
    from client.images import read_images

    with AdaptiveClient(args.target, **_client_security(args)) as client:
        shape = list(client.metadata().inputs[0].shape)[1:]
        x = read_images(args.file, shape)
        r = client.infer(x, budget_ms=args.budget_ms, variant=args.variant, timeout=args.timeout)
    where = r.variant if r.exit is None else f"{r.variant} (exit {r.exit})"
    budget = "no budget" if r.budget_ms is None else (
        f"budget {r.budget_ms:.3f} ms {'met' if r.met else 'MISSED'}")
    print(f"{where}: {r.latency_ms:.3f} ms round trip (queue {r.queue_ms or 0:.3f} ms, "
          f"compute {r.compute_ms or 0:.3f} ms), {budget}")
    for i, (c, p) in enumerate(zip(r.classes, r.probabilities.max(axis=1), strict=True)):
        print(f"  [{i}] class {int(c)}  p={p:.3f}")
    return 0


def _health(args: argparse.Namespace) -> int:
    from client.client import AdaptiveClient

    with AdaptiveClient(args.target, **_client_security(args)) as client:
        status = client.health(args.service, timeout=args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


def _client_io(args: argparse.Namespace) -> None:
    """A load generator's channels read their sockets as ``--grpc-io`` says, set before anything
    imports grpc (gRPC reads it once)."""
    from server import grpc_io

    grpc_io.configure(args.grpc_io, grpc_io.CLIENT)


def _bench(args: argparse.Namespace) -> int:
    _client_io(args)
    from pathlib import Path

    from client import bench, loadgen, results
    from client.throttle import ThrottleConfig
    from server.errors import InvalidArgument

    def progress(line: str) -> None:  # one line rewritten in place on a terminal
        if sys.stderr.isatty():
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    try:
        data = loadgen.load_test_data(args.data, args.family, seed=args.seed)
        result = bench.run_bench(
            args.target, args.rate, args.duration, args.budget_ms, data, variant=args.variant,
            images=args.images, seed=args.seed, max_inflight=args.max_inflight,
            timeout_s=args.timeout, deadline_is_budget=args.deadline_is_budget,
            throttle=ThrottleConfig() if args.throttle else None,
            progress=None if args.quiet else progress, wait_ready_s=args.wait_ready,
            progress_every_s=0.5 if sys.stderr.isatty() else 5.0)
    except ValueError as exc:  # a shape or variant the server does not have
        raise InvalidArgument(str(exc)) from None
    if not args.quiet and sys.stderr.isatty():
        sys.stderr.write("\n")
    paths = bench.write_outputs(result, Path(args.out), plots=not args.no_plots)
    print(results.summary_table(result.results))
    print(f"\n{result.results['policy']}, budget {args.budget_ms}, {args.images} image(s) per "
          f"request; written: {', '.join(str(p) for p in paths)}")
    return 0


def _arg_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """argparse type from a parser raising ValueError: its message becomes the usage error."""
    def convert(text: str) -> object:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _count_arg(least: int) -> Callable[[str], object]:
    """argparse type: a whole number of at least ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{text!r}: expected a whole number") from None
        if value < least:
            raise ValueError(f"{value}: expected {least} or more")
        return value
    return _arg_type(parse)


def _seconds_arg(*, zero: bool = False) -> Callable[[str], object]:
    """argparse type: a finite number of seconds (or ms), more than 0 (0 too where ``zero``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r}: expected a number") from None
        if not is_duration(value, zero=zero):
            raise ValueError(f"{text}: expected a finite number {'≥' if zero else '>'} 0")
        return value
    return _arg_type(parse)


def _demo(args: argparse.Namespace) -> int:
    _client_io(args)
    from pathlib import Path

    from client.demo import run_demo

    result = run_demo(Path(args.family), Path(args.config), loads=args.loads,
                      seconds=args.seconds, reference=args.reference,
                      out_dir=None if args.no_plot else Path(args.out))
    screen = result.report()
    print(screen)
    if args.screen:  # `make docs` puts this final screen into docs/serving.md
        Path(args.screen).parent.mkdir(parents=True, exist_ok=True)
        Path(args.screen).write_text(screen + "\n")
    return 0


def _top(args: argparse.Namespace) -> int:
    from client.top import run_top

    return run_top(args.target, args.metrics, once=args.once, interval_s=args.interval,
                   client_kwargs=_client_security(args))


def _rates(text: str) -> list[float]:
    """``--rate`` and ``--loads``: positive numbers, comma-separated."""
    from client.budgets import parse_rates

    return parse_rates(text)


def _budget_spec(text: str) -> object:
    from client.budgets import BudgetSpec

    return BudgetSpec.parse(text)


def _examples(*lines: str) -> dict[str, Any]:
    """``add_parser`` keywords giving a subcommand's ``--help`` an examples section."""
    return {"epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


def _log_flags(p: argparse.ArgumentParser, default: object) -> None:
    """-v / -q, on the main parser (``default`` False) and on every subcommand (``default``
    SUPPRESS, so a flag given before the subcommand is not reset by it)."""
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="warnings and errors only (and no progress lines)")


def default_port(environ: Mapping[str, str] = os.environ) -> int:
    """``$ADAPTIVE_INFERENCE_PORT`` if set, else 8001; ValueError naming the variable if bad."""
    text = environ.get(PORT_ENV)
    if text is None:
        return DEFAULT_PORT
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= MAX_PORT:
        raise ValueError(f"${PORT_ENV} {text!r}: expected a port number (0-{MAX_PORT})")
    return port


def parser(port: int = DEFAULT_PORT) -> argparse.ArgumentParser:
    """The command line; ``port`` is the default gRPC port (`default_port`)."""
    target = f"127.0.0.1:{port}"
    p = argparse.ArgumentParser(prog="adaptive-inference",
                                description="Build and serve an adaptive model family.")
    _log_flags(p, False)
    common = argparse.ArgumentParser(add_help=False)
    _log_flags(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="train and compress a model family from a TOML config",
                       parents=[common], **_examples(
                           "adaptive-inference build configs/mnist5k.toml --out families/mnist5k",
                           "adaptive-inference build configs/quick.toml --out /tmp/quick "
                           "--data idx:data/fashion --seed 1"))
    b.add_argument("config", help="TOML family config, e.g. configs/mnist5k.toml")
    b.add_argument("--out", required=True, help="family directory to write")
    b.add_argument("--data", help="dataset spec overriding the config: mnist5k, idx:DIR, npz:FILE")
    b.add_argument("--seed", type=int, help="seed overriding the config")
    b.add_argument("--base-checkpoint", help="your trained base model (safetensors or state_dict)")
    b.add_argument("--cache-dir", help="where trained base models are cached "
                   "(default $ADAPTIVE_CACHE or ~/.cache/adaptive-inference)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(handler=_build)

    i = sub.add_parser("inspect", help="print a family's variant table from its manifest",
                       parents=[common], **_examples("adaptive-inference inspect families/demo"))
    i.add_argument("family", help="family directory")
    i.set_defaults(handler=_inspect)

    s = sub.add_parser("serve", help="serve a family over KServe v2 gRPC, routing by budget",
                       parents=[common], **_examples(
                           "adaptive-inference serve families/mnist5k --port 8001 "
                           "--metrics-port 8002",
                           "adaptive-inference serve families/demo --workers 2 --on-miss "
                           "best-effort"))
    s.add_argument("family", help="family directory (from build)")
    # Every default below is ServeOptions' or Settings' own (server/settings.py): written once.
    so, st = ServeOptions(), Settings()
    s.add_argument("--host", default=so.host, help=f"address to listen on (default {so.host})")
    s.add_argument("--port", type=int, default=port,
                   help=f"gRPC port (default ${PORT_ENV}, else {DEFAULT_PORT}; now {port}; 0: any)")
    s.add_argument("--metrics-port", type=int, default=so.metrics_port,
                   help=f"Prometheus /metrics port (default {so.metrics_port}; 0: any; -1: off)")
    s.add_argument("--metrics-host", help="address for /metrics (default: --host)")
    s.add_argument("--workers", type=int, default=so.workers,
                   help="processes sharing the port (SO_REUSEPORT), metrics aggregated "
                        f"(default {so.workers})")
    s.add_argument("--backend", choices=BACKENDS, default=so.backend,
                   help="what runs the CPU lanes: ONNX Runtime, or torch (the same graphs "
                        f"converted; int8 stays on ONNX Runtime) (default {so.backend})")
    s.add_argument("--device", choices=DEVICES, default=so.device,
                   help="where variants run. auto: on the CPU, and also on the GPU when torch "
                        "sees one, the router choosing per request; cuda: on the GPU (the CPU "
                        "only for variants without a GPU form); cpu: CPU only "
                        f"(default {so.device})")
    s.add_argument("--gpu-dtype", choices=GPU_DTYPES, default=so.gpu_dtype,
                   help="precision of the GPU lanes; fp16/bf16 re-measure each candidate's "
                        f"accuracy on the family's validation sample (default {so.gpu_dtype})")
    s.add_argument("--gpu-max-batch", type=int, default=so.gpu_max_batch,
                   help="samples per batch on a GPU lane, one CUDA graph per power of two up "
                        f"to it (default {so.gpu_max_batch})")
    s.add_argument("--accelerator", choices=ACCELERATORS, default=so.accelerator,
                   help="torch device of the GPU lanes; cpu runs their code on the CPU, for "
                        f"tests and CI on machines without a GPU (default {so.accelerator})")
    s.add_argument("--event-loop", choices=EVENT_LOOPS, default=so.event_loop,
                   help="the serving event loop; auto: uvloop where it is installed (4-6%% "
                        f"less CPU per request), else asyncio's (default {so.event_loop})")
    s.add_argument("--grpc-io", choices=GRPC_IO, default=so.grpc_io,
                   help="which threads read the sockets: poller: gRPC's asyncio poller thread "
                        "itself (one thread hand-off fewer per call: less CPU per request and "
                        "lower latency); event-engine: gRPC's own default, its EventEngine "
                        f"thread pool (default {so.grpc_io})")
    s.add_argument("--max-batch", type=int, default=st.max_batch,
                   help=f"samples per batch (default {st.max_batch})")
    s.add_argument("--max-queue-delay-ms", type=float, default=st.max_queue_delay_ms,
                   help="hold a request up to this long for a fuller batch, never past what its "
                        f"deadline allows (default {st.max_queue_delay_ms:g}; 0: batch only what "
                        "queued meanwhile)")
    s.add_argument("--max-queue", type=int, default=st.max_queue,
                   help=f"samples queued per variant before RESOURCE_EXHAUSTED (default "
                        f"{st.max_queue})")
    s.add_argument("--on-miss", choices=ON_MISS, default=st.on_miss,
                   help="when not even the fastest candidate can finish inside a request's "
                        "budget under the load now: fail it at once with DEADLINE_EXCEEDED "
                        f"(shed), or run the fastest anyway (best-effort) (default {st.on_miss})")
    s.add_argument("--target-miss-rate", type=float, default=st.target_miss_rate,
                   help="share of budgeted requests allowed to finish late; the router's "
                        f"safety margin adapts to hold it (default {st.target_miss_rate:g})")
    s.add_argument("--threads", type=int,
                   help="inference worker threads (default: the cores this process may use: "
                        "its CPU affinity, capped by a cgroup CPU quota)")
    s.add_argument("--intra-op-threads", type=int, default=st.intra_op_threads,
                   help=f"ORT threads per batch (default {st.intra_op_threads})")
    s.add_argument("--inline-below-ms", type=float, default=st.inline_below_ms,
                   help="run a batch on the event loop instead of the thread pool when it is "
                        "predicted under this many ms: the hand-off to a thread and back costs "
                        f"more than a small batch (default {st.inline_below_ms:g}; 0: always "
                        "the pool)")
    s.add_argument("--deadline-margin-ms", type=float, default=st.deadline_margin_ms,
                   help="kept back from the gRPC deadline for the reply (default "
                        f"{st.deadline_margin_ms:g})")
    s.add_argument("--grace-s", type=float, default=so.grace_s,
                   help="on SIGTERM: health NOT_SERVING, new requests refused, in-flight ones get "
                        f"this long to finish (default {so.grace_s:g})")
    message_mb = so.max_message_bytes / (1 << 20)
    s.add_argument("--max-message-mb", type=float, default=message_mb,
                   help=f"largest request accepted, MiB (default {message_mb:g}; larger: "
                        "RESOURCE_EXHAUSTED)")
    s.add_argument("--backlog", type=int, default=so.backlog,
                   help="calls gRPC may hold for each process before the server has read them; "
                        "past it, new calls are refused on arrival (CANCELLED) at almost no "
                        "cost, which keeps goodput past saturation for clients with budgets. "
                        "Clients keeping many calls in flight without budgets get refused too "
                        f"(default {so.backlog}: gRPC's own default; see docs/serving.md, "
                        "Overload)")
    s.add_argument("--batch-timeout-ms", type=float, default=st.batch_timeout_ms,
                   help="a batch running longer than max(this, 10 x its predicted p95) fails; its "
                        f"requests are retried on another variant (default "
                        f"{st.batch_timeout_ms:g})")
    s.add_argument("--quarantine-s", type=float, default=st.quarantine_s,
                   help="a failed variant is skipped and re-probed after this long, doubling per "
                        f"failed probe up to {st.quarantine_max_s:g} s (default "
                        f"{st.quarantine_s:g})")
    s.add_argument("--tls-cert", help="server certificate chain PEM (TLS; with --tls-key)")
    s.add_argument("--tls-key", help="server private key PEM")
    s.add_argument("--tls-client-ca", help="CA PEM that client certificates must be signed by "
                                           "(mutual TLS)")
    s.add_argument("--auth-token-file", help="require 'authorization: Bearer <token>' with the "
                                             "token in this file (health checks exempt)")
    s.add_argument("--inject-fault", action="append", default=[], metavar="VARIANT:MODE[:RATE]",
                   help="FOR TESTS ONLY: make VARIANT's batches raise or hang (MODE raise|hang) "
                        "at RATE (default 1); repeatable")
    s.set_defaults(handler=_serve)

    f = sub.add_parser("infer", help="classify an image file on a running server",
                       parents=[common], **_examples(
                           "adaptive-inference infer --target 127.0.0.1:8001 digit.png "
                           "--budget-ms 2",
                           "adaptive-inference infer digits.npy --variant early-exit@1"))
    f.add_argument("file", help="FILE.npy ([H,W], [C,H,W] or [N,C,H,W]) or an image (PNG, JPEG)")
    f.add_argument("--target", default=target, help=f"server HOST:PORT (default {target})")
    f.add_argument("--budget-ms", type=float, help="latency budget in milliseconds")
    f.add_argument("--variant", help="pin a variant (or VARIANT@EXIT) instead of routing")
    f.add_argument("--timeout", type=_seconds_arg(), help="gRPC deadline in seconds")
    _add_client_security(f)
    f.set_defaults(handler=_infer)

    h = sub.add_parser("health", help="ask a server's grpc.health.v1 status (exit 0 if SERVING)",
                       parents=[common], **_examples(
                           "adaptive-inference health --target 127.0.0.1:8001 && echo up"))
    h.add_argument("--target", default=target, help=f"server HOST:PORT (default {target})")
    h.add_argument("--service", default="", help="service name (default: the whole server)")
    h.add_argument("--timeout", type=_seconds_arg(), default=3.0, help="seconds (default 3)")
    _add_client_security(h)
    h.set_defaults(handler=_health)

    k = sub.add_parser("bench", help="open-loop Poisson load at given rates against a running "
                                     "server; results.json and plots",
                       parents=[common], **_examples(
                           "adaptive-inference bench --target 127.0.0.1:8001 --rate 50,100,200 "
                           "--budget-ms uniform:5:10 --family families/mnist5k --images 32",
                           "adaptive-inference bench --rate 100 --variant full --budget-ms 10 "
                           "--out results/pinned"))
    k.add_argument("--target", default=target, help=f"server HOST:PORT (default {target})")
    k.add_argument("--rate", required=True, type=_arg_type(_rates),
                   help="offered requests/s; R1,R2,... runs one after another")
    k.add_argument("--duration", type=_seconds_arg(), default=10.0, help="seconds per rate (default 10)")
    k.add_argument("--budget-ms", default="none", type=_arg_type(_budget_spec),
                   help="per-request budget: MS, uniform:A:B, a mixture MS:WEIGHT,... "
                        "(e.g. 2:0.5,10:0.3,50:0.2), or none (default)")
    k.add_argument("--variant", help="pin a variant (or VARIANT@EXIT); default: the router picks")
    k.add_argument("--data", help="dataset spec whose test split is sent (mnist5k, idx:DIR, "
                                  "npz:FILE, or random: no labels); default: the family's, else "
                                  "mnist5k")
    k.add_argument("--family", help="family dir: its manifest gives the dataset, seed and split")
    k.add_argument("--seed", type=int, default=0,
                   help="split seed without --family; also seeds arrivals and budgets")
    k.add_argument("--images", type=_count_arg(1), default=1, help="images per request (default 1)")
    k.add_argument("--timeout", type=_seconds_arg(),
                   help="gRPC deadline in seconds (default: 2 x budget + 50 ms, as AdaptiveClient)")
    k.add_argument("--deadline-is-budget", action="store_true",
                   help="gRPC deadline = each request's budget: the server also counts transport "
                        "and gRPC queueing against it; late answers end DEADLINE_EXCEEDED")
    k.add_argument("--throttle", action="store_true",
                   help="keep back what AdaptiveClient's throttle would (client-side adaptive "
                        "throttling: docs/serving.md, Overload); counted as client_throttled")
    k.add_argument("--max-inflight", type=_count_arg(1), default=4096,
                   help="unanswered requests before arrivals are dropped (counted as "
                        "client_dropped)")
    k.add_argument("--wait-ready", type=_seconds_arg(zero=True), default=30.0,
                   help="seconds to wait for the server to be SERVING (default 30)")
    k.add_argument("--out", default="results/bench", help="output dir (default results/bench)")
    _add_client_io(k)
    k.add_argument("--no-plots", action="store_true", help="results.json and requests.csv only")
    k.set_defaults(handler=_bench)

    d = sub.add_parser(
        "demo", parents=[common],
        help="build the demo family if needed, serve it twice (adaptive; pinned to full), drive "
             "the same load ramp across full's capacity at both, print and plot what happened",
        description="Builds (or reuses) the demo family, starts two servers with default flags "
                    "(one adaptive, one with every request pinned to full), measures full's idle "
                    "round trip (budgets: uniform over [p99, 2 x p99]) and capacity on this host, "
                    "then offers the same open-loop ramp (LOADS x full's capacity) to both.",
        **_examples("adaptive-inference demo",
                    "adaptive-inference demo --loads 1,2,4,8 --seconds 5 --out /tmp/demo"))
    d.add_argument("--family", default="families/demo", help="where the demo family lives")
    d.add_argument("--config", default="configs/demo.toml", help="config to build it from")
    d.add_argument("--loads", type=_arg_type(_rates), default=[0.5, 1.0, 2.0, 3.0],
                   help="the ramp, in multiples of full's capacity (default 0.5,1,2,3)")
    d.add_argument("--seconds", type=_seconds_arg(), default=4.0, help="seconds per load (default 4)")
    d.add_argument("--reference", default="full",
                   help="the variant the other server pins every request to (default full)")
    d.add_argument("--out", default="results/demo", help="where the plot goes "
                                                         "(default results/demo)")
    d.add_argument("--no-plot", action="store_true", help="tables only")
    d.add_argument("--screen", metavar="FILE", help="also write the final screen to FILE")
    _add_client_io(d)
    d.set_defaults(handler=_demo)

    t = sub.add_parser(
        "top", parents=[common],
        help="live view of a running server: requests/s, in-budget share, accuracy served, "
             "variant/exit mix, queues, host load, the router's state",
        description="Reads the server's /metrics and its candidate table once a second and "
                    "redraws. Window figures cover the last interval (--once: two scrapes "
                    "--interval apart).",
        **_examples("adaptive-inference top --target 127.0.0.1:8001 "
                    "--metrics http://127.0.0.1:8002/metrics",
                    "adaptive-inference top --once > frame.txt"))
    t.add_argument("--target", default=target, help=f"server HOST:PORT (default {target})")
    t.add_argument("--metrics", default="http://127.0.0.1:8002/metrics",
                   help="the server's Prometheus URL (default http://127.0.0.1:8002/metrics)")
    t.add_argument("--interval", type=_seconds_arg(), default=1.0, help="seconds between frames "
                                                               "(default 1)")
    t.add_argument("--once", action="store_true", help="print one frame and exit")
    _add_client_security(t)
    t.set_defaults(handler=_top)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        port = default_port()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    p = parser(port)
    args = p.parse_args(argv)
    if args.verbose and args.quiet:
        p.error("-v/--verbose and -q/--quiet exclude each other")
    logging.basicConfig(level=logging.DEBUG if args.verbose else
                        logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from compression.core.errors import BuildError
    from server.errors import AdaptiveError, InvalidArgument, NotFound

    try:
        return int(args.handler(args))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AdaptiveError as exc:  # a serving error: the server's message, named by its status
        print(f"error: {exc.code}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidArgument | NotFound) else 1
    except ModuleNotFoundError as exc:
        if exc.name not in BUILD_ONLY:
            raise
        # The serving install (and the server image) leaves the build's torch stack out.
        print(f"error: this command needs {exc.name!r}, part of the build extra: "
              f"pip install 'adaptive-inference[build]' (with the CPU torch wheel first, see the "
              f"README)", file=sys.stderr)
        return 2
    except OSError as exc:  # cannot bind a port, unreadable input file
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
