"""The mutation-score tools (benchmarks/mutation_report.py, mutation_sample.py) on a made-up ``mutmut results``.

The score counts timeouts as kills and leaves unchecked mutants out; the sample is seeded, per module, of the
given fraction, and never draws a mutant that was already checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from mutation_report import parse, table, wilson
from mutation_sample import sample

RESULTS = "\n".join(
    [f"    siclip.a.x_f__mutmut_{i}: killed" for i in range(1, 7)]
    + ["    siclip.a.x_f__mutmut_7: timeout", "    siclip.a.xǁCǁg__mutmut_1: survived"]
    + [f"    siclip.b.x_h__mutmut_{i}: not checked" for i in range(1, 21)]
    + ["    siclip.b.x_h__mutmut_21: no tests", "    some other line"]
)


def test_score_counts_timeouts_as_kills_and_ignores_unchecked() -> None:
    results = parse(RESULTS)
    assert len(results) == 29 and results["siclip.a.xǁCǁg__mutmut_1"] == "survived"
    body, survivors = table(results)
    rows = {line.split(" | ")[0].strip("| "): line for line in body.splitlines()[2:]}
    assert rows["siclip.a"] == "| siclip.a | 8 | 8 | 7 | 1 | 87.5 % | 53-98 % |"
    assert rows["siclip.b"] == "| siclip.b | 21 | 1 | 0 | 1 | 0.0 % | 0-79 % |"
    assert rows["**siclip (all)**"] == "| **siclip (all)** | 29 | 9 | 7 | 2 | 77.8 % | 45-94 % |"
    assert rows["**all checked**"] == "| **all checked** | 29 | 9 | 7 | 2 | 77.8 % | 45-94 % |"
    assert survivors == ["siclip.a.xǁCǁg__mutmut_1", "siclip.b.x_h__mutmut_21"]


def test_wilson_interval_matches_the_textbook_formula() -> None:
    k, n, z = 45, 50, 1.96
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * (p * (1 - p) / n + z**2 / (4 * n**2)) ** 0.5
    assert wilson(k, n) == pytest.approx((centre - half, centre + half))
    assert wilson(0, 0) == (0.0, 1.0) and wilson(10, 10)[1] == 1.0


def test_sample_is_seeded_per_module_and_skips_checked_mutants() -> None:
    results = parse(RESULTS)
    picked = sample(results, ["siclip.*"], 0.25, seed=3)
    assert len(picked) == 5 and all(results[n] == "not checked" for n in picked)
    assert picked == sample(results, ["siclip.*"], 0.25, seed=3)
    assert picked != sample(results, ["siclip.*"], 0.25, seed=4)
    assert sample(results, ["siclip.a.*"], 1.0, seed=0) == []
