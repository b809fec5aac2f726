"""A sweep's results: one row per trial, ranked best first, written as ``trials.csv`` and ``trials.md``,
and the best trial's full config as ``best_config.yaml`` (Ray-free: reads Tune's result grid as plain
objects)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from siclip import storage
from siclip.config import SiclipCfg, save_config
from siclip.sweep.space import trial_config

__all__ = [
    "STOPPED",
    "SweepResult",
    "TrialRow",
    "collect_results",
    "expected_reports",
    "format_table",
    "write_tables",
]

STOPPED = "STOPPED"
"""Status of a trial the scheduler stopped before its last report (ASHA / median stopping)."""


def expected_reports(cfg: SiclipCfg) -> int:
    """Reports a finished run makes: one per ``train.ckpt_every`` steps, plus the final step."""
    from siclip.train.launch import resolve_max_steps

    return math.ceil(resolve_max_steps(cfg) / cfg.train.ckpt_every)


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    metric: float | None
    status: str
    """TERMINATED (ran every report), STOPPED (early, by the scheduler) or ERROR."""
    iterations: int
    step: int
    run_name: str
    error: str = ""
    """ERROR trials: the exception, on one line (Tune keeps the full trace in the trial's ``error.txt``)."""


@dataclass(frozen=True)
class SweepResult:
    experiment_dir: Path | str
    """The sweep's folder (a local path) or URI."""
    metric: str
    mode: str
    rows: tuple[TrialRow, ...]
    """Best first."""
    best: TrialRow | None
    best_config: Path | str | None
    """``best_config.yaml``: the best trial's full config, trainable with ``siclip train --config``."""
    param_keys: tuple[str, ...] = field(default=())

    @property
    def table(self) -> str:
        return format_table(self)

    @property
    def errored(self) -> tuple[TrialRow, ...]:
        """The trials that ended in ERROR (``siclip tune`` then exits non-zero)."""
        return tuple(r for r in self.rows if r.status == "ERROR")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _columns(result: SweepResult) -> list[str]:
    return ["trial_id", *result.param_keys, result.metric, "status", "reports", "step"]


def _cells(result: SweepResult, row: TrialRow) -> list[str]:
    params = [_fmt(row.params.get(k)) for k in result.param_keys]
    return [row.trial_id, *params, _fmt(row.metric), row.status, str(row.iterations), str(row.step)]


def format_table(result: SweepResult) -> str:
    """A Markdown table of the trials, best first, and a line naming the best config."""
    cols = _columns(result)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cells(result, row)) + " |" for row in result.rows]
    if result.best is not None:
        lines.append(
            f"\nbest: trial {result.best.trial_id} ({result.metric} = {_fmt(result.best.metric)}, "
            f"{result.mode}); config {result.best_config}"
        )
    else:
        lines.append(f"\nno trial reported {result.metric}")
    for row in result.errored:
        lines.append(f"ERROR: trial {row.trial_id} ({row.run_name}): {row.error or 'no message'}")
    return "\n".join(lines)


def _one_line(error: BaseException | None, limit: int = 300) -> str:
    """An exception as one line: its type and the last non-empty line of its message (Ray wraps the
    trial's own exception in a long trace whose last line is the cause)."""
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = f"{type(error).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def write_tables(result: SweepResult) -> None:
    folder = result.experiment_dir
    f = io.StringIO(newline="")
    writer = csv.writer(f)
    writer.writerow(_columns(result))
    for row in result.rows:
        params = [row.params.get(k, "") for k in result.param_keys]
        metric = "" if row.metric is None else row.metric
        writer.writerow([row.trial_id, *params, metric, row.status, row.iterations, row.step])
    storage.write_text(storage.join(folder, "trials.csv"), f.getvalue())
    storage.write_text(storage.join(folder, "trials.md"), format_table(result) + "\n")


def _rank_key(row: TrialRow, mode: str) -> tuple[int, int, float]:
    """Finished trials first, then by metric (missing last)."""
    finished = 0 if row.status == "TERMINATED" else 1
    if row.metric is None or not math.isfinite(row.metric):
        return (finished, 1, 0.0)
    return (finished, 0, -row.metric if mode == "max" else row.metric)


def collect_results(
    grid: Any,
    cfg: SiclipCfg,
    *,
    base: dict[str, Any],
    experiment_dir: Path | str,
    param_keys: tuple[str, ...],
) -> SweepResult:
    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows = []
    for res in grid:
        m = dict(res.metrics or {})
        params = dict(res.config or {})  # the trial's own sampled values, whatever the space is now
        trial_id = str(m.get("trial_id") or Path(res.path).name)
        run_name = f"{cfg.tune.experiment_name}-{trial_id}"
        iterations = int(m.get("training_iteration", 0))
        if res.error is not None:
            status = "ERROR"
        elif iterations >= expected_reports(trial_config(base, params, run_name=run_name)):
            status = "TERMINATED"
        else:
            status = STOPPED
        value = m.get(metric)
        rows.append(
            TrialRow(
                trial_id=trial_id,
                params=params,
                metric=float(value) if isinstance(value, int | float) else None,
                status=status,
                iterations=iterations,
                step=int(m.get("step", 0)),
                run_name=run_name,
                error=_one_line(res.error),  # "" unless the trial errored
            )
        )
    rows.sort(key=lambda r: _rank_key(r, mode))
    param_keys = (*param_keys, *sorted({k for r in rows for k in r.params} - set(param_keys)))
    best = rows[0] if rows and rows[0].metric is not None and rows[0].status != "ERROR" else None
    best_path: Path | str | None = None
    if best is not None:
        best_cfg = trial_config(base, best.params, run_name=f"{cfg.tune.experiment_name}-best")
        best_path = storage.join(experiment_dir, "best_config.yaml")
        best_path = best_path if storage.is_remote(best_path) else Path(best_path)
        save_config(best_cfg, best_path)
    return SweepResult(
        experiment_dir=experiment_dir,
        metric=metric,
        mode=mode,
        rows=tuple(rows),
        best=best,
        best_config=best_path,
        param_keys=param_keys,
    )
