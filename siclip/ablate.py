"""``siclip ablate``: the paper's ablation rows over several seeds, on the demo world or on any config's data.

Rows (docs/method.md section 7): baseline (SiCLIP architecture from scratch, CLIP loss), WI (inherit + freeze,
CLIP loss), WIKD (+ FD, CRD, ICL), WIKD+PM; and the data claim: web (real) captions only vs CC12M-SYN
(real + synthetic) captions, for the baseline, WI and WIKD+PM. On the demo world the teacher is evaluated too,
and ``held_out=True`` runs the world of docs/ablation-design.md (zero-shot also on seen and unseen classes).
The table adds, per paper claim, the paired difference over seeds with its 95 % t-interval
(:mod:`siclip.eval.paired`) and each row's share of the teacher-baseline gap. Every row is one student config (the demo's,
or ``--config FILE`` with its own data, teacher and held-out sets) plus a few overrides, trained by the
same ``launch(cfg)`` and evaluated by the same suite as ``siclip eval``. Each run's loss and validation
curves are saved as CSV next to the table.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from siclip.config import (
    TRAIN_SECTIONS,
    ConfigError,
    SiclipCfg,
    apply_overrides,
    check_paths,
    from_dict,
    load_config,
    resolve_switches,
    to_dict,
)
from siclip.eval.markdown_tables import save_table
from siclip.eval.paired import gap_share, paired_difference, verdict
from siclip.train.grad_share import format_shares

__all__ = [
    "CLAIMS",
    "ROWS",
    "ablation_table_path",
    "compare_claims",
    "curves_dir",
    "format_table",
    "regime_checks",
    "row_config",
    "run_ablation",
    "save_curve",
    "summarize",
]

NO_KD = [
    "loss.fd_weight=0",
    "loss.crd_weight=0",
    "loss.icl_weight=0",
    "loss.pm_weight=0",
    "teacher.enabled=false",
]
BASELINE = ["model.inherit=false", "model.freeze_inherited=false", *NO_KD]
WEB_ONLY = "data.synthetic=off"
"""The web (real) captions only: the paper's CC12M, against CC12M-SYN's real + synthetic captions."""
ROWS: dict[str, list[str]] = {
    "baseline": BASELINE,
    "baseline, web captions only": [*BASELINE, WEB_ONLY],
    "WI": NO_KD,
    "WI, web captions only": [*NO_KD, WEB_ONLY],
    "WIKD": ["loss.pm_weight=0"],
    "WIKD+PM": [],
    "WIKD+PM, web captions only": [WEB_ONLY],
}
METRICS = ("zeroshot_top1", "zeroshot_top1_seen", "zeroshot_top1_unseen", "i2t_r@1", "t2i_r@1")
"""The table's columns, each where every run of a row has it (seen/unseen: a world with held-out classes)."""
ZEROSHOT = ("zeroshot_top1", "zeroshot_top1_seen", "zeroshot_top1_unseen")


@dataclass(frozen=True)
class Claim:
    """A paper claim as a paired comparison ``a - b`` (same seeds), read on ``primary`` against ``threshold``
    (0 for "a > b"; a negative margin for "a >= b", non-inferiority). ``fallback``: the primary metric where
    the world has no held-out classes."""

    name: str
    a: str
    b: str
    primary: str
    threshold: float = 0.0
    fallback: str = "zeroshot_top1"
    decides: bool = True


CLAIMS: tuple[Claim, ...] = (
    Claim("WI > baseline", "WI", "baseline", "zeroshot_top1"),
    Claim("WIKD > WI", "WIKD", "WI", "zeroshot_top1_unseen"),
    Claim("WIKD+PM >= WIKD", "WIKD+PM", "WIKD", "zeroshot_top1", threshold=-0.01),
    Claim("synthetic > web (WIKD+PM)", "WIKD+PM", "WIKD+PM, web captions only", "zeroshot_top1"),
    Claim(
        "synthetic > web (baseline)",
        "baseline",
        "baseline, web captions only",
        "zeroshot_top1",
        decides=False,
    ),
    Claim("synthetic > web (WI)", "WI", "WI, web captions only", "zeroshot_top1", decides=False),
)
"""docs/ablation-design.md's claims and primary metrics, fixed before any run; ``decides=False``: secondary."""


def _slug(row: str) -> str:
    return row.lower().replace("+", "-").replace(",", "").replace(" ", "-")


