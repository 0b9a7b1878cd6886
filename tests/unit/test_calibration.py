"""The router's closed loop (`server.calibration`): the safety factor that holds the target miss
rate, and the CPU share a request can have at the arrival rate."""

from __future__ import annotations

import math
import random

import pytest

from server.calibration import Calibration, CpuShare


def test_the_factor_is_the_recent_ratios_quantile_at_the_target() -> None:
    rng = random.Random(0)
    cal = Calibration(target=0.05)
    for i in range(40_000):  # 10 ms predicted, 10 + Exp(1) ms taken: q95 = (10 + ln 20) / 10
        cal.observe(10.0, 10.0 + rng.expovariate(1.0), now=i * 1e-3, missed=False)
    assert cal.factor == pytest.approx(1 + math.log(20) / 10, rel=0.03)


def test_old_ratios_expire_and_the_factor_comes_back_without_any_answer() -> None:
    cal = Calibration(horizon_s=10.0)
    cal.reset(1.2)
    for i in range(64):  # a burst: answers five times later than predicted
        cal.observe(2.0, 10.0, now=i * 1e-3, missed=True)
    assert cal.current(1.0) == pytest.approx(5.0)
    # a factor that makes everything look too slow sheds every request, so no answer comes to
    # lower it: time does
    assert cal.current(30.0) == pytest.approx(1.2)


def test_the_miss_rate_is_a_recent_share_of_late_answers() -> None:
    cal = Calibration()
    for i in range(1000):
        cal.observe(1.0, 1.0, now=i * 1e-3, missed=i % 10 == 0)
    assert cal.miss_rate == pytest.approx(0.1, abs=0.05)


def test_the_cpu_share_is_what_the_request_path_and_the_host_leave_per_request() -> None:
    share = CpuShare(headroom=1.0, alpha=1.0)
    assert share.share_ms == math.inf
    # 2 cores; 100 requests/s; our process used 1.5 cores, 1 of them computing; others 0.25
    ms = share.update(seconds=1.0, arrivals=100, compute_ms=1000.0, cores=2, cpu_process=0.75,
                      cpu_other=0.25)
    assert ms == pytest.approx((2 * 0.75 - 0.5) * 1e3 / 100)  # 1 core free for compute: 10 ms
    assert share.update(seconds=1.0, arrivals=0, compute_ms=0.0, cores=2, cpu_process=0.0,
                        cpu_other=0.0) == math.inf  # idle: no limit
