"""``siclip ablate``: the paper's ablation rows on the demo world, over several seeds.

Rows (METHOD.md section 7): baseline (SiCLIP architecture from scratch, CLIP loss), WI (inherit + freeze,
CLIP loss), WIKD (+ FD, CRD, ICL), WIKD+PM; and real-only vs synthetic captions for WIKD+PM. Every row is
the demo student's config plus a few overrides, trained by the same ``launch(cfg)`` and evaluated by the
same suite as ``siclip eval``.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

from siclip.config import (
    TRAIN_SECTIONS,
    ConfigError,
    SiclipCfg,
    apply_overrides,
    check_paths,
    from_dict,
    to_dict,
)
from siclip.eval.tables import save_table
from siclip.train.grad_share import format_shares

__all__ = ["ROWS", "format_table", "run_ablation", "summarize"]

NO_KD = [
    "loss.fd_weight=0",
    "loss.crd_weight=0",
    "loss.icl_weight=0",
    "loss.pm_weight=0",
    "teacher.enabled=false",
]
ROWS: dict[str, list[str]] = {
    "baseline": ["model.inherit=false", "model.freeze_inherited=false", *NO_KD],
    "WI": NO_KD,
    "WIKD": ["loss.pm_weight=0"],
    "WIKD+PM": [],
    "WIKD+PM, real captions only": ["data.synthetic=off"],
}
METRICS = ("zeroshot_top1", "i2t_r@1", "t2i_r@1")


def _row_cfg(base: SiclipCfg, row: str, seed: int, steps: int, tag: str = "") -> SiclipCfg:
    slug = row.lower().replace("+", "-").replace(",", "").replace(" ", "-") + (f"-{tag}" if tag else "")
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
    config: str = "demo",
    out: str | None = "benchmarks/ablation.md",
    tag: str = "",
) -> tuple[dict[str, Any], str]:
    """Train and evaluate every row for ``seeds`` seeds; returns (result, Markdown table).

    ``tag`` names a variant (``overrides`` on top of the rows): its runs get their own folders, so they
    neither resume nor collide with the plain ablation's.
    """
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ConfigError(f"ablate --row: got {unknown[0]!r}; allowed: {', '.join(map(repr, ROWS))}")
    if tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        raise ConfigError(f"ablate --tag: got {tag!r}; allowed: letters, digits, '_', '.', '-'")
    from siclip.demo import prepare_demo
    from siclip.eval.suite import evaluate_cfg
    from siclip.models.presets import build_preset
    from siclip.train.checkpoint import load_student_weights
    from siclip.train.launch import launch
    from siclip.train.worker import last_grad_shares

    prep = prepare_demo(out_dir=out_dir, quick=quick, overrides=overrides, student_config=config)
    base = prep.student_cfg
    steps = steps or base.train.max_steps
    per_row: dict[str, list[dict[str, float]]] = {row: [] for row in rows}
    for seed in range(seeds):
        for row in rows:
            cfg = _row_cfg(base, row, seed, steps, tag)
            check_paths(cfg, sections=TRAIN_SECTIONS)
            print(f"\n=== ablation: {row}, seed {seed} ===", flush=True)
            run = launch(cfg)
            model = build_preset(cfg.model.name, sasp=cfg.model.sasp)
            load_student_weights(model, run.run_dir / "final")
            model.eval()
            metrics = evaluate_cfg(model, cfg, recall_at=(1,))
            _, shares = last_grad_shares(run.run_dir)
            per_row[row].append({**metrics, **{f"grad_share/{k}": v for k, v in shares.items()}})
    summary = summarize(per_row)
    result = {
        "tag": tag,
        "overrides": list(overrides),
        "seeds": seeds,
        "steps": steps,
        "rows": summary,
        "runs": per_row,
        "captions": prep.caption_quality,
    }
    table = format_table(result)
    save_table(table, out)
    return result, table


def summarize(per_row: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """Per row: mean and population std over seeds of each metric, and the mean gradient shares."""
    return {
        row: {
            m: {
                "mean": statistics.fmean(r[m] for r in runs),
                "std": statistics.pstdev([r[m] for r in runs]) if len(runs) > 1 else 0.0,
            }
            for m in METRICS
        }
        | _mean_shares(runs)
        for row, runs in per_row.items()
    }


def _mean_shares(runs: list[dict[str, float]]) -> dict[str, Any]:
    """Mean ``grad_share/<term>`` over the seeds that logged it (``train.grad_share_every``)."""
    keys = sorted({k for r in runs for k in r if k.startswith("grad_share/")})
    return {k: {"mean": statistics.fmean(r[k] for r in runs if k in r)} for k in keys}


def _shares_cell(metrics: dict[str, Any]) -> str:
    shares = {k.split("/", 1)[1]: v["mean"] for k, v in metrics.items() if k.startswith("grad_share/")}
    return format_shares(shares) or "-"


def format_table(result: dict[str, Any]) -> str:
    extra = f"; overrides: `{' '.join(result['overrides'])}`" if result.get("overrides") else ""
    lines = [
        f"# Ablation on the demo world ({result['seeds']} seed(s), {result['steps']} student steps each)",
        "",
        f"Produced by `siclip ablate`{extra}. Values in %, mean ± population std over seeds.",
        "",
        "| row | " + " | ".join(METRICS) + " | gradient share per term, % (last measured) |",
        "|---|" + "---:|" * len(METRICS) + "---|",
    ]
    for row, metrics in result["rows"].items():
        cells = [f"{100 * metrics[m]['mean']:.1f} ± {100 * metrics[m]['std']:.1f}" for m in METRICS]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {_shares_cell(metrics)} |")
    return "\n".join(lines)