def row_config(base: SiclipCfg, row: str, seed: int, steps: int, tag: str = "") -> SiclipCfg:
    """The config one ablation run trains: ``base`` with the row's overrides (``ROWS[row]``), the seed, the
    step count and its run name ``ablate-<row>[-<tag>]-s<seed>`` (its own folder, never another row's)."""
    slug = _slug(row) + (f"-{tag}" if tag else "")
    return from_dict(
        apply_overrides(
            to_dict(base),
            [
                *ROWS[row],
                f"train.seed={seed}",
                f"train.run_name=ablate-{slug}-s{seed}",
                f"train.max_steps={steps}",
            ],
        )
    )


def run_ablation(
    *,
    out_dir: str = "runs/demo",
    seeds: int = 1,
    steps: int = 0,
    quick: bool = False,
    rows: tuple[str, ...] = tuple(ROWS),
    overrides: list[str] | tuple[str, ...] = (),
    config: str | None = None,
    out: str | None = "",
    tag: str = "",
    held_out: bool = False,
) -> tuple[dict[str, Any], str]:
    """Train and evaluate every row for ``seeds`` seeds; returns (result, Markdown table).

    Without ``config`` the demo world, its synthetic captions and its teacher are prepared first (under
    ``out_dir``; ``quick`` for the small world) and the rows start from ``configs/demo.yaml``. With
    ``config`` (a YAML file) the rows start from it as it is: its data, teacher and held-out sets, which
    must exist. ``tag`` names a variant (``overrides`` on top of the rows): its runs get their own folders,
    so they neither resume nor collide with the plain ablation's. Each run's curves go to
    ``curves_dir(out)``. ``held_out``: the demo world of docs/ablation-design.md (``out_dir`` should be its
    own folder, e.g. ``siclip.demo.HELD_OUT_ROOT``). ``out``: the table's path; ``""`` for the one of this
    world, config and tag (``ablation_table_path``); None writes no table.
    """
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ConfigError(f"ablate --row: got {unknown[0]!r}; allowed: {', '.join(map(repr, ROWS))}")
    if tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        raise ConfigError(f"ablate --tag: got {tag!r}; allowed: letters, digits, '_', '.', '-'")
    if config is not None and quick:
        raise ConfigError(f"ablate --quick: only for the demo world; got it with --config {config!r}")
    if config is not None and held_out:
        raise ConfigError(f"ablate --held-out: only for the demo world; got it with --config {config!r}")
    from siclip.demo import CONFIGS, prepare_demo
    from siclip.eval.suite import evaluate_cfg
    from siclip.models.presets import build_preset
    from siclip.train.checkpoint import load_student_weights
    from siclip.train.launch import launch
    from siclip.train.metrics_table import last_grad_shares, read_metrics

    if out == "":
        out = ablation_table_path(config, tag, held_out)
    switches = resolve_switches(config if config is not None else CONFIGS / "demo.yaml", overrides)
    print("siclip ablate: " + "\n".join(switches.lines()), flush=True)
    captions: dict[str, Any] | None = None
    teacher: dict[str, float] | None = None
    if config is None:
        prep = prepare_demo(out_dir=out_dir, quick=quick, overrides=overrides, held_out=held_out)
        base, captions = prep.student_cfg, prep.caption_quality
        data = "the held-out demo world of docs/ablation-design.md" if held_out else "the demo world"
        teacher_model = build_preset(prep.teacher_cfg.model.name, sasp=prep.teacher_cfg.model.sasp)
        load_student_weights(teacher_model, prep.teacher_dir / "final")
        teacher_model.eval()
        teacher = evaluate_cfg(teacher_model, prep.teacher_cfg, recall_at=(1,))
    else:
        # Paths are checked per row (``check_paths``), as for the demo's rows, before that row trains.
        base, data = load_config(config, overrides, check_files=False), f"`{config}`"
    steps = steps or base.train.max_steps
    per_row: dict[str, list[dict[str, float]]] = {row: [] for row in rows}
    curves = curves_dir(out)
    for seed in range(seeds):
        for row in rows:
            cfg = row_config(base, row, seed, steps, tag)
            check_paths(cfg, sections=TRAIN_SECTIONS)
            print(f"\n=== ablation: {row}, seed {seed} ===", flush=True)
            run = launch(cfg)
            model = build_preset(cfg.model.name, sasp=cfg.model.sasp)
            load_student_weights(model, run.run_dir / "final")
            model.eval()
            metrics = evaluate_cfg(model, cfg, recall_at=(1,))
            _, shares = last_grad_shares(run.run_dir)
            per_row[row].append({**metrics, **{f"grad_share/{k}": v for k, v in shares.items()}})
            if curves is not None:
                save_curve(read_metrics(run.run_dir), curves / f"{_slug(row)}-s{seed}.csv")
    summary = summarize(per_row)
    result = {
        "data": data,
        "teacher": teacher,
        "comparisons": compare_claims(per_row),
        "regime": regime_checks(teacher, per_row),
        "tag": tag,
        "overrides": list(overrides),
        "seeds": seeds,
        "steps": steps,
        "rows": summary,
        "runs": per_row,
        "captions": captions,
        "curves": str(curves) if curves is not None else None,
        "switches": switches.markdown(),
    }
    table = format_table(result)
    save_table(table, out)
    return result, table


