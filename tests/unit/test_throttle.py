"""Client-side adaptive throttling (`client.throttle`): a client stops sending what its server
refuses, in the share the server refuses it, and starts again as the server recovers; driven here
with a fake clock and a seeded random source."""

from __future__ import annotations

import random

import pytest

from client.throttle import AdaptiveThrottle, ThrottleConfig
from server.errors import InvalidArgument, Overloaded, Throttled


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(**config: float) -> tuple[AdaptiveThrottle, FakeClock]:
    clock = FakeClock()
    return AdaptiveThrottle(ThrottleConfig(**config), clock=clock, rng=random.Random(0)), clock


def admitted_share(t: AdaptiveThrottle, n: int = 4000) -> float:
    return sum(t.admit() for _ in range(n)) / n


def test_a_server_that_answers_never_sees_the_throttle() -> None:
    t, _ = throttle()
    for _ in range(1000):
        assert t.admit()
        t.record(True)
    assert t.reject_probability() == 0.0
    assert t.rejected == 0


def test_a_few_refusals_below_the_threshold_leave_every_request_sent() -> None:
    t, _ = throttle()
    for i in range(1000):
        t.record(i % 50 != 0)  # 2 % refused: under the 5 % the default threshold allows
    assert t.reject_probability() == 0.0


def test_a_client_that_sends_little_is_never_throttled() -> None:
    """Below ``min_requests`` outcomes in the window a few refusals say nothing about load."""
    t, _ = throttle()
    for _ in range(99):
        t.record(False)
    assert t.reject_probability() == 0.0
    t.record(False)
    assert t.reject_probability() == pytest.approx(0.8)


def test_the_refused_share_is_kept_back_in_proportion() -> None:
    """Half the requests refused: p = 1 - 0.5 / 0.95 = 0.47 of new ones stay in the client."""
    t, _ = throttle()
    for i in range(2000):
        t.record(i % 2 == 0)
    expected = 1 - 0.5 / 0.95
    assert t.reject_probability() == pytest.approx(expected, abs=0.002)
    assert 1 - admitted_share(t) == pytest.approx(expected, abs=0.03)


def test_some_requests_always_go_out_so_the_client_sees_the_server_recover() -> None:
    t, _ = throttle()
    for _ in range(500):
        t.record(False)  # nothing answered at all
    assert t.reject_probability() == pytest.approx(0.8)
    assert admitted_share(t) == pytest.approx(0.2, abs=0.03)


def test_requests_refused_locally_are_not_counted_so_answers_lift_the_throttle() -> None:
    """Only outcomes of sent requests count: once the server answers what is sent, the
    probability falls at once, without waiting for the refusals to leave the window."""
    t, clock = throttle()
    for _ in range(200):
        t.record(False)
    for _ in range(10_000):
        assert t.admit() in (True, False)  # thousands kept back: none of them counted
    assert t.requests == 200
    for _ in range(3800):
        t.record(True)  # 3800 answered of 4000 sent: exactly the 95 % threshold
    assert t.reject_probability() == 0.0
    clock.now += 1.0
    assert t.reject_probability() == 0.0


def test_refusals_leave_the_window_and_the_throttle_with_them() -> None:
    t, clock = throttle(window_s=10.0)
    for _ in range(300):
        t.record(False)
    assert t.reject_probability() > 0.7
    clock.now += 5.0
    assert t.reject_probability() > 0.7, "still inside the window"
    clock.now += 5.5
    assert t.reject_probability() == 0.0
    assert t.requests == 0 and t.accepts == 0


