"""The commands: `serve` as a real process (one worker and N workers), `infer` against it."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from client import AdaptiveClient, InvalidArgument
from client.cli import main as cli_main
from client.process import METRICS, SERVING, WORKERS, ServerProcess
from server.settings import ServeOptions, Settings
from tests.harness import RunningServer

CLI = [sys.executable, "-m", "client.cli"]


@pytest.fixture
def serve_workers(serving_family: Path) -> Iterator[ServerProcess]:
    p = ServerProcess([str(serving_family), "--port", "0", "--metrics-port", "0", "--workers",
                       "2", "--threads", "2"])
    yield p
    if p.proc.poll() is None:  # a failed test: workers die with their parent (PDEATHSIG)
        p.proc.kill()
        p.proc.wait()


def test_serve_with_two_workers_shares_port_and_metrics(serve_workers: ServerProcess,
                                                        images: np.ndarray) -> None:
    port = serve_workers.port(WORKERS)
    mport = serve_workers.port(METRICS)
    serve_workers.wait_for(SERVING, count=2)
    n = 0
    for _ in range(4):  # separate connections, so the kernel can spread them over workers
        with AdaptiveClient(f"127.0.0.1:{port}",
                            options=[("grpc.use_local_subchannel_pool", 1)]) as c:
            for _ in range(3):
                assert c.infer(images[:1], budget_ms=500).variant == "slow"
                n += 1
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    ok = sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
             if s.name == "adaptive_requests_total" and s.labels.get("status") == "OK")
    assert ok == n
    acc = [s.value for fam in text_string_to_metric_families(text) for s in fam.samples
           if s.name == "adaptive_variant_accuracy_ratio" and s.labels.get("variant") == "slow"]
    assert acc == [pytest.approx(0.99)]  # gauges of both workers merged into one series
    assert serve_workers.stop() == 0


def test_a_client_with_several_connections_reaches_every_worker(serve_workers: ServerProcess,
                                                                images: np.ndarray) -> None:
    """The workers share one port and the kernel spreads connections, not requests: a client
    with ``connections=16`` holds 16 TCP connections (not one shared subchannel) and sends
    round-robin over them, so both workers serve it (all 16 on one worker: 1 in 32,768)."""
    port = serve_workers.port(WORKERS)
    serve_workers.wait_for(SERVING, count=2)
    with AdaptiveClient(f"127.0.0.1:{port}", connections=16) as c:
        c.wait_ready(timeout=30)
        answers = [c.infer(images[:1], budget_ms=500) for _ in range(32)]
        streamed = list(c.infer_stream([images[:1]] * 4))
        held = {w.pid: sum(1 for k in w.net_connections("tcp")
                           if k.status == psutil.CONN_ESTABLISHED and k.laddr.port == port)
                for w in psutil.Process(serve_workers.proc.pid).children()}
    assert all(a.variant == "slow" for a in answers) and len(streamed) == 4
    assert len(held) == 2 and sum(held.values()) == 16 and min(held.values()) > 0, held
    with pytest.raises(InvalidArgument, match="connections 0"):
        AdaptiveClient(f"127.0.0.1:{port}", connections=0)
    assert serve_workers.stop() == 0


def test_serve_refuses_a_bad_family_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([*CLI, "serve", str(tmp_path), "--port", "0"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "manifest.json: file not found" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="this host's onnxruntime has CUDA: --device cuda is valid here")
def test_serve_device_cuda_without_a_usable_gpu_is_one_line(serving_family: Path) -> None:
    proc = subprocess.run([*CLI, "serve", str(serving_family), "--device", "cuda", "--port", "0",
                           "--metrics-port", "-1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    # what is missing (torch's CUDA: here a CPU build or no GPU) and what to do instead
    assert lines[0].startswith("error: INVALID_ARGUMENT: --device cuda: torch"), lines[0]
    assert "CUDA" in lines[0] and "--device cpu" in lines[0]


def test_serve_reports_a_taken_port_in_one_line(serving_family: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run([*CLI, "serve", str(serving_family), "--port",
                               str(taken.getsockname()[1]), "--metrics-port", "-1"],
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "error: cannot listen on '127.0.0.1:" in proc.stderr and "Traceback" not in proc.stderr


def test_infer_command_with_npy_and_png(server: RunningServer, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    npy = tmp_path / "digits.npy"
    np.save(npy, np.random.default_rng(1).random((2, 1, 28, 28), dtype=np.float32))
    # Pinned: which variant a budget routes to depends on the host's load (the router's CPU
    # share), and a test before this one may still be loading it; this test is about the output.
    assert cli_main(["infer", "--target", server.target, str(npy), "--budget-ms", "500",
                     "--variant", "slow"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("slow:") and "budget 500.000 ms" in out and "[1] class" in out

    png = tmp_path / "digit.png"
    Image.fromarray(np.full((40, 40), 255, np.uint8)).save(png)  # resized to 28×28, all white
    assert cli_main(["infer", "--target", server.target, str(png), "--variant",
                     "early-exit"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("early-exit (exit 0):") and "[0] class 0  p=1.000" in out


def test_health_command(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["health", "--target", server.target]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert cli_main(["health", "--target", server.target, "--service", "nope"]) == 1
    assert capsys.readouterr().out.strip() == "SERVICE_UNKNOWN"
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert cli_main(["health", "--target", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    assert capsys.readouterr().out.strip() == "UNREACHABLE"


def test_infer_command_errors_are_one_line(server: RunningServer, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["infer", "--target", server.target, str(tmp_path / "none.npy")]) == 2
    assert "error: INVALID_ARGUMENT: file" in capsys.readouterr().err
    bad = tmp_path / "wrong.npy"
    np.save(bad, np.zeros((3, 28, 28), np.float32))  # three channels for a one-channel model
    assert cli_main(["infer", "--target", server.target, str(bad)]) == 2
    assert "[1, 3, 28, 28]" in capsys.readouterr().err
    npy = tmp_path / "ok.npy"
    np.save(npy, np.zeros((28, 28), np.float32))
    assert cli_main(["infer", "--target", server.target, str(npy), "--variant", "nope"]) == 2
    assert "error: NOT_FOUND: model_version 'nope'" in capsys.readouterr().err
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None  # nothing leaked into this process


def test_inspect_command_prints_the_variant_table(quick_family: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from compression.core.family import load_family

    family = load_family(quick_family)
    assert cli_main(["-q", "inspect", str(quick_family)]) == 0
    out = capsys.readouterr().out
    first, *rest = out.splitlines()
    assert first.startswith(f"family {family.name!r}: {len(family.variants)} variants")
    names = [line.split()[0] for line in rest[2:rest.index("")]]  # the table ends at a blank
    assert names == list(family.variants)  # one row per variant, in manifest order
    assert cli_main(["inspect", str(quick_family / "missing")]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_every_subcommand_help_shows_examples_and_log_flags() -> None:
    from client.cli import parser

    p = parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"build", "inspect", "serve", "infer", "health", "bench", "demo",
                                "top"}
    for name, sp in sub.choices.items():
        text = sp.format_help()
        assert "\nexamples:\n  adaptive-inference " + name in text, name
        assert "--quiet" in text and "--verbose" in text, name


def test_serve_without_flags_runs_with_the_servers_own_defaults() -> None:
    """Every serve flag's default is ServeOptions' and Settings' (one place to change one), and
    its help says that value."""
    from client.cli import parser, serve_options

    p = parser(port=8001)
    opts = serve_options(p.parse_args(["serve", "/family"]))
    assert opts == ServeOptions()
    assert serve_options(p.parse_args(["serve", "/family", "--max-batch", "8", "--metrics-port",
                                       "-1"])) == replace(ServeOptions(), metrics_port=None,
                                                          settings=Settings(max_batch=8))
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["serve"].format_help().split())
    for flag, value in (("--max-batch", Settings().max_batch),
                        ("--inline-below-ms", Settings().inline_below_ms),
                        ("--grace-s", ServeOptions().grace_s),
                        ("--max-message-mb", ServeOptions().max_message_bytes >> 20)):
        entry = text.split(flag, 2)[2].split(" --", 1)[0]  # its line under "options:"
        assert f"(default {value:g}" in entry, (flag, entry)


@pytest.mark.parametrize(("flags", "message"), [
    ("--max-batch 0", "--max-batch 0: samples per batch, 1 or more"),
    ("--max-batch -5", "--max-batch -5: samples per batch, 1 or more"),
    ("--max-queue 0", "--max-queue 0: samples queued per variant, 1 or more"),
    ("--workers 0", "--workers 0: processes, 1 or more"),
    ("--threads 0", "--threads 0: worker threads, 1 or more"),
    ("--intra-op-threads 0", "--intra-op-threads 0: threads per batch, 1 or more"),
    ("--gpu-max-batch 0", "--gpu-max-batch 0: samples per GPU batch, 1 or more"),
    ("--grace-s -1", "--grace-s -1.0: seconds, 0 or more"),
    ("--max-queue-delay-ms nan", "--max-queue-delay-ms nan: milliseconds, 0 or more"),
    ("--deadline-margin-ms -0.5", "--deadline-margin-ms -0.5: milliseconds, 0 or more"),
    ("--inline-below-ms inf", "--inline-below-ms inf: milliseconds, 0 or more"),
    ("--batch-timeout-ms 0", "--batch-timeout-ms 0.0: milliseconds, more than 0"),
    ("--quarantine-s 0", "--quarantine-s 0.0: seconds, more than 0"),
    ("--quarantine-s 120", "--quarantine-s 120.0: at most the quarantine's cap, 60 s"),
    ("--target-miss-rate 2", "--target-miss-rate 2.0: a share of requests, between 0 and 1 "
                             "(both excluded)"),
    ("--max-message-mb 0", "--max-message-mb 0.0: MiB, more than 0"),
    ("--port 70000", "--port 70000: a port, 0 (any) to 65535"),
    ("--metrics-port -5", "--metrics-port -5: a port, 0 (any) to 65535, or -1 (no endpoint)"),
    ("--backlog -1", "--backlog -1: a number of calls, 0 (unbounded) or more"),
])
def test_an_impossible_serve_flag_is_one_line_naming_it_and_exit_2(
        flags: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Checked where the options are made, before the family is read or a port bound (the family
    path here does not exist): no traceback, no server quietly running with a clamped value."""
    assert cli_main(["serve", "/no/family", *flags.split()]) == 2
    assert capsys.readouterr().err.strip() == f"error: INVALID_ARGUMENT: {message}"