def ablation_table_path(config: str | None, tag: str = "", held_out: bool = False) -> str:
    """``benchmarks/ablation[-<config stem>|-demo][-<tag>].md``: the held-out world's table (the paper's
    ablation, docs/ablation-design.md) is ``ablation.md``; a config's or the plain demo world's never
    overwrites it."""
    parts = ["ablation", Path(config).stem if config else ("" if held_out else "demo"), tag]
    return f"benchmarks/{'-'.join(p for p in parts if p)}.md"


def curves_dir(out: str | None) -> Path | None:
    """The folder next to the table ``out`` that holds each run's curves (``ablation.md`` ->
    ``ablation-curves/``); None when no table is written."""
    if not out:
        return None
    path = Path(out)
    return path.with_name(f"{path.stem}-curves")


def save_curve(rows: list[dict[str, Any]], path: Path) -> None:
    """One run's training losses (``loss/*``) and held-out metrics (``val/*``) over steps, as CSV: one line
    per logged step (rows logged at the same step merged), empty cells where a value was not logged."""
    by_step: dict[int, dict[str, float]] = {}
    for row in rows:
        values = {k: v for k, v in row.items() if k.startswith(("loss/", "val/"))}
        if values:
            by_step.setdefault(int(row["step"]), {}).update(values)
    columns = sorted({k for v in by_step.values() for k in v}, key=lambda k: (not k.startswith("loss/"), k))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *columns])
        for step in sorted(by_step):
            writer.writerow([step, *(by_step[step].get(k, "") for k in columns)])
    tmp.replace(path)


