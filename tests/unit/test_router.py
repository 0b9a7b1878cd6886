"""The routing policy with fake variants, a fake clock and fake load: no server, no models."""

from __future__ import annotations

import pytest

from compression.core.family import Exit, Variant
from server.errors import BudgetExceeded, NotFound
from server.latency import LatencyModel, Load, QueueState
from server.router import Router, candidates_for
from server.warmup import seed_from_manifest


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def deadline_in(self, ms: float) -> float:
        return self.now + ms / 1e3


def _table(ms: float) -> dict[str, dict[str, float]]:
    """A latency table whose batch cost grows linearly: p50 = ms·b^0.8, p95 = 1.1·p50."""
    return {str(b): {"p50": ms * b ** 0.8, "p95": 1.1 * ms * b ** 0.8} for b in (1, 8, 32)}


def _variant(name: str, accuracy: float, ms: float, exits: list[Exit] | None = None) -> Variant:
    return Variant(name=name, method=name, params={}, artifacts=[], accuracy=accuracy,
                   params_count=0, macs=0, size_bytes=0, latency_ms=_table(ms), exits=exits)


# fast (1 ms, 90%), mid (3 ms, 95%), slow (10 ms, 99%)
VARIANTS = [_variant("fast", 0.90, 1.0), _variant("mid", 0.95, 3.0), _variant("slow", 0.99, 10.0)]
# early exit: cumulative 1 / 2.5 / 5 ms, accuracy 0.93 / 0.97 / 0.985
EXITS = [Exit(0, 0.93, _table(1.0), 0.9, 0.7), Exit(1, 0.97, _table(2.5), 0.8, 0.2),
         Exit(2, 0.985, _table(5.0), 0.0, 0.1)]
IDLE = Load(cores=4)


def _router(variants: list[Variant], clock: FakeClock, **kw: object) -> Router:
    lat = LatencyModel()
    for v in variants:
        seed_from_manifest(lat, v)
    return Router(candidates_for(variants), lat, clock=clock, **kw)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_tight_budget_gets_the_fast_variant(clock: FakeClock) -> None:
    d = _router(VARIANTS, clock).choose(deadline=clock.deadline_in(2.0), batch=1, load=IDLE)
    assert d.candidate.name == "fast" and d.fits


def test_loose_budget_gets_the_accurate_variant(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    assert r.choose(deadline=clock.deadline_in(50.0), batch=1, load=IDLE).candidate.name == "slow"
    assert r.choose(deadline=clock.deadline_in(5.0), batch=1, load=IDLE).candidate.name == "mid"


def test_no_budget_gets_the_most_accurate_variant(clock: FakeClock) -> None:
    assert _router(VARIANTS, clock).choose(deadline=None, batch=1, load=IDLE).candidate.name == "slow"


def test_time_passing_on_the_clock_shrinks_the_budget(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    deadline = clock.deadline_in(12.0)
    assert r.choose(deadline=deadline, batch=1, load=IDLE).candidate.name == "slow"
    clock.now += 0.008  # 8 ms spent decoding / waiting: 4 ms left
    assert r.choose(deadline=deadline, batch=1, load=IDLE).candidate.name == "mid"


def test_rising_load_gets_a_cheaper_choice(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    loads = [IDLE,  # load factor 1: slow (11 ms p95) fits 12 ms
             Load(cores=4, cpu_other=1.0),  # 1.25x: slow needs 13.75 ms, mid 4.1 ms
             Load(cores=4, cpu_other=1.0, executing=12)]  # 4.25x: mid 14 ms, fast 4.7 ms
    picks = [r.choose(deadline=clock.deadline_in(12.0), batch=1, load=load).candidate.name
             for load in loads]
    assert picks == ["slow", "mid", "fast"]


def test_queue_wait_counts_against_the_budget(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock, max_batch=8)
    deadline = clock.deadline_in(15.0)
    assert r.choose(deadline=deadline, batch=1, load=IDLE).candidate.name == "slow"
    queued = Load(cores=4, queues={"slow": QueueState(queued=16, running=8, running_for_ms=1.0)})
    d = r.choose(deadline=deadline, batch=1, load=queued)
    assert d.candidate.name == "mid"
    assert r.predict(r.candidate("slow"), 1, queued).queue_ms > 40.0


def test_bigger_batches_cost_more(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    deadline = clock.deadline_in(12.0)
    assert r.choose(deadline=deadline, batch=1, load=IDLE).candidate.name == "slow"
    assert r.choose(deadline=deadline, batch=8, load=IDLE).candidate.name != "slow"


def test_nothing_fits_best_effort_gives_the_fastest(clock: FakeClock) -> None:
    d = _router(VARIANTS, clock).choose(deadline=clock.deadline_in(0.1), batch=1, load=IDLE)
    assert d.candidate.name == "fast" and not d.fits


def test_nothing_fits_reject_raises_deadline_exceeded(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock, on_miss="reject")
    with pytest.raises(BudgetExceeded, match="'fast'"):
        r.choose(deadline=clock.deadline_in(0.1), batch=1, load=IDLE)


def test_pinned_variant_and_unknown_pin(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    assert r.choose(deadline=clock.deadline_in(0.5), batch=1, load=IDLE, pin="slow").candidate.name == "slow"
    with pytest.raises(NotFound, match="'nope'"):
        r.choose(deadline=None, batch=1, load=IDLE, pin="nope")


def test_bigger_budget_gets_a_deeper_exit(clock: FakeClock) -> None:
    r = _router([_variant("early-exit", 0.985, 5.0, exits=EXITS)], clock)
    exits = [r.choose(deadline=clock.deadline_in(b), batch=1, load=IDLE).candidate.exit
             for b in (1.5, 3.5, 8.0)]
    assert exits == [0, 1, 2]


def test_early_exit_depths_compete_with_variants(clock: FakeClock) -> None:
    r = _router([*VARIANTS, _variant("early-exit", 0.985, 5.0, exits=EXITS)], clock)
    assert r.choose(deadline=clock.deadline_in(3.0), batch=1, load=IDLE).candidate.name == "early-exit@1"
    assert r.choose(deadline=clock.deadline_in(6.0), batch=1, load=IDLE).candidate.name == "early-exit@2"
    pinned = r.choose(deadline=clock.deadline_in(3.0), batch=1, load=IDLE, pin="early-exit@0")
    assert pinned.candidate.exit == 0


def test_next_stage_only_when_the_remaining_budget_allows(clock: FakeClock) -> None:
    r = _router([_variant("early-exit", 0.985, 5.0, exits=EXITS)], clock)
    deadline = clock.deadline_in(5.0)
    assert r.next_stage_fits("early-exit", 1, deadline=deadline, batch=1, load_factor=1.0)
    clock.now += 0.004  # 1 ms left; stage 1 alone needs ~1.65 ms at p95
    assert not r.next_stage_fits("early-exit", 1, deadline=deadline, batch=1, load_factor=1.0)
    assert r.next_stage_fits("early-exit", 1, deadline=None, batch=1, load_factor=1.0)
