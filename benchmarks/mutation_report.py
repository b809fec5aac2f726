"""Write the mutation score table (``make mutate``) from ``mutmut results --all true`` to benchmarks/mutation.md.

Score per module = killed / (killed + survived + no tests), over the mutants mutmut has checked; timeouts
count as killed (the mutant hung the tests), "not checked" mutants are listed separately so a partial run is
visible as partial. When only a random sample was checked (``make mutate-sample``) the score is an estimate:
the table gives its 95 % Wilson interval, and one row per package. Everything after the ``<!-- notes -->`` line of the existing file (the hand-written
explanation of each survivor) is kept.

    python benchmarks/mutation_report.py [--results FILE] [--out benchmarks/mutation.md] [--note TEXT]
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

KILLED = {"killed", "timeout", "caught by type check", "segfault"}
LIVE = {"survived", "no tests", "suspicious"}
MARKER = "<!-- notes -->"
LINE = re.compile(r"^\s*(?P<name>[\w.]+?\.(?:x_|xǁ)\S*__mutmut_\d+): (?P<status>.+?)\s*$")


def parse(text: str) -> dict[str, str]:
    return {m["name"]: m["status"] for m in map(LINE.match, text.splitlines()) if m}


def mutmut_results() -> str:
    """The text of ``mutmut results --all true`` for the current folder's ``mutants/``."""
    cmd = [sys.executable, "-m", "mutmut", "results", "--all", "true"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def module_of(name: str) -> str:
    return re.split(r"\.(?:x_|xǁ)", name, maxsplit=1)[0]


def table(results: dict[str, str]) -> tuple[str, list[str]]:
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for name, status in results.items():
        per[module_of(name)][status] += 1
    rows = [
        "| module | mutants | checked | killed | survived / no tests | score | 95 % interval |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    total: Counter[str] = Counter()
    packages: dict[str, Counter[str]] = defaultdict(Counter)
    for module in sorted(per):
        c = per[module]
        total.update(c)
        packages[module.rsplit(".", 1)[0]].update(c)
        rows.append(_row(module, c))
    for package in sorted(packages):
        rows.append(_row(f"**{package} (all)**", packages[package]))
    rows.append(_row("**all checked**", total))
    survivors = sorted(n for n, s in results.items() if s in LIVE)
    return "\n".join(rows), survivors


def _row(label: str, c: Counter[str]) -> str:
    killed = sum(c[s] for s in KILLED)
    live = sum(c[s] for s in LIVE)
    checked = killed + live
    score = f"{100 * killed / checked:.1f} %" if checked else "-"
    lo, hi = wilson(killed, checked)
    interval = f"{100 * lo:.0f}-{100 * hi:.0f} %" if checked else "-"
    return f"| {label} | {sum(c.values())} | {checked} | {killed} | {live} | {score} | {interval} |"


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n``: the score of a random sample of mutants is an estimate."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--results", help="saved output of `mutmut results --all true` (default: run it)")
    ap.add_argument("--out", default="benchmarks/mutation.md")
    ap.add_argument("--note", default="", help="a line about the run (machine, what was covered)")
    args = ap.parse_args(argv)
    text = Path(args.results).read_text() if args.results else mutmut_results()
    results = parse(text)
    if not results:
        print("mutation_report: no mutmut results found (run `make mutate` first)", file=sys.stderr)
        return 1
    body, survivors = table(results)
    out = Path(args.out)
    notes = out.read_text().split(MARKER, 1)[1] if out.is_file() and MARKER in out.read_text() else "\n"
    text = (
        "# Mutation score (`make mutate`, mutmut)\n\n"
        + (args.note + "\n\n" if args.note else "")
        + body
        + "\n\nSurviving mutants (`mutmut show NAME` prints the diff):\n\n"
        + ("\n".join(f"- `{s}`" for s in survivors) or "- none")
        + f"\n\n{MARKER}"
        + notes
    )
    out.write_text(text)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
