"""Print a seeded random sample of the not-yet-checked mutants of some modules, for ``mutmut run``.

A full ``make mutate`` (about 6,900 mutants, 5-20 s of tests for each survivor) takes hours on 2 cores; a random
sample of mutants estimates a module's score with a known error (see benchmarks/mutation.md) in a fraction of
that. Mutants already checked are never drawn again, so repeated runs add to the same results.

    mutmut run $(python benchmarks/mutation_sample.py --fraction 0.3 'siclip.train.*' 'siclip.data.loader.*')
"""

from __future__ import annotations

import argparse
import fnmatch
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mutation_report import module_of, mutmut_results, parse


def sample(results: dict[str, str], patterns: list[str], fraction: float, seed: int) -> list[str]:
    """``fraction`` of each module's unchecked mutants that match ``patterns``, drawn with ``seed``."""
    by_module: dict[str, list[str]] = defaultdict(list)
    for name, status in sorted(results.items()):
        if status == "not checked" and any(fnmatch.fnmatchcase(name, p) for p in patterns):
            by_module[module_of(name)].append(name)
    rng = random.Random(seed)
    picked: list[str] = []
    for module in sorted(by_module):
        names = by_module[module]
        picked += rng.sample(names, round(fraction * len(names)))
    return sorted(picked)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("patterns", nargs="+", help="mutant name globs, e.g. 'siclip.models.*'")
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0 < args.fraction <= 1:
        ap.error(f"--fraction must be in (0, 1], got {args.fraction}")
    print("\n".join(sample(parse(mutmut_results()), args.patterns, args.fraction, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
