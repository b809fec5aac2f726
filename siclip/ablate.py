"""``siclip ablate``: the paper's ablation rows over several seeds, on the demo world or on any config's data.

Rows (docs/method.md section 7): baseline (SiCLIP architecture from scratch, CLIP loss), WI (inherit + freeze,
CLIP loss), WIKD (+ FD, CRD, ICL), WIKD+PM; and the data claim: web (real) captions only vs CC12M-SYN
(real + synthetic) captions, for the baseline and for WIKD+PM. Every row is one student config (the demo's,
or ``--config FILE`` with its own data, teacher and held-out sets) plus a few overrides, trained by the
same ``launch(cfg)`` and evaluated by the same suite as ``siclip eval``. Each run's loss and validation
curves are saved as CSV next to the table.
"""

from __future__ import annotations

import csv
import re
import statistics
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
from siclip.eval.tables import save_table
from siclip.train.grad_share import format_shares

__all__ = [
    "ROWS",
    "ablation_table_path",
    "curves_dir",
    "format_table",
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
    "WIKD": ["loss.pm_weight=0"],
    "WIKD+PM": [],
    "WIKD+PM, web captions only": [WEB_ONLY],
}
METRICS = ("zeroshot_top1", "i2t_r@1", "t2i_r@1")


def _slug(row: str) -> str:
    return row.lower().replace("+", "-").replace(",", "").replace(" ", "-")


def _row_cfg(base: SiclipCfg, row: str, seed: int, steps: int, tag: str = "") -> SiclipCfg:
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
    out: str | None = "benchmarks/ablation.md",
    tag: str = "",
) -> tuple[dict[str, Any], str]:
    """Train and evaluate every row for ``seeds`` seeds; returns (result, Markdown table).

    Without ``config`` the demo world, its synthetic captions and its teacher are prepared first (under
    ``out_dir``; ``quick`` for the small world) and the rows start from ``configs/demo.yaml``. With
    ``config`` (a YAML file) the rows start from it as it is: its data, teacher and held-out sets, which
    must exist. ``tag`` names a variant (``overrides`` on top of the rows): its runs get their own folders,
    so they neither resume nor collide with the plain ablation's. Each run's curves go to
    ``curves_dir(out)``.
    """
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ConfigError(f"ablate --row: got {unknown[0]!r}; allowed: {', '.join(map(repr, ROWS))}")
    if tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag):
        raise ConfigError(f"ablate --tag: got {tag!r}; allowed: letters, digits, '_', '.', '-'")
    if config is not None and quick:
        raise ConfigError(f"ablate --quick: only for the demo world; got it with --config {config!r}")
    from siclip.demo import CONFIGS, prepare_demo
    from siclip.eval.suite import evaluate_cfg
    from siclip.models.presets import build_preset
    from siclip.train.checkpoint import load_student_weights
    from siclip.train.launch import launch
    from siclip.train.worker import last_grad_shares, read_metrics

    switches = resolve_switches(config if config is not None else CONFIGS / "demo.yaml", overrides)
    print("siclip ablate: " + "\n".join(switches.lines()), flush=True)
    captions: dict[str, Any] | None = None
    if config is None:
        prep = prepare_demo(out_dir=out_dir, quick=quick, overrides=overrides)
        base, captions, data = prep.student_cfg, prep.caption_quality, "the demo world"
    else:
        # Paths are checked per row (``check_paths``), as for the demo's rows, before that row trains.
        base, data = load_config(config, overrides, check_files=False), f"`{config}`"
    steps = steps or base.train.max_steps
    per_row: dict[str, list[dict[str, float]]] = {row: [] for row in rows}
    curves = curves_dir(out)
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
            if curves is not None:
                save_curve(read_metrics(run.run_dir), curves / f"{_slug(row)}-s{seed}.csv")
    summary = summarize(per_row)
    result = {
        "data": data,
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


def ablation_table_path(config: str | None, tag: str = "") -> str:
    """``benchmarks/ablation[-<config stem>][-<tag>].md``: a config's table never overwrites the demo's."""
    parts = ["ablation", Path(config).stem if config else "", tag]
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
        "| row | " + " | ".join(METRICS) + " | gradient share per term, % (last measured) |",
        "|---|" + "---:|" * len(METRICS) + "---|",
    ]
    for row, metrics in result["rows"].items():
        cells = [f"{100 * metrics[m]['mean']:.1f} ± {100 * metrics[m]['std']:.1f}" for m in METRICS]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {_shares_cell(metrics)} |")
    return "\n".join(lines)
