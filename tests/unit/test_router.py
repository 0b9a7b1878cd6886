"""The routing policy with fake variants, a fake clock and fake queues: no server, no models."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from compression.core.family import Exit, Variant
from server.errors import NotFound, Overloaded, Shed
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
IDLE = Load(cores=4, threads=4)


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


def test_a_request_without_a_deadline_is_never_laid_out_and_never_shed(
        clock: FakeClock) -> None:
    """No deadline, nothing to fit: the queues are not scheduled (that layout is most of what a
    decision costs, and a stream of unbudgeted requests keeps them busy), the most accurate
    candidate answers however long its queue, and the CPU share still applies."""
    r = _router(VARIANTS, clock, max_batch=8)

    def no_layout(*args: object) -> None:
        raise AssertionError("laid out the queues for a request without a deadline")

    r._plans = no_layout  # type: ignore[method-assign,assignment]
    backlog = Load(cores=4, threads=4, queues={
        name: QueueState(queued=64, running=8) for name in ("fast", "mid", "slow")})
    d = r.choose(deadline=None, batch=1, load=backlog)
    assert d.candidate.name == "slow" and d.queue_ms == 0.0 and d.remaining_ms is None
    r.cpu.share_ms = lambda now: 4.0  # type: ignore[method-assign]
    assert r.choose(deadline=None, batch=1, load=backlog).candidate.name == "mid"
    r.cpu.share_ms = lambda now: 0.1  # type: ignore[method-assign]  # nothing that cheap
    assert r.choose(deadline=None, batch=1, load=backlog).candidate.name == "fast"
    assert r.choose(deadline=None, batch=1, load=backlog, pin="slow").candidate.name == "slow"
    with pytest.raises(AssertionError, match="laid out"):  # a deadline still lays them out
        r.choose(deadline=clock.deadline_in(500.0), batch=1, load=backlog)


def test_time_passing_on_the_clock_shrinks_the_budget(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    deadline = clock.deadline_in(12.0)
    assert r.choose(deadline=deadline, batch=1, load=IDLE).candidate.name == "slow"
    clock.now += 0.008  # 8 ms spent decoding / waiting: 4 ms left
    assert r.choose(deadline=deadline, batch=1, load=IDLE).candidate.name == "mid"


def test_cpu_contention_gets_a_cheaper_choice(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    loads = [IDLE,  # slow (10 ms) fits 12 ms
             Load(cores=4, threads=4, cpu_other=1.0),  # other processes: 1.25x, slow 12.5 ms
             Load(cores=4, threads=16, cpu_other=1.0, executing=12)]  # 4.25x: mid 12.75 ms
    picks = [r.choose(deadline=clock.deadline_in(12.0), batch=1, load=load).candidate.name
             for load in loads]
    assert picks == ["slow", "mid", "fast"]


def test_a_queue_that_builds_up_changes_the_choice(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock, max_batch=8)
    deadline = clock.deadline_in(15.0)
    assert r.choose(deadline=deadline, batch=1, load=IDLE).candidate.name == "slow"
    queued = Load(cores=4, threads=4,
                  queues={"slow": QueueState(queued=16, running=8, running_for_ms=1.0)})
    d = r.choose(deadline=deadline, batch=1, load=queued)
    assert d.candidate.name == "mid" and d.queue_ms == 0.0  # its own queue is empty
    # the rest of the running batch of 8 and two full batches of 8 come first
    assert r.predict(r.candidate("slow"), 1, queued).queue_ms == pytest.approx(
        3 * 10.0 * 8 ** 0.8 - 1.0)


def test_batches_of_other_variants_holding_every_thread_delay_a_new_batch(
        clock: FakeClock) -> None:
    r = _router(VARIANTS, clock, max_batch=8)
    busy = {"fast": QueueState(running=8), "mid": QueueState(running=8)}  # both just started
    one_thread_free = Load(cores=4, threads=3, queues=busy)
    no_thread_free = Load(cores=4, threads=2, queues=busy)
    deadline = clock.deadline_in(15.0)
    assert r.choose(deadline=deadline, batch=1, load=one_thread_free).candidate.name == "slow"
    d = r.choose(deadline=deadline, batch=1, load=no_thread_free)
    # slow must wait for fast's batch (8^0.8 ≈ 5.3 ms) to free a thread: 15.3 ms > 15
    assert d.candidate.name == "fast" and d.queue_ms == pytest.approx(8 ** 0.8)


def test_a_request_joins_the_last_queued_batch_when_it_has_room(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock, max_batch=8)
    load = Load(cores=4, threads=4, queues={"mid": QueueState(queued=3, running=8,
                                                               running_for_ms=2.0)})
    d = r.predict(r.candidate("mid"), 2, load)
    assert d.queue_ms == pytest.approx(3.0 * 8 ** 0.8 - 2.0)  # starts with the batch of 3
    mid = r.candidate("mid")
    assert d.compute_ms == pytest.approx(r.compute(mid, 5).p50)  # …which becomes a batch of 5
    no_room = r.predict(mid, 6, load)  # 3 + 6 > 8: a batch of its own after the 3
    assert no_room.compute_ms == pytest.approx(r.compute(mid, 6).p50)
    assert no_room.queue_ms == pytest.approx(d.queue_ms + r.compute(mid, 3).p50)


def test_late_answers_widen_the_margin_and_early_ones_narrow_it(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    deadline = clock.deadline_in(11.0)
    d = r.choose(deadline=deadline, batch=1, load=IDLE)
    assert d.candidate.name == "slow" and d.margin_ms == 0.0  # 10 ms predicted, factor 1
    for _ in range(200):  # answers arrive 30 % later than predicted, and miss their budget
        r.observe(d, d.predicted_ms * 1.3, missed=True)
    late = r.calibration.factor
    assert late == pytest.approx(1.3) and r.calibration.miss_rate > 0.8
    d = r.choose(deadline=deadline, batch=1, load=IDLE)
    assert d.candidate.name == "mid" and d.margin_ms == pytest.approx(0.3 * 3.0)
    clock.now += 11.0  # the burst is over: its answers age out of the window
    for _ in range(500):  # then 10 % earlier than predicted, inside the budget
        r.observe(d, d.predicted_ms * 0.9, missed=False)
    assert r.calibration.factor == pytest.approx(0.9) and r.calibration.miss_rate < 0.05
    deadline = clock.deadline_in(11.0)
    assert r.choose(deadline=deadline, batch=1, load=IDLE).candidate.name == "slow"


def test_bigger_batches_cost_more(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    deadline = clock.deadline_in(12.0)
    assert r.choose(deadline=deadline, batch=1, load=IDLE).candidate.name == "slow"
    assert r.choose(deadline=deadline, batch=8, load=IDLE).candidate.name != "slow"


def test_nothing_fits_best_effort_gives_the_fastest(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock, on_miss="best-effort")
    d = r.choose(deadline=clock.deadline_in(0.1), batch=1, load=IDLE)
    assert d.candidate.name == "fast" and not d.fits


def test_nothing_fits_sheds_at_once_with_deadline_exceeded(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock, max_batch=8)
    with pytest.raises(Shed, match=r"'fast' would need 1\.000 ms") as caught:
        r.choose(deadline=clock.deadline_in(0.1), batch=1, load=IDLE)
    assert caught.value.code == "DEADLINE_EXCEEDED"
    # the budget would fit an idle server, but the queue in front of every variant would not
    jammed = Load(cores=4, threads=4, queues={v.name: QueueState(queued=64, running=8)
                                             for v in VARIANTS})
    with pytest.raises(Shed, match="shed at once"):
        r.choose(deadline=clock.deadline_in(5.0), batch=1, load=jammed)
    # without a budget a request is never shed for time
    assert r.choose(deadline=None, batch=1, load=jammed).candidate.name == "slow"


def test_a_shed_carries_the_least_compute_any_of_its_candidates_would_have_taken(
        clock: FakeClock) -> None:
    """What tells load from a budget no idle server could meet (the engine compares it with the
    budget the request stated): the fastest candidate's own compute, uncontended, whatever the
    queues — 1 ms for `fast`; 10 ms when the request pinned `slow`."""
    r = _router(VARIANTS, clock, max_batch=8)
    with pytest.raises(Shed) as caught:
        r.choose(deadline=clock.deadline_in(0.5), batch=1, load=IDLE)
    assert caught.value.least_ms == pytest.approx(1.0)
    jammed = Load(cores=4, threads=4, queues={v.name: QueueState(queued=64, running=8)
                                             for v in VARIANTS})
    with pytest.raises(Shed) as caught:
        r.choose(deadline=clock.deadline_in(5.0), batch=1, load=jammed)
    assert caught.value.least_ms == pytest.approx(1.0) and caught.value.refusal == "load"
    with pytest.raises(Shed) as caught:
        r.choose(deadline=clock.deadline_in(5.0), batch=1, load=IDLE, pin="slow")
    assert caught.value.least_ms == pytest.approx(10.0)


def test_pinned_variant_and_unknown_pin(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    assert r.choose(deadline=clock.deadline_in(20), batch=1, load=IDLE, pin="slow").candidate.name == "slow"
    with pytest.raises(Shed, match="'slow'"):  # pinned, and cannot make it: no other variant
        r.choose(deadline=clock.deadline_in(0.5), batch=1, load=IDLE, pin="slow")
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
    assert r.next_stage_fits("early-exit", 1, deadline=deadline, batch=1, slowdown=1.0)
    clock.now += 0.004  # 1 ms left; stage 1 alone needs ~1.65 ms at p95
    assert not r.next_stage_fits("early-exit", 1, deadline=deadline, batch=1, slowdown=1.0)
    assert r.next_stage_fits("early-exit", 1, deadline=None, batch=1, slowdown=1.0)


def test_candidates_are_ranked_by_validation_and_exit_depths_by_their_capped_policy(
        clock: FakeClock) -> None:
    full = replace(_variant("full", 0.985, 10.0), val_accuracy=0.98)
    # exit 2 alone scores 0.99 on test, but the policy that may go to depth 2 serves 0.975
    exits = [replace(e, policy_val_accuracy=acc) for e, acc in zip(EXITS, (0.90, 0.95, 0.975),
                                                                      strict=True)]
    cands = {c.name: c for c in candidates_for([full, _variant("early-exit", 0.99, 5.0, exits)])}
    assert cands["full"].accuracy == 0.98
    assert [cands[f"early-exit@{k}"].accuracy for k in range(3)] == [0.90, 0.95, 0.975]
    r = _router([full, _variant("early-exit", 0.99, 5.0, exits)], clock)
    assert r.choose(deadline=None, batch=1, load=IDLE).candidate.name == "full"
    # manifests from before validation accuracies were recorded rank by test accuracy
    assert candidates_for([_variant("old", 0.97, 1.0)])[0].accuracy == 0.97


def test_equally_accurate_candidates_go_cheapest_first(clock: FakeClock) -> None:
    twins = [_variant("a-slow", 0.95, 3.0), _variant("b-fast", 0.95, 1.0)]
    r = _router(twins, clock)
    assert r.choose(deadline=None, batch=1, load=IDLE).candidate.name == "b-fast"


def test_when_the_cpu_cannot_sustain_the_arrival_rate_cheaper_candidates_win(
        clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    deadline = clock.deadline_in(50.0)
    assert r.choose(deadline=deadline, batch=1, load=IDLE).candidate.name == "slow"
    r.cpu.share_ms = lambda now: 4.0  # type: ignore[method-assign]  # 4 ms per request affordable
    assert r.choose(deadline=deadline, batch=1, load=IDLE).candidate.name == "mid"
    r.cpu.share_ms = lambda now: 0.1  # type: ignore[method-assign]  # nothing is that cheap: the
    # cheapest that fits rather than a refusal
    assert r.choose(deadline=deadline, batch=1, load=IDLE).candidate.name == "fast"
    assert r.choose(deadline=deadline, batch=1, load=IDLE, pin="slow").candidate.name == "slow"


def test_each_candidate_learns_its_own_margin_once_it_has_answers(clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    slow = r.choose(deadline=None, batch=1, load=IDLE)
    fast = r.choose(deadline=None, batch=1, load=IDLE, pin="fast")
    for _ in range(200):
        r.observe(slow, slow.predicted_ms + 5.0, missed=True)  # the heavy one runs 5 ms late
        r.observe(fast, fast.predicted_ms, missed=False)  # the light one on time
    clock.now += 2.0  # a refresh is due
    assert r.margin_ms(r.candidate("slow"), 10.0, clock.now) == pytest.approx(5.0)
    assert r.margin_ms(r.candidate("fast"), 1.0, clock.now) == pytest.approx(0.0)
    # a candidate without answers of its own falls back on all answers
    assert r.margin_ms(r.candidate("mid"), 3.0, clock.now) > 0.5


def test_the_margin_picks_among_candidates_but_only_a_probable_miss_is_shed(
        clock: FakeClock) -> None:
    r = _router(VARIANTS, clock)
    r.reset_calibration(1.5)  # margins of half the prediction
    d = r.choose(deadline=clock.deadline_in(1.2), batch=1, load=IDLE)
    assert d.candidate.name == "fast" and not d.fits  # 1 ms + 0.5 margin > 1.2, 1 ms alone < 1.2
    with pytest.raises(Shed):
        r.choose(deadline=clock.deadline_in(0.9), batch=1, load=IDLE)


def test_while_answers_run_late_a_request_behind_queued_work_must_fit_with_its_margin(
        clock: FakeClock) -> None:
    """When predictions fail (another process takes the cores) the queue grows until a new
    request is predicted to finish just inside its budget; admitted on that prediction alone,
    about a third of them missed (two CPU hogs on 2 cores). So while more admitted answers miss
    than the target allows, a fallback that would wait behind queued work must fit with its
    margin; with the threads free, or while answers meet their budgets, the prediction alone
    decides."""
    r = _router(VARIANTS, clock)
    r.reset_calibration(1.5)  # margins of half the prediction
    behind = Load(cores=4, threads=1, queues={"fast": QueueState(running=1)})  # 1 ms ahead
    d = r.choose(deadline=clock.deadline_in(2.5), batch=1, load=behind, pin="fast")
    assert not d.fits and d.queue_ms == pytest.approx(1.0)  # 2 ms + 1 ms margin > 2.5 ms
    for _ in range(50):  # pinned answers, admitted to make it, arrive late
        r.observe(d, 2.7, missed=True, calibrate=False)
    assert r.late_share["fast"] > r.calibration.target  # counted here, not in the margins
    assert r.late_share["mid"] == 0.0  # the candidate's own answers only
    assert r.calibration.observed == 0 and r.calibration.factor == 1.5
    with pytest.raises(Shed, match=r"wait 1\.000 .* margin 1\.000"):
        r.choose(deadline=clock.deadline_in(2.5), batch=1, load=behind, pin="fast")
    idle = r.choose(deadline=clock.deadline_in(1.2), batch=1, load=IDLE)  # nothing ahead
    assert idle.candidate.name == "fast" and not idle.fits
    for _ in range(400):  # answers on time again
        r.observe(d, 1.9, missed=False, calibrate=False)
    assert r.choose(deadline=clock.deadline_in(2.5), batch=1, load=behind, pin="fast").queue_ms > 0


def test_with_wide_margins_the_fallback_is_the_fastest_prediction_not_a_skipped_candidate(
        clock: FakeClock) -> None:
    """Margins of 9x the prediction (a host where answers ran late): nothing fits with its margin.
    The fallback must still be the candidate predicted fastest — `fast`, 1 ms for a 2 ms budget —
    not `mid`, skipped for its 3 ms of compute before any margin was added (an unfair comparison
    that shed nearly every request of the demo at 2x load)."""
    r = _router(VARIANTS, clock)
    r.reset_calibration(10.0)
    d = r.choose(deadline=clock.deadline_in(2.0), batch=1, load=IDLE)
    assert d.candidate.name == "fast" and not d.fits
    with pytest.raises(Shed, match="'fast' would need 1\\.000 ms"):  # and a doomed one names it
        r.choose(deadline=clock.deadline_in(0.9), batch=1, load=IDLE)


# --- placement: the same variants on a GPU lane ---------------------------------------------------

def _placed_router(clock: FakeClock, gpu_ms: float, **kw: object) -> Router:
    """fast/mid/slow on the CPU as above, and each on a GPU lane (``cuda:…``) at ``gpu_ms`` per
    batch-1 call, with GPU batches of up to 8."""
    lat = LatencyModel()
    for v in VARIANTS:
        seed_from_manifest(lat, v)
        lat.seed(f"cuda:{v.name}", _table(gpu_ms))
    gpu = candidates_for(VARIANTS, "cuda")
    return Router([*candidates_for(VARIANTS), *gpu], lat, clock=clock,
                  lane_max_batch={c.lane: 8 for c in gpu}, **kw)  # type: ignore[arg-type]


def test_a_variant_on_a_faster_device_is_ranked_first(clock: FakeClock) -> None:
    r = _placed_router(clock, gpu_ms=0.5)
    d = r.choose(deadline=None, batch=1, load=IDLE)
    assert (d.candidate.name, d.candidate.variant, d.candidate.device) == ("cuda:slow", "slow",
                                                                           "cuda")
    # a tight budget that only a GPU lane meets goes there, to its most accurate variant
    d = r.choose(deadline=clock.deadline_in(2.0), batch=1, load=IDLE)
    assert d.candidate.name == "cuda:slow" and d.fits


def test_when_the_gpu_queue_is_long_the_request_overflows_to_the_cpu(clock: FakeClock) -> None:
    r = _placed_router(clock, gpu_ms=2.0)
    deadline = clock.deadline_in(15.0)
    busy_gpu = {f"cuda:{v.name}": QueueState(queued=64, running=8) for v in VARIANTS}
    d = r.choose(deadline=deadline, batch=1, load=Load(cores=4, threads=4, accel_threads=1,
                                                       queues=busy_gpu))
    # slow on the CPU (10 ms) fits where every GPU lane's backlog does not
    assert d.candidate.name == "slow" and d.candidate.device == "cpu" and d.queue_ms == 0.0
    # the GPU backlog is laid out on the GPU's own threads, not the CPU's
    gpu_wait = r.predict(r.candidate("cuda:slow"), 1, Load(cores=4, threads=4, accel_threads=1,
                                                           queues=busy_gpu)).queue_ms
    assert gpu_wait > 15.0


def test_cpu_load_slows_only_cpu_lanes_and_gpu_load_only_gpu_lanes(clock: FakeClock) -> None:
    r = _placed_router(clock, gpu_ms=1.0)
    cpu_busy = Load(cores=4, threads=4, cpu_other=1.0, executing=4)
    assert r.predict(r.candidate("cuda:slow"), 1, cpu_busy).compute_ms == pytest.approx(1.0)
    assert r.predict(r.candidate("slow"), 1, cpu_busy).compute_ms > 10.0
    gpu_busy = Load(cores=4, threads=4, accel_slowdown=3.0)
    assert r.predict(r.candidate("cuda:slow"), 1, gpu_busy).compute_ms == pytest.approx(3.0)
    assert r.predict(r.candidate("slow"), 1, gpu_busy).compute_ms == pytest.approx(10.0)


def test_pins_name_a_variant_on_any_device_or_one_lane(clock: FakeClock) -> None:
    r = _placed_router(clock, gpu_ms=0.5)
    assert r.choose(deadline=None, batch=1, load=IDLE, pin="cuda:mid").candidate.name == "cuda:mid"
    on_either = r.choose(deadline=None, batch=1, load=IDLE, pin="mid").candidate
    assert on_either.variant == "mid" and on_either.device == "cuda"  # the faster placement
    # the GPU lane quarantined: the variant pin falls back to the CPU lane
    fallback = r.choose(deadline=None, batch=1, load=IDLE, pin="mid", exclude={"cuda:mid"})
    assert fallback.candidate.name == "mid"
    assert r.choose(deadline=None, batch=1, load=IDLE, pin="cpu:mid").candidate.name == "mid"


def test_equal_accuracy_prefers_the_gpu_lane_even_when_a_cpu_variant_is_faster_at_batch_1(
        clock: FakeClock) -> None:
    """int8 has no GPU lane and ties full on validation: the tie goes to ``cuda:full``, since the
    CPU also handles every request's decoding and must not be spent first."""
    twin = _variant("twin", 0.99, 0.2)  # as accurate as slow, faster than its GPU lane at batch 1
    lat = LatencyModel()
    for v in [*VARIANTS, twin]:
        seed_from_manifest(lat, v)
    lat.seed("cuda:slow", _table(0.5))
    r = Router([*candidates_for([*VARIANTS, twin]), *candidates_for([VARIANTS[2]], "cuda")], lat,
               clock=clock)
    assert r.choose(deadline=None, batch=1, load=IDLE).candidate.name == "cuda:slow"


