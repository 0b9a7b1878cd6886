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


@pytest.mark.parametrize(("field", "value"), [("threshold", 0.0), ("threshold", 1.5),
                                              ("window_s", 0.0), ("max_reject", -0.1),
                                              ("max_reject", 2.0), ("min_requests", -1)])
def test_a_bad_setting_is_refused_by_name(field: str, value: float) -> None:
    with pytest.raises(InvalidArgument, match=rf"throttle {field} {value!r}"):
        ThrottleConfig(**{field: value})
