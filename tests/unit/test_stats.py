"""`compression.core.stats`: Wilson intervals and exact McNemar p-values against values computed
independently (scipy's ``binomtest``, the score equation, ``math.comb``), the correctness bits;
and the paired latency profile's arithmetic (`compression.profile.paired_latency`, fake clock)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from compression.core.stats import (
    Z95,
    correct_count,
    decode_bits,
    encode_bits,
    format_accuracy,
    format_bits,
    format_delta,
    format_p,
    format_rate,
    mcnemar_exact,
    paired,
    wilson,
)


def test_wilson_980_of_1000_matches_scipy() -> None:
    # scipy.stats.binomtest(980, 1000).proportion_ci(0.95, "wilson"), scipy 1.17.1
    lo, hi = wilson(980, 1000)
    assert lo == pytest.approx(0.9693099947702821, abs=1e-12)
    assert hi == pytest.approx(0.9870163170835848, abs=1e-12)


@pytest.mark.parametrize("k, n", [(980, 1000), (1, 7), (450, 500), (999, 1000)])
def test_wilson_bounds_solve_the_score_equation(k: int, n: int) -> None:
    """The Wilson bounds are the p0 at which the score statistic is exactly ±z."""
    p_hat = k / n
    for p0 in wilson(k, n):
        assert abs(p_hat - p0) / math.sqrt(p0 * (1 - p0) / n) == pytest.approx(Z95, rel=1e-9)


def test_wilson_edges_stay_in_the_unit_interval() -> None:
    # scipy: binomtest(0, 50).proportion_ci(0.95, "wilson") = (0, 0.07134759913335872)
    assert wilson(0, 50) == (0.0, pytest.approx(0.07134759913335872, abs=1e-12))
    lo, hi = wilson(50, 50)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.07134759913335872, abs=1e-12)


def test_mcnemar_exact_b5_c15_is_the_binomial_tail() -> None:
    n = 20
    expected = 2 * sum(math.comb(n, i) for i in range(6)) / 2 ** n  # P[Binom(20, ½) ≤ 5], twice
    assert mcnemar_exact(5, 15) == pytest.approx(expected, rel=1e-15)
    assert mcnemar_exact(15, 5) == mcnemar_exact(5, 15)
    assert expected == pytest.approx(0.04138946533203125, rel=1e-12)  # scipy binomtest(5, 20)


@pytest.mark.parametrize("b, c, p", [(0, 0, 1.0), (3, 3, 1.0), (0, 6, 2 / 64), (0, 1, 1.0)])
def test_mcnemar_exact_small_cases(b: int, c: int, p: float) -> None:
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-15)


def test_mcnemar_exact_large_counts_do_not_overflow() -> None:
    # 600 vs 400 discordant images: clearly significant, still a finite float
    assert 0 < mcnemar_exact(600, 400) < 1e-9


def test_paired_counts_only_the_discordant_images() -> None:
    full = np.array([1, 1, 1, 0, 0, 1, 1, 0], dtype=bool)
    var = np.array([1, 0, 1, 1, 0, 0, 1, 1], dtype=bool)
    result = paired(full, var)
    assert (result.b, result.c, result.delta) == (2, 2, 0)
    assert result.p_value == 1.0


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1000])
def test_correctness_bits_round_trip(n: int) -> None:
    bits = np.random.default_rng(n).random(n) < 0.9
    record = encode_bits(bits)
    assert record["n"] == n and isinstance(record["bits"], str)
    np.testing.assert_array_equal(decode_bits(record), bits)


def test_bad_input_names_the_value() -> None:
    with pytest.raises(ValueError, match="correct=11"):
        wilson(11, 10)
    with pytest.raises(ValueError, match="n=0"):
        wilson(0, 0)
    with pytest.raises(ValueError, match="b=-1"):
        mcnemar_exact(-1, 2)
    with pytest.raises(ValueError, match="n=9 images need 2 bytes"):
        decode_bits({"n": 9, "bits": encode_bits(np.ones(8, bool))["bits"]})
    with pytest.raises(ValueError, match="malformed"):
        decode_bits({"n": 8, "bits": "not base64!"})
    with pytest.raises(ValueError, match="shapes"):
        paired(np.ones(3, bool), np.ones(4, bool))


def test_formatting() -> None:
    assert format_accuracy(980, 1000) == "98.00% [96.93, 98.70]"
    assert format_p(0.04138946533203125) == "p=0.041"
    assert format_p(0.5) == "p=0.50" and format_p(1e-5) == "p<0.001"


@pytest.mark.parametrize("k, n", [(980, 1000), (2, 3), (1, 7), (0, 5), (5, 5), (99_999, 100_000)])
def test_an_accuracy_recorded_to_6_decimals_formats_as_its_count(k: int, n: int) -> None:
    """The methods' sections hold accuracies (rounded as the manifest rounds them), not counts:
    the interval must be the one of the exact count over the images they were measured on."""
    assert correct_count(round(k / n, 6), n) == k
    assert format_rate(round(k / n, 6), n) == format_accuracy(k, n)
    assert format_rate(0.979, 1000, digits=1) == "97.9% [96.8, 98.6]"


@pytest.mark.parametrize("accuracy, n", [(0.9805, 1000), (0.5, 3), (1.2, 10), (-0.1, 10),
                                         (0.98, 0)])
def test_an_accuracy_no_count_over_n_gives_is_refused(accuracy: float, n: int) -> None:
    # 0.9805 is 1961/2000: measured on other images than the 1,000 it would be shown over
    with pytest.raises(ValueError, match="n="):
        format_rate(accuracy, n)


def test_bits_format_as_their_count_and_pair_into_delta_and_mcnemar() -> None:
    ref = np.array([True] * 90 + [False] * 10)
    assert format_bits(ref) == format_accuracy(90, 100) == "90.00% [82.56, 94.48]"
    # b = 2 images full got right and the variant lost, c = 1 gained: −1 image of 100
    var = ref.copy()
    var[[0, 1, 95]] = [False, False, True]
    assert format_delta(ref, var) == ("-1.00 pt", format_p(mcnemar_exact(2, 1)))
    assert format_delta(ref, var) == ("-1.00 pt", "p=1.00")
    # twelve images lost, none gained: a real difference
    worse = ref.copy()
    worse[:12] = False
    assert format_delta(ref, worse) == ("-12.00 pt", "p<0.001")
    assert format_delta(ref, ref) == ("+0.00 pt", "p=1.00")
    with pytest.raises(ValueError, match="shapes"):
        format_delta(ref, ref[:50])


# --- the paired latency profile: speed-ups are ratios within a round ----------------------------

def test_paired_speedup_is_exact_under_load_that_changes_between_rounds() -> None:
    """A fake clock and two fake variants, one half the cost of the other, under a load that
    multiplies every time by a different factor each round: the in-round ratio is exactly 2
    every round, while pooled times are spread by the load."""
    from compression.profile import paired_latency

    now = [0.0]
    calls: list[str] = []
    load = [1.0, 5.0, 1.0, 9.0, 2.0]  # one factor per round
    warmup, per_round = 3 * 2, 2 * (1 + 3)  # 3 warm-up calls each; per round 1 untimed + 3

    def fake(name: str, cost: float) -> Callable[[np.ndarray], None]:
        def run(x: np.ndarray) -> None:
            r = max(len(calls) - warmup, 0) // per_round
            calls.append(name)
            now[0] += cost * load[min(r, len(load) - 1)]
        return run

    prof = paired_latency({"full": fake("full", 2.0), "half": fake("half", 1.0)}, (1, 2, 2),
                          batch_sizes=(1,), rounds=5, iters={1: 3}, clock=lambda: now[0] / 1e3)
    assert prof.speedup["half"]["1"] == 2.0 and prof.speedup["full"]["1"] == 1.0
    assert prof.latency_ms["full"]["1"]["p50"] == 4.0  # median of 2 ms × the loads, 3 calls each
    # the order rotates: each round starts with the other variant
    starts = [calls[warmup + r * per_round] for r in range(5)]
    assert starts == ["full", "half", "full", "half", "full"]
    assert prof.meta["method"] == "paired" and prof.meta["rounds"] == 5


def test_paired_profile_names_a_missing_reference() -> None:
    from compression.profile import paired_latency

    with pytest.raises(ValueError, match="reference 'full' is not among"):
        paired_latency({"a": lambda x: None}, (1, 2, 2), batch_sizes=(1,))


def test_cpu_info_reads_the_isa_flags(tmp_path: Path) -> None:
    from compression.profile import cpu_info

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n"
                    "flags\t\t: fpu sse4_2 avx2 avx512f avx512_vnni amx_tile amx_int8\n\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    info = cpu_info(fake)
    assert info["model"] == "Test CPU 9000"
    assert info["isa"] == ["sse4_2", "avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"]
    assert info["int8_dot_product"] is True
    assert cpu_info(tmp_path / "missing")["isa"] == []


def test_the_family_table_gives_validation_accuracies_their_interval_over_the_val_split() -> None:
    """The ``val`` column: an interval over the validation split's size; bare when unknown or
    when the figure is no count over that many images (a manifest is shown, never refused)."""
    from compression.report import split_cell

    assert split_cell(0.99, 500) == format_accuracy(495, 500)
    assert split_cell(0.99, None) == "99.00%"
    assert split_cell(0.123457, 500) == "12.35%"  # no whole count over 500 images
    assert split_cell(None, 500) == "-"