def test_a_gpu_lane_queue_holds_as_many_batches_as_a_cpu_lane(clock: FakeClock) -> None:
    r = _placed_router(clock, gpu_ms=0.5, max_queue=64,
                       lane_max_queue={f"cuda:{v.name}": 512 for v in VARIANTS})
    full = {name: QueueState(queued=100) for name in ("slow", "mid", "fast")}
    load = Load(cores=4, threads=4, queues=full)
    # every CPU lane is past its 64 samples; the GPU lanes take the request
    assert r.choose(deadline=None, batch=8, load=load).candidate.device == "cuda"
    gpu_full = {**full, **{f"cuda:{n}": QueueState(queued=510) for n in ("slow", "mid", "fast")}}
    with pytest.raises(Overloaded, match="full"):
        r.choose(deadline=None, batch=8, load=Load(cores=4, threads=4, queues=gpu_full))


@pytest.mark.parametrize("seed", range(300))
def test_the_choice_is_the_policy_whatever_the_share_queues_and_budget(seed: int) -> None:
    """The policy as the module says it, checked against `Router.predictions` on random
    families, queues, CPU shares and budgets: the most accurate candidate that fits within the
    share; else the cheapest that fits; else the fastest (by its prediction without margin), or
    a shed. `choose` computes the same predictions inline, in one pass that stops at the first
    answer: whatever shortcut it takes, the answer must be this one."""
    rng = random.Random(seed)
    clock = FakeClock()
    variants = [_variant(f"v{i}", rng.choice([0.9, 0.93, 0.95, 0.97, 0.99]), rng.uniform(0.2, 8.0))
                for i in range(rng.randint(1, 6))]
    r = _router(variants, clock, max_batch=8)
    r.reset_calibration(rng.choice([1.0, 1.2, 1.5]))
    share = rng.choice([0.05, 0.5, 2.0, 5.0, float("inf")])
    r.cpu.share_ms = lambda now: share  # type: ignore[method-assign]
    load = Load(cores=2, threads=rng.randint(1, 2), queues={
        v.name: QueueState(queued=rng.choice([0, 0, 3, 12]), running=rng.choice([0, 0, 8]))
        for v in variants})
    batch = rng.choice([1, 4])
    budget = rng.uniform(0.5, 40.0)

    predicted = {d.candidate.name: d for d in r.predictions(r._ranked, batch, load)}
    cost = {c.name: r.latency.sum_ms(c.units, batch)[0] for c in r._ranked}
    fitting = [c for c in r._ranked
               if predicted[c.name].predicted_ms + predicted[c.name].margin_ms <= budget]
    within = [c for c in fitting if cost[c.name] <= share]
    try:
        got = r.choose(deadline=clock.deadline_in(budget), batch=batch, load=load)
    except Shed:
        got = None
    if within:
        assert got is not None and got.candidate == within[0] and got.fits
    elif fitting:
        assert got is not None and got.candidate == min(fitting, key=lambda c: cost[c.name])
    else:
        fastest = min(r._ranked, key=lambda c: predicted[c.name].predicted_ms)
        if predicted[fastest.name].predicted_ms <= budget:
            assert got is not None and got.candidate == fastest and not got.fits
        else:
            assert got is None