@pytest.mark.parametrize(("command", "message"), [
    ("bench --rate 10 --images 0", "argument --images: 0: expected 1 or more"),
    ("bench --rate 10 --images x", "argument --images: 'x': expected a whole number"),
    ("bench --rate 10 --duration -1", "argument --duration: -1: expected a finite number > 0"),
    ("bench --rate 10 --max-inflight 0", "argument --max-inflight: 0: expected 1 or more"),
    ("bench --rate 10 --wait-ready -1",
     "argument --wait-ready: -1: expected a finite number ≥ 0"),
    ("infer x.npy --timeout 0", "argument --timeout: 0: expected a finite number > 0"),
    ("health --timeout nan", "argument --timeout: nan: expected a finite number > 0"),
    ("top --interval 0", "argument --interval: 0: expected a finite number > 0"),
    ("demo --seconds inf", "argument --seconds: inf: expected a finite number > 0"),
])
def test_an_impossible_client_flag_is_a_usage_error_before_any_work(
        command: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The client commands refuse a count below 1 or a duration that is not a positive number
    while parsing: no dataset loaded, no connection tried, no wait for a server."""
    with pytest.raises(SystemExit) as exit_:
        cli_main(command.split())
    assert exit_.value.code == 2
    name = command.split()[0]
    assert capsys.readouterr().err.strip().endswith(f"adaptive-inference {name}: error: {message}")


def test_the_options_refuse_what_the_flags_cannot_express() -> None:
    """A user building `ServeOptions` in Python gets the same checks as the CLI."""
    with pytest.raises(InvalidArgument, match=r"--device 'tpu': one of auto, cpu, cuda"):
        ServeOptions(device="tpu")
    with pytest.raises(InvalidArgument, match=r"--on-miss 'retry': one of shed, best-effort"):
        Settings(on_miss="retry")
    with pytest.raises(InvalidArgument, match=r"monitor_interval_s 0.0: seconds, more than 0"):
        ServeOptions(monitor_interval_s=0.0)


def test_one_port_setting_moves_the_server_and_the_clients_defaults(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``$ADAPTIVE_INFERENCE_PORT``: `serve`'s port and every client command's default target
    (a container's health check follows its server); a bad value is one line and exit 2."""
    from client.cli import PORT_ENV, default_port, parser

    assert default_port({}) == 8001
    p = parser(default_port({PORT_ENV: "9107"}))
    assert p.parse_args(["serve", "/family"]).port == 9107
    for command in ("health", "infer x.npy", "bench --rate 1", "top"):
        assert p.parse_args(command.split()).target == "127.0.0.1:9107", command
    assert p.parse_args(["serve", "/family", "--port", "0"]).port == 0  # the flag still wins
    monkeypatch.setenv(PORT_ENV, "eighty")
    assert cli_main(["health"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: ${PORT_ENV} 'eighty': expected a port number (0-65535)")
