"""The latency model: seeds, interpolation across batch sizes, online EWMA updates, CPU slowdown."""

from __future__ import annotations

import pytest

from server.latency import LatencyModel, Load

TABLE = {"1": {"p50": 1.0, "p95": 1.2}, "8": {"p50": 4.0, "p95": 5.0},
         "32": {"p50": 16.0, "p95": 18.0}}


def test_seeded_points_are_returned_exactly() -> None:
    m = LatencyModel()
    m.seed("a", TABLE)
    p = m.predict("a", 8)
    assert p.p50 == pytest.approx(4.0) and p.p95 == pytest.approx(5.0)


def test_batch_sizes_between_and_beyond_points_interpolate() -> None:
    m = LatencyModel()
    m.seed("a", TABLE)
    mid = m.predict("a", 20)  # halfway between 8 and 32
    assert mid.p50 == pytest.approx(10.0)
    assert m.predict("a", 64).p50 == pytest.approx(16.0 + 12.0 / 24 * 32)  # last slope extended
    assert m.predict("a", 4).p50 < m.predict("a", 8).p50


def test_observations_pull_the_estimate_towards_reality() -> None:
    m = LatencyModel(alpha=0.5)
    m.seed("a", TABLE)
    for _ in range(20):
        m.observe("a", 1, 3.0)
    assert m.predict("a", 1).p50 == pytest.approx(3.0, rel=1e-3)
    assert m.predict("a", 8).p50 == pytest.approx(4.0)  # other batch sizes untouched


def test_noisy_observations_widen_the_p95() -> None:
    m = LatencyModel(alpha=0.3)
    m.seed("a", {"1": {"p50": 1.0, "p95": 1.0}})
    for i in range(50):
        m.observe("a", 1, 1.0 if i % 2 else 3.0)
    p = m.predict("a", 1)
    assert p.p95 - p.p50 > 1.0


def test_new_batch_size_starts_from_the_interpolated_guess() -> None:
    m = LatencyModel(alpha=0.5)
    m.seed("a", TABLE)
    m.observe("a", 20, 10.0)  # exactly the interpolated value: nothing moves
    assert m.predict("a", 20).p50 == pytest.approx(10.0)


def test_memoised_predictions_follow_every_observation_like_a_fresh_model() -> None:
    """Observations patch the memoised curve in place (the hot path); every prediction, at
    measured, interpolated, new and extrapolated batch sizes, must equal the model's own
    predictions with nothing memoised."""
    m = LatencyModel(alpha=0.3)
    m.seed("a", TABLE)
    m.seed("b", {"1": {"p50": 0.5, "p95": 0.6}})
    sizes = (1, 3, 8, 20, 32, 64)
    for i, (batch, ms) in enumerate([(1, 2.0), (8, 3.0), (20, 11.0), (32, 30.0), (1, 0.001),
                                     (5, 2.5), (64, 40.0), (8, 9.0)]):
        before = {b: m.predict_sum(("a", "b"), b) for b in sizes}  # memoise everything
        assert before  # (read, so the next observation has caches to patch)
        m.observe("a", batch, ms)
        got = {b: m.predict_sum(("a", "b"), b) for b in sizes}
        m._curves.clear()  # forget everything memoised
        for memo in (*m._cache.values(), *m._sums.values()):
            memo.clear()
        fresh = {b: m.predict_sum(("a", "b"), b) for b in sizes}
        assert got == fresh, f"after observation {i} ({batch}, {ms})"


def test_cpu_contention_scales_predictions_and_observations_are_stored_uncontended() -> None:
    m = LatencyModel(alpha=1.0)
    m.seed("a", TABLE)
    busy = Load(cores=2, threads=2, cpu_other=1.0, executing=1)
    f = m.slowdown(busy)  # 2 cores busy elsewhere + our running batch + the one starting
    assert f == pytest.approx((2 + 1 + 1) / 2)
    assert m.slowdown(Load(cores=2, threads=2)) == 1.0
    # more batches than worker threads queue for a thread instead of slowing the cores
    assert m.slowdown(Load(cores=2, threads=2, executing=2)) == 1.0
    m.observe("a", 1, 4.0, slowdown=f)  # 4 ms under a 2x slowdown = 2 ms uncontended
    assert m.predict("a", 1).p50 == pytest.approx(2.0)
    assert m.predict("a", 1, slowdown=f).p50 == pytest.approx(4.0)


def test_unknown_units_and_garbage_observations_are_ignored() -> None:
    m = LatencyModel()
    m.seed("a", TABLE)
    m.observe("nope", 1, 1.0)
    m.observe("a", 1, float("nan"))
    m.observe("a", 0, 1.0)
    assert m.predict("a", 1).p50 == pytest.approx(1.0)
    with pytest.raises(ValueError):
        LatencyModel(alpha=0.0)
