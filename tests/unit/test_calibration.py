"""The router's closed loop (`server.calibration`): the safety margin that holds the target miss
rate, and the CPU share a request can have at the arrival rate."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from server.calibration import Calibration, CpuShare, upper_quantile
from server.monitor import HostSample


def test_the_margin_is_the_smaller_of_an_additive_and_a_proportional_bound() -> None:
    rng = random.Random(0)
    cal = Calibration(target=0.05)
    for i in range(40_000):  # 10 ms predicted, 10 + Exp(1) ms taken: q97.5 of the lateness ln 40
        cal.observe(10.0, 10.0 + rng.expovariate(1.0), now=i * 1e-3, missed=False)
    assert cal.additive_ms == pytest.approx(math.log(40), rel=0.2)
    assert cal.factor == pytest.approx(1 + math.log(40) / 10, rel=0.03)
    assert cal.margin_ms(10.0) == pytest.approx(math.log(40), rel=0.2)
    assert cal.margin_ms(1.0) == pytest.approx(math.log(40) / 10, rel=0.2)  # proportional wins
    assert cal.margin_ms(100.0) == cal.additive_ms  # additive wins


def test_the_union_of_both_bounds_holds_the_target_on_a_mixed_stream() -> None:
    rng = random.Random(1)
    cal = Calibration(target=0.02)
    stream = []
    for i in range(20_000):  # light and heavy work, late by a jitter plus a share of its length
        p = 1.0 if i % 2 else 20.0
        stream.append((p, p * (1 + 0.2 * rng.random()) + rng.expovariate(2.0)))
    for i, (p, actual) in enumerate(stream[:10_000]):
        cal.observe(p, actual, now=i * 1e-4, missed=False)
    late = sum(actual > p + cal.margin_ms(p) for p, actual in stream[10_000:])
    assert late / 10_000 <= 0.02 * 1.25  # the target, up to the noise of a quantile estimate


def test_old_errors_expire_and_the_margin_comes_back_without_any_answer() -> None:
    cal = Calibration(horizon_s=10.0)
    cal.reset(1.2)
    assert cal.margin_ms(10.0) == pytest.approx(2.0)  # until answers come: the base factor
    for i in range(64):  # a burst: answers five times later than predicted
        cal.observe(2.0, 10.0, now=i * 1e-3, missed=True)
    cal.refresh(1.5)
    assert cal.margin_ms(2.0) == pytest.approx(8.0)
    # a margin that makes everything look too slow sheds every request, so no answer comes to
    # lower it: time does
    cal.refresh(30.0)
    assert cal.margin_ms(10.0) == pytest.approx(2.0)


def test_before_enough_answers_the_first_late_one_widens_the_margin_at_once() -> None:
    """A freshly started server: warm-up's spread until 32 answers are known, except that an
    answer later than that spread raises the factor for the very next request."""
    cal = Calibration()
    cal.reset(1.1)
    cal.observe(2.0, 2.1, now=0.0, missed=False)
    assert cal.margin_ms(10.0) == pytest.approx(1.0)  # within the spread: unchanged
    cal.observe(2.0, 6.0, now=0.001, missed=True)  # three times the prediction
    assert not cal.ready
    assert cal.margin_ms(10.0) == pytest.approx(20.0)
    cal.observe(2.0, 3.0, now=0.002, missed=False)  # a better one does not lower the worst seen
    assert cal.margin_ms(10.0) == pytest.approx(20.0)


def test_the_miss_rate_is_a_recent_share_of_late_answers() -> None:
    cal = Calibration()
    for i in range(1000):
        cal.observe(1.0, 1.0, now=i * 1e-3, missed=i % 10 == 0)
    assert cal.miss_rate == pytest.approx(0.1, abs=0.05)


def test_the_cpu_share_is_what_the_request_path_and_the_host_leave_per_request() -> None:
    share = CpuShare(headroom=1.0, alpha=1.0, tau_s=0.2)
    assert share.share_ms(0.0) == math.inf  # no arrivals: no limit
    # 2 cores; 100 requests in 1 s; our process used 1.5 cores, 1 of them computing; others 0.5
    share.update(seconds=1.0, arrivals=100, compute_ms=1000.0, cores=2, cpu_process=0.75,
                 cpu_other=0.25)
    assert share.outside_ms == pytest.approx(5.0)  # 0.5 core for 100 requests/s
    for i in range(400):  # 100 requests/s, for 4 s
        share.arrived(i / 100)
    now = 3.995
    assert share.rate(now) == pytest.approx(100, rel=0.05)
    # 2 cores − 0.5 elsewhere − 100/s × 5 ms on the request path = 1 core: 10 ms per request
    assert share.share_ms(now) == pytest.approx(10.0, rel=0.06)


def test_the_arrival_rate_follows_a_burst_within_a_fraction_of_a_second() -> None:
    share = CpuShare(tau_s=0.2)
    t = 0.0
    for _ in range(100):  # 50 requests/s
        t += 0.02
        share.arrived(t)
    for _ in range(200):  # then 400 requests/s
        t += 0.0025
        share.arrived(t)
    assert share.rate(t) == pytest.approx(400, rel=0.15)  # 0.5 s into the burst
    assert share.rate(t + 2.0) < 5.0  # and it decays once arrivals stop
    assert share.rate(t + 10.0) < 1.0


def test_a_burst_shows_in_the_rate_within_its_first_arrivals() -> None:
    """The smoothed rate lags a burst's onset; the last 8 arrivals do not. At the 8th request of
    a burst at 500/s after a quiet 50/s, the CPU share already allows only light work."""
    share = CpuShare(tau_s=0.1, headroom=0.7, cores=2)
    t = 0.0
    for _ in range(100):  # 50 requests/s for 2 s
        t += 0.02
        share.arrived(t)
    assert share.rate(t) == pytest.approx(50, rel=0.2)
    for _ in range(8):  # then 500 requests/s
        t += 0.002
        share.arrived(t)
    # A quarter of τ is the shortest span it reads a rate over: 7 gaps in 25 ms at the most.
    assert share.rate(t) == pytest.approx(7 / 0.025, rel=0.01)
    assert share.share_ms(t) == pytest.approx(2 * 0.7 * 1e3 / 280, rel=0.01)
    for _ in range(8):  # the burst goes on: the smoothed rate catches up
        t += 0.002
        share.arrived(t)
    for _ in range(200):
        t += 0.002
        share.arrived(t)
    assert share.rate(t) == pytest.approx(500, rel=0.05)


def test_a_batch_sent_at_once_is_not_a_rate_of_thousands() -> None:
    share = CpuShare(tau_s=0.1, headroom=0.7, cores=2)
    for i in range(8):  # 8 requests within 0.7 ms, then nothing
        share.arrived(10.0 + i * 1e-4)
    assert share.rate(10.001) <= 7 / 0.025


def test_a_quiet_interval_teaches_nothing_about_the_cpu_a_request_costs() -> None:
    share = CpuShare(alpha=1.0)
    # 3 requests while the process burned a core on something else: not 300 ms per request
    share.update(seconds=1.0, arrivals=3, compute_ms=1.0, cores=2, cpu_process=0.5,
                 cpu_other=0.0)
    assert share.outside_ms == 0.0
    share.arrived(0.0)
    assert share.share_ms(0.0) > 100.0  # one request: no limit worth the name


def test_sampling_intervals_count_the_arrivals_and_compute_between_them() -> None:
    share = CpuShare(alpha=1.0)
    share.sample(0.0, cores=2, cpu_process=0.0, cpu_other=0.0)  # the first interval starts
    for i in range(50):
        share.arrived(i / 100)
        share.computed(4.0)
    # 0.5 s: 50 requests, 200 ms of compute (0.4 core); the process used 0.6 core in all
    share.sample(0.5, cores=2, cpu_process=0.3, cpu_other=0.0)
    assert share.outside_ms == pytest.approx(0.2 * 0.5 * 1e3 / 50)  # 2 ms per request
    share.sample(1.0, cores=2, cpu_process=0.9, cpu_other=0.0)  # no arrivals: nothing learned
    assert share.outside_ms == pytest.approx(2.0)


def _loaded(share: CpuShare, rate: float, seconds: float = 4.0) -> float:
    """Arrivals at ``rate`` per second for ``seconds``; returns the time of the last one."""
    n = int(rate * seconds)
    for i in range(n):
        share.arrived(i / rate)
    return (n - 1) / rate


def test_sibling_workers_split_the_host_as_one_process_would() -> None:
    """--workers 2, balanced: each worker has half the arrivals and uses half the server's CPU,
    and its sibling is the same server, not other load: each gets the share per request that
    one process with all the arrivals gets (with the sibling as other load it got 15 ms here,
    and whatever its sibling's choices of the moment left it)."""
    one = CpuShare(headroom=1.0, alpha=1.0, tau_s=0.2)
    one.update(seconds=1.0, arrivals=200, compute_ms=1000.0, cores=4, cpu_process=0.5,
               cpu_other=0.25)  # 2 cores, 1 computing; 1 core of other load
    worker = CpuShare(headroom=1.0, alpha=1.0, tau_s=0.2)
    worker.update(seconds=1.0, arrivals=100, compute_ms=500.0, cores=4, cpu_process=0.25,
                  cpu_other=0.25, cpu_siblings=0.25)
    assert worker.outside_ms == pytest.approx(one.outside_ms) == pytest.approx(5.0)
    assert worker.part == pytest.approx(0.5)
    now = _loaded(one, 200)
    assert _loaded(worker, 100) == pytest.approx(now, abs=0.01)
    # 4 cores − 1 elsewhere − 200/s × 5 ms = 2 cores for 200 requests/s: 10 ms each
    assert one.share_ms(now) == pytest.approx(10.0, rel=0.06)
    assert worker.share_ms(now) == pytest.approx(one.share_ms(now), rel=0.06)


def test_a_worker_whose_siblings_idle_has_the_host_to_itself() -> None:
    """One client connection lands on one worker: with its siblings idle it gets what a single
    process would, so --workers N is never worse than one process."""
    alone = CpuShare(headroom=1.0, alpha=1.0, tau_s=0.2)
    alone.update(seconds=1.0, arrivals=100, compute_ms=500.0, cores=2, cpu_process=0.5,
                 cpu_other=0.0)
    worker = CpuShare(headroom=1.0, alpha=1.0, tau_s=0.2)
    worker.update(seconds=1.0, arrivals=100, compute_ms=500.0, cores=2, cpu_process=0.5,
                  cpu_other=0.0, cpu_siblings=0.0)
    now = _loaded(alone, 100)
    _loaded(worker, 100)
    assert worker.part == 1.0
    assert worker.share_ms(now) == pytest.approx(alone.share_ms(now))


def test_sibling_workers_are_not_other_load() -> None:
    host = HostSample(cores=4, cpu_system=0.9, cpu_process=0.3, cpu_siblings=0.4)
    assert host.cpu_other == pytest.approx(0.2)  # the host's 0.9 less this server's 0.7
    assert HostSample(cores=4, cpu_system=0.9, cpu_process=0.3).cpu_other == pytest.approx(0.6)


@pytest.mark.parametrize("n", [1, 2, 3, 32, 33, 500, 2048])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.995, 1.0])
def test_upper_quantile_is_numpys_linear_quantile(n: int, q: float) -> None:
    rng = np.random.default_rng(n)
    rows = rng.normal(size=(n, 2))
    rows[: n // 3, 1] = 1.0  # ties
    assert np.allclose(upper_quantile(rows, q), np.quantile(rows, q, axis=0), rtol=0, atol=1e-12)
