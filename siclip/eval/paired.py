"""Paired comparisons over seeds for the ablation (docs/ablation-design.md): the difference of two rows trained
with the same seeds, its Student-t 95 % interval, a verdict on a claim, and a row's share of the
teacher-baseline gap. Pure Python, no scipy."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PairedDifference", "gap_share", "paired_difference", "t_975", "verdict"]

# Two-sided 95 % (one-sided 0.975) quantiles of Student's t, by degrees of freedom (standard tables).
_T_975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    17: 2.110,
    18: 2.101,
    19: 2.093,
    20: 2.086,
    21: 2.080,
    22: 2.074,
    23: 2.069,
    24: 2.064,
    25: 2.060,
    26: 2.056,
    27: 2.052,
    28: 2.048,
    29: 2.045,
    30: 2.042,
    40: 2.021,
    60: 2.000,
    120: 1.980,
}


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (for a two-sided 95 % interval).

    Tabulated for 1-30, 40, 60 and 120; between tabulated values the next smaller one (a slightly wider,
    conservative interval); above 120 the normal 1.960.
    """
    if df < 1:
        raise ValueError(f"df: got {df}; allowed: 1 or more (two or more seeds)")
    if df > 120:
        return 1.960
    return _T_975[max(d for d in _T_975 if d <= df)]


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` over seeds: mean, the 95 % interval (``low``, ``high``; NaN with one seed) and the seed count."""

    mean: float
    low: float
    high: float
    n: int


def paired_difference(a: Sequence[float], b: Sequence[float]) -> PairedDifference:
    """Mean of ``a[s] - b[s]`` over seeds ``s`` and its t-interval ``mean ± t_975(n-1) * sd / sqrt(n)``
    (``sd`` with ``n - 1``). ``a`` and ``b`` hold one value per seed, in the same seed order."""
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired values: got {len(a)} and {len(b)}; allowed: the same number (>= 1) of seeds"
        )
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    if n == 1:
        return PairedDifference(mean, math.nan, math.nan, 1)
    half = t_975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return PairedDifference(mean, mean - half, mean + half, n)


def verdict(diff: PairedDifference, threshold: float = 0.0) -> str:
    """``holds`` when the interval lies above ``threshold``, ``against`` when below, else ``not shown``
    (also with one seed: no interval)."""
    if diff.n < 2:
        return "not shown"
    if diff.low > threshold:
        return "holds"
    if diff.high < threshold:
        return "against"
    return "not shown"


def gap_share(row: float, baseline: float, teacher: float, *, min_gap: float = 0.02) -> float | None:
    """``(row - baseline) / (teacher - baseline)``: the share of the teacher-baseline gap a row closes;
    None when the gap is under ``min_gap`` (a ratio of noise)."""
    gap = teacher - baseline
    if gap < min_gap:
        return None
    return (row - baseline) / gap