def test_only_overload_statuses_count_as_refusals() -> None:
    t, _ = throttle()
    for code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL"):
        t.record_status(code)
    assert (t.requests, t.accepts) == (4, 4)
    for code in ("DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "CANCELLED"):
        t.record_status(code)
    assert (t.requests, t.accepts) == (8, 4)


def test_the_refusal_says_why_and_is_an_overload_error() -> None:
    t, _ = throttle()
    for _ in range(100):
        t.record(False)
    err = t.refusal()
    assert isinstance(err, Throttled) and isinstance(err, Overloaded)
    assert err.code == "RESOURCE_EXHAUSTED"
    text = str(err)
    assert "100 of this client's last 100" in text and "80 %" in text
    assert "throttle=None" in text


def serve(t: AdaptiveThrottle, clock: FakeClock, *, offered: int, capacity: int,
          intervals: int) -> list[int]:
    """A server that answers ``capacity`` requests per interval and refuses the rest for load
    (its word in the trailer), offered ``offered`` per interval for ``intervals`` intervals of
    ``t.config.interval_s``; what the client sent in each."""
    sent_per_interval = []
    for _ in range(intervals):
        sent = sum(t.admit() for _ in range(offered))
        for i in range(sent):
            t.record_status("OK" if i < capacity else "RESOURCE_EXHAUSTED", "load")
        sent_per_interval.append(sent)
        clock.now += t.config.interval_s
    return sent_per_interval


def test_steering_sends_what_the_server_answers_and_5_percent_more_at_any_overload() -> None:
    """Envoy's formula alone settles where a third of what is sent is refused at twice the
    capacity (each refusal costing the server most of an answer's CPU); on the refusals the
    server marks as load's the client steers the share it sends until 5 % are refused."""
    for offered in (200, 300, 400):  # 2x to 4x a capacity of 100 per interval (max_reject: 5x)
        t, clock = throttle()
        sent = serve(t, clock, offered=offered, capacity=100, intervals=200)
        settled = sum(sent[-50:]) / 50
        assert 100 / 0.95 * 0.9 <= settled <= 100 / 0.95 * 1.12, (offered, settled)
        formula_alone = (offered * 100 / 0.95) ** 0.5  # sent² = offered × accepted / threshold
        assert settled < 0.8 * formula_alone


def test_steering_lets_everything_through_again_once_the_server_answers() -> None:
    t, clock = throttle(window_s=5.0)
    serve(t, clock, offered=400, capacity=100, intervals=100)
    assert t.reject_probability() > 0.6
    sent = serve(t, clock, offered=400, capacity=400, intervals=200)
    assert sent[-1] == 400 and t.reject_probability() == 0.0


def test_a_burst_of_refusals_moves_the_share_once_per_interval() -> None:
    """At an overload's onset the refusals of everything sent before the client reacted arrive
    together: one step (gain × the refused share less 5 %), not a cut per refusal."""
    t, clock = throttle(gain=0.5)
    for _ in range(20):
        t.record(True)
    clock.now += 1.0
    for _ in range(500):
        t.record(False, load=True)
    assert t.log_share == pytest.approx(-0.5 * (500 / 501 - 0.05), abs=0.02)
    clock.now += 0.1
    t.record(False, load=True)  # the next interval: a step on what arrived since the last
    assert t.log_share < -0.5 * (500 / 501 - 0.05) - 0.2


def test_refusals_of_what_was_sent_before_a_step_do_not_steer_again() -> None:
    """Once per round trip: after a step, what was sent before it still comes back refused for
    a while (the server drains its backlog); steering waits for the outcomes of what it sent
    since, instead of cutting again on old news (which cut the share sent to 0.22 where 0.40
    held, docs/serving.md)."""
    t, clock = throttle(gain=0.5)
    sent_before = clock.now
    clock.now += 0.5
    for _ in range(20):
        t.record(False, load=True, sent_at=sent_before)
    one_step = t.log_share
    assert one_step == pytest.approx(-0.5 * 0.95)
    for _ in range(5):
        clock.now += 0.1
        for _ in range(100):
            t.record(False, load=True, sent_at=sent_before)
    assert t.log_share == one_step
    sent_after = clock.now
    clock.now += 0.01
    for _ in range(20):
        t.record(False, load=True, sent_at=sent_after)
    assert t.log_share == pytest.approx(2 * one_step)


def test_a_budget_no_server_could_meet_never_throttles_the_client() -> None:
    """The server says BUDGET when the budget the request stated is below every candidate's
    own compute: no throttling mends that, and a client mixing such requests with good ones
    must not lose the good ones."""
    t, clock = throttle()
    for i in range(2000):
        t.record_status("OK" if i % 2 else "DEADLINE_EXCEEDED", "budget")
        clock.now += 0.001
    assert t.reject_probability() == 0.0 and t.log_share == 0.0
    assert (t.requests, t.accepts) == (2000, 2000)


def test_only_the_servers_word_or_a_silent_deadline_steers() -> None:
    """A dead replica of ten answering UNAVAILABLE is no overload: Envoy's formula keeps back
    at most the refused share, and steering, which would not stop short of the cap, stays put.
    A deadline that passed without a word from the server is load's (it waited unread)."""
    t, clock = throttle()
    for i in range(2000):
        t.record_status("UNAVAILABLE" if i % 10 == 0 else "OK")
        clock.now += 0.001
    assert t.log_share == 0.0
    assert t.reject_probability() <= 0.1
    quiet, quiet_clock = throttle()
    for i in range(2000):
        quiet.record_status("DEADLINE_EXCEEDED" if i % 10 == 0 else "OK")
        quiet_clock.now += 0.001
    assert quiet.log_share < -0.5


def test_a_step_older_than_the_window_no_longer_throttles() -> None:
    t, clock = throttle(window_s=10.0)
    for _ in range(10):
        for _ in range(50):
            t.record(False, load=True)
        clock.now += 0.1
    assert t.log_share < -1.0
    clock.now += 11.0
    assert t.reject_probability() == 0.0


@pytest.mark.parametrize(("field", "value"), [("threshold", 0.0), ("threshold", 1.5),
                                              ("window_s", 0.0), ("max_reject", -0.1),
                                              ("max_reject", 2.0), ("min_requests", -1),
                                              ("interval_s", 0.0), ("gain", -1.0)])
def test_a_bad_setting_is_refused_by_name(field: str, value: float) -> None:
    with pytest.raises(InvalidArgument, match=rf"throttle {field} {value!r}"):
        ThrottleConfig(**{field: value})
