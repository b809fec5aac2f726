"""Paired differences over seeds and their 95 % t-intervals, against a naive reference written here."""

from __future__ import annotations

import math

import pytest

from siclip.eval.paired import gap_share, paired_difference, t_975, verdict

# Student's t, 0.975 quantile, from a printed table
TEXTBOOK = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 19: 2.093, 29: 2.045}


def _naive_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    d = [a[i] - b[i] for i in range(len(a))]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    half = TEXTBOOK[n - 1] * math.sqrt(var) / math.sqrt(n)
    return mean, mean - half, mean + half


@pytest.mark.parametrize("df", sorted(TEXTBOOK))
def test_t_quantiles_are_the_textbook_ones(df: int) -> None:
    assert t_975(df) == pytest.approx(TEXTBOOK[df], abs=5e-4)


def test_t_quantiles_between_table_rows_are_conservative_and_tend_to_the_normal() -> None:
    assert t_975(30) >= t_975(35) >= t_975(40) >= t_975(1000) == pytest.approx(1.96, abs=1e-3)
    with pytest.raises(ValueError, match="df"):
        t_975(0)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([0.70, 0.72, 0.69, 0.75, 0.71], [0.60, 0.65, 0.61, 0.66, 0.58]),
        ([0.50, 0.40, 0.55, 0.45, 0.52], [0.49, 0.44, 0.50, 0.46, 0.50]),
        ([0.1, 0.3], [0.2, 0.1]),
        ([0.3, 0.2, 0.25, 0.31, 0.28, 0.22, 0.27, 0.24, 0.3, 0.26], [0.2] * 10),
    ],
)
def test_paired_difference_matches_the_naive_reference(a: list[float], b: list[float]) -> None:
    got = paired_difference(a, b)
    mean, low, high = _naive_interval(a, b)
    assert (got.mean, got.low, got.high, got.n) == pytest.approx((mean, low, high, len(a)), abs=1e-5)


def test_pairing_is_by_seed_not_by_row_means() -> None:
    # the same values, paired differently: a constant +0.02 per seed is a tight interval, a shuffled pairing
    # of the same numbers is not
    a = [0.50, 0.60, 0.70, 0.80, 0.90]
    paired = paired_difference(a, [x - 0.02 for x in a])
    assert paired.low == pytest.approx(0.02) and paired.high == pytest.approx(0.02)
    shuffled = paired_difference(a, [0.88, 0.48, 0.78, 0.58, 0.68])
    assert shuffled.mean == pytest.approx(0.02) and shuffled.low < 0 < shuffled.high


def test_one_seed_has_no_interval_and_mismatched_seeds_fail() -> None:
    one = paired_difference([0.7], [0.6])
    assert one.mean == pytest.approx(0.1) and math.isnan(one.low) and verdict(one) == "not shown"
    with pytest.raises(ValueError, match="same number"):
        paired_difference([0.1, 0.2], [0.1])


def test_verdicts_and_gap_shares() -> None:
    up = paired_difference([0.7, 0.72, 0.71], [0.6, 0.61, 0.6])
    down = paired_difference([0.6, 0.61, 0.6], [0.7, 0.72, 0.71])
    noise = paired_difference([0.6, 0.7, 0.65], [0.65, 0.6, 0.66])
    assert (verdict(up), verdict(down), verdict(noise)) == ("holds", "against", "not shown")
    # non-inferiority: slightly below, but within the margin
    close = paired_difference([0.700, 0.702, 0.699], [0.703, 0.705, 0.702])
    assert verdict(close) == "against" and verdict(close, -0.01) == "holds"
    assert gap_share(0.6, 0.2, 0.8) == pytest.approx(2 / 3)
    assert gap_share(0.6, 0.79, 0.8) is None