def summarize(per_row: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per row: mean and population std over seeds of each metric of :data:`METRICS` every seed logged, and
    the mean gradient shares."""
    return {
        row: {
            m: {
                "mean": statistics.fmean(r[m] for r in runs),
                "std": statistics.pstdev([r[m] for r in runs]) if len(runs) > 1 else 0.0,
            }
            for m in METRICS
            if runs and all(m in r for r in runs)
        }
        | _mean_shares(runs)
        for row, runs in per_row.items()
    }


def regime_checks(
    teacher: dict[str, float] | None, per_row: dict[str, list[dict[str, float]]]
) -> list[dict[str, Any]]:
    """docs/ablation-design.md's checks that a held-out world is in the paper's regime (empty without seen
    and unseen metrics): (a) the teacher's unseen top-1 is within 10 points of its seen top-1; (b) the
    baseline's unseen top-1 is below its seen top-1, the paired (same run) interval over seeds below 0."""
    checks: list[dict[str, Any]] = []
    keys = ("zeroshot_top1_seen", "zeroshot_top1_unseen")
    if teacher and all(k in teacher for k in keys):
        gap = teacher[keys[0]] - teacher[keys[1]]
        checks.append(
            {
                "check": "the teacher knows the held-out classes (seen - unseen top-1 <= 10 points)",
                "value": f"{100 * gap:+.1f} points",
                "ok": gap <= 0.10,
            }
        )
    runs = per_row.get("baseline") or []
    if runs and all(k in r for r in runs for k in keys):
        d = paired_difference([r[keys[1]] for r in runs], [r[keys[0]] for r in runs])
        checks.append(
            {
                "check": "the student's data lacks them (baseline unseen - seen top-1, interval below 0)",
                "value": _interval(vars(d)),
                "ok": verdict(d) == "against",
            }
        )
    return checks


def compare_claims(per_row: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Per claim of :data:`CLAIMS` whose two rows ran: the paired difference ``a - b`` (runs paired by seed:
    ``per_row[row][s]`` is seed ``s``) on every metric both rows have, with its 95 % t-interval, and the
    verdict on the claim's primary metric (``fallback`` where the primary was not measured)."""
    out: list[dict[str, Any]] = []
    for claim in CLAIMS:
        a, b = per_row.get(claim.a), per_row.get(claim.b)
        if not a or not b:
            continue
        n = min(len(a), len(b))
        metrics = [m for m in METRICS if all(m in r for r in a[:n] + b[:n])]
        diffs = {m: paired_difference([r[m] for r in a[:n]], [r[m] for r in b[:n]]) for m in metrics}
        primary = claim.primary if claim.primary in diffs else claim.fallback
        out.append(
            {
                "claim": claim.name,
                "a": claim.a,
                "b": claim.b,
                "primary": primary,
                "threshold": claim.threshold,
                "decides": claim.decides,
                "verdict": verdict(diffs[primary], claim.threshold) if primary in diffs else "not shown",
                "diffs": {m: vars(d) for m, d in diffs.items()},
            }
        )
    return out


def _mean_shares(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Mean ``grad_share/<term>`` over the seeds that logged it (``train.grad_share_every``)."""
    keys = sorted({k for r in runs for k in r if k.startswith("grad_share/")})
    return {k: {"mean": statistics.fmean(r[k] for r in runs if k in r)} for k in keys}


def _shares_cell(metrics: dict[str, Any]) -> str:
    shares = {k.split("/", 1)[1]: v["mean"] for k, v in metrics.items() if k.startswith("grad_share/")}
    return format_shares(shares) or "-"


def format_table(result: dict[str, Any]) -> str:
    extra = f"; overrides: `{' '.join(result['overrides'])}`" if result.get("overrides") else ""
    curves = (
        f" Loss and validation curves per run (CSV): `{result['curves']}/`." if result.get("curves") else ""
    )
    lines = [
        f"# Ablation on {result.get('data', 'the demo world')} ({result['seeds']} seed(s), "
        f"{result['steps']} student steps each)",
        "",
        f"Produced by `siclip ablate`{extra}. Values in %, mean ± population std over seeds.{curves}",
        "",
        *([result["switches"], ""] if result.get("switches") else []),
    ]
    rows: dict[str, dict[str, Any]] = result["rows"]
    columns = [m for m in METRICS if any(m in metrics for metrics in rows.values())]
    lines += [
        "| row | " + " | ".join(columns) + " | gradient share per term, % (last measured) |",
        "|---|" + "---:|" * len(columns) + "---|",
    ]
    teacher = result.get("teacher")
    if teacher:
        cells = [f"{100 * teacher[m]:.1f}" if m in teacher else "-" for m in columns]
        lines.append("| teacher (one run) | " + " | ".join(cells) + " | - |")
    for row, metrics in rows.items():
        cells = [
            f"{100 * metrics[m]['mean']:.1f} ± {100 * metrics[m]['std']:.1f}" if m in metrics else "-"
            for m in columns
        ]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {_shares_cell(metrics)} |")
    regime = result.get("regime") or []
    if regime:
        lines += ["", "Regime checks (docs/ablation-design.md; read before the claims):", ""]
        lines += [
            f"- {c['check']}: {c['value']} -> {'yes' if c['ok'] else 'NO: not in regime'}" for c in regime
        ]
    lines += _gap_lines(rows, teacher)
    lines += _comparison_lines(result.get("comparisons") or [])
    return "\n".join(lines)


def _gap_lines(rows: dict[str, dict[str, Any]], teacher: dict[str, float] | None) -> list[str]:
    """Each row's share of the teacher-baseline gap on the zero-shot metrics (seed means)."""
    if not teacher or "baseline" not in rows:
        return []
    columns = [m for m in ZEROSHOT if m in teacher and m in rows["baseline"]]
    lines = [
        "",
        "Share of the teacher-baseline gap, `(row - baseline) / (teacher - baseline)` on the seed means "
        "('-': a gap under 2 points):",
        "",
        "| row | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row, metrics in rows.items():
        cells = []
        for m in columns:
            share = (
                gap_share(metrics[m]["mean"], rows["baseline"][m]["mean"], teacher[m])
                if m in metrics
                else None
            )
            cells.append("-" if share is None else f"{100 * share:.0f} %")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def _interval(d: dict[str, float]) -> str:
    if math.isnan(d["low"]):
        return f"{100 * d['mean']:+.1f} (one seed: no interval)"
    return f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def _comparison_lines(comparisons: list[dict[str, Any]]) -> list[str]:
    """Per claim: its primary metric's paired difference and verdict, then the other metrics'."""
    if not comparisons:
        return []
    lines = [
        "",
        "Paired differences A - B over the same seeds, in points: mean [95 % t-interval] "
        "(docs/ablation-design.md; the verdict reads the primary metric, marked *):",
        "",
        "| claim | A - B | verdict | " + " | ".join(METRICS) + " |",
        "|---|---|---|" + "---:|" * len(METRICS),
    ]
    for c in comparisons:
        cells = [
            (_interval(c["diffs"][m]) + (" *" if m == c["primary"] else "")) if m in c["diffs"] else "-"
            for m in METRICS
        ]
        margin = f" (margin {100 * c['threshold']:+.0f})" if c["threshold"] else ""
        kind = c["verdict"] + margin if c["decides"] else f"{c['verdict']} (secondary)"
        lines.append(f"| {c['claim']} | {c['a']} - {c['b']} | {kind} | " + " | ".join(cells) + " |")
    return lines
