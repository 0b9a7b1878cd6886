"""`adaptive-inference top`: one frame built from a real server's /metrics and candidate table."""

from __future__ import annotations

import re
import urllib.request

import numpy as np
import pytest

from client import AdaptiveClient
from client.cli import main as cli_main
from client.top import Scrape, render_frame
from tests.harness import RunningServer


def _metrics(server: RunningServer) -> str:
    return urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()


def test_frame_shows_requests_mix_and_router_state(server: RunningServer,
                                                   images: np.ndarray) -> None:
    before = _metrics(server)
    with AdaptiveClient(server.target) as client:
        for _ in range(5):  # a generous budget: the most accurate variant answers
            assert client.infer(images[:2], budget_ms=500).variant == "slow"
        table = client.variants()
    after = _metrics(server)
    frame = render_frame(after, table, previous_text=before, interval_s=1.0, title="servetest")
    lines = {line.split()[0]: line for line in frame.splitlines() if line.strip()}
    assert lines["requests"].split()[1] == "5.0/s"  # 5 requests in the 1 s window
    total = Scrape.parse(after).total
    assert f"{total:.0f} total" in lines["requests"] and total >= 5
    assert re.search(r"safety factor \d+\.\d{3}", lines["router"])
    assert "miss ratio" in lines["router"] and "CPU share" in lines["router"]
    assert lines["in"].split()[2] == "100.0%"  # in budget: all five
    assert lines["accuracy"].split()[1] == "99.00%"  # slow's accuracy, the only one served
    slow = lines["slow"].split()
    assert slow[1:3] == ["5", "100.0%"]  # served 5, share 100 %
    assert "early-exit@0" in lines and "fast" in lines  # every candidate of the table


def test_frame_without_previous_scrape_counts_since_start(server: RunningServer) -> None:
    with AdaptiveClient(server.target) as client:
        table = client.variants()
    frame = render_frame(_metrics(server), table)
    assert "since start" in frame and "-/s" in frame


def test_top_once_command(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["top", "--target", server.target, "--metrics", server.metrics_url,
                     "--once", "--interval", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "adaptive-inference top" in out and "safety factor" in out and "slow" in out


def test_early_exit_answers_split_by_exit_and_weighted_accuracy() -> None:
    text = "\n".join([
        "# TYPE adaptive_requests_total counter",
        'adaptive_requests_total{model="m",status="OK",variant="early-exit"} 4.0',
        'adaptive_requests_total{model="m",status="OK",variant="full"} 4.0',
        'adaptive_requests_total{model="m",status="DEADLINE_EXCEEDED",variant="none"} 2.0',
        "# TYPE adaptive_budget_misses_total counter",
        'adaptive_budget_misses_total{model="m",variant="full"} 1.0',
        "# TYPE adaptive_early_exit_total counter",
        'adaptive_early_exit_total{exit="0"} 6.0',
        'adaptive_early_exit_total{exit="1"} 2.0',
        "# TYPE adaptive_variant_accuracy_ratio gauge",
        'adaptive_variant_accuracy_ratio{variant="full"} 0.9',
        'adaptive_variant_accuracy_ratio{variant="early-exit@0"} 0.5',
        'adaptive_variant_accuracy_ratio{variant="early-exit@1"} 0.7',
        ""])
    s = Scrape.parse(text)
    assert s.mix() == {"early-exit@0": 3.0, "early-exit@1": 1.0, "full": 4.0}
    assert s.served_accuracy() == pytest.approx((3 * 0.5 + 0.7 + 4 * 0.9) / 8)
    assert s.in_budget == pytest.approx((8 - 1) / 10)
