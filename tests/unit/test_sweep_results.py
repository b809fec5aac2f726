"""A sweep's results from Tune's result grid: which trials count as finished, their ranking, the best
trial's config and the table (no Ray session: the grid is plain objects with Tune's attributes)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from siclip import storage
from siclip.config import SiclipCfg, from_dict, load_config, to_dict
from siclip.sweep.results import collect_results, write_tables
from tests.s3_server import BUCKET, s3_env  # noqa: F401  (the fixture)

METRIC = "val/zeroshot_top1"


def _cfg(mode: str = "max") -> SiclipCfg:
    # 40 steps, a report every 10: a trial that ran to the end made 4 reports
    return from_dict(
        {
            "train": {"max_steps": 40, "ckpt_every": 10},
            "tune": {"experiment_name": "exp", "metric": METRIC, "mode": mode},
        }
    )


def _trial(
    name: str,
    reports: int,
    metric: float | None = None,
    *,
    error: BaseException | None = None,
    params: dict[str, Any] | None = None,
    named: bool = True,
) -> SimpleNamespace:
    """What Tune's ``Result`` offers: the last reported metrics, the sampled config, its folder, its error."""
    metrics: dict[str, Any] = {"training_iteration": reports, "step": reports * 10}
    if named:
        metrics["trial_id"] = name
    if metric is not None:
        metrics[METRIC] = metric
    return SimpleNamespace(
        metrics=metrics,
        config=params if params is not None else {"loss.fd_weight": 1000.0},
        path=f"/somewhere/{name}",
        error=error,
    )


def _collect(grid: list[SimpleNamespace], folder: Path | str, mode: str = "max") -> Any:
    cfg = _cfg(mode)
    return collect_results(
        grid, cfg, base=to_dict(cfg), experiment_dir=folder, param_keys=("loss.fd_weight",)
    )


def test_finished_trials_rank_first_then_by_metric(tmp_path: Path) -> None:
    boom = RuntimeError("Traceback (most recent call last):\n  ...\nValueError: boom\n")
    grid = [
        _trial("t_stopped", 1, 0.9),  # best value, but stopped early by the scheduler
        _trial("t_low", 4, 0.5),
        _trial("t_nan", 4, float("nan")),  # a diverged run: ranks after every real value
        _trial("t_high", 4, 0.7, params={"loss.fd_weight": 4000.0, "loss.pm_fusion": "concat"}),
        _trial("t_error", 0, error=boom, named=False),  # its id from its folder's name
    ]
    result = _collect(grid, tmp_path)
    ranked = [(r.trial_id, r.status) for r in result.rows]
    assert ranked[:3] == [("t_high", "TERMINATED"), ("t_low", "TERMINATED"), ("t_nan", "TERMINATED")]
    assert set(ranked[3:]) == {("t_stopped", "STOPPED"), ("t_error", "ERROR")}
    assert ranked.index(("t_stopped", "STOPPED")) < ranked.index(("t_error", "ERROR"))
    assert result.best is not None and result.best.trial_id == "t_high"
    assert [r.trial_id for r in result.errored] == ["t_error"]
    assert result.errored[0].error == "RuntimeError: ValueError: boom"
    assert all(r.error == "" for r in result.rows if r.status != "ERROR")
    assert result.experiment_dir == tmp_path
    # a key only some trials sampled still gets a column, after the space's own keys
    assert result.param_keys == ("loss.fd_weight", "loss.pm_fusion")

    # best_config.yaml: the best trial's values over the base config, trainable as it is
    assert result.best_config == tmp_path / "best_config.yaml"
    best = load_config(result.best_config, check_files=False)
    assert best.loss.fd_weight == 4000.0 and best.loss.pm_fusion == "concat"
    assert best.train.max_steps == 40

    # the table shows every trial's values, strings and numbers alike; '-' where a trial has none
    table = result.table
    high = next(line for line in table.splitlines() if "| t_high |" in line)
    assert high.split("|")[2:4] == [" 4000 ", " concat "]
    low = next(line for line in table.splitlines() if "| t_low |" in line)
    assert low.split("|")[3] == " - "
    reports = next(line for line in table.splitlines() if "| t_stopped |" in line).split("|")[-3]
    assert reports.strip() == "1"

    write_tables(result)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "trials.csv").read_text())))
    assert [r["trial_id"] for r in rows[:3]] == ["t_high", "t_low", "t_nan"]
    assert rows[0]["loss.pm_fusion"] == "concat" and rows[1]["loss.pm_fusion"] == ""


def test_min_mode_ranks_the_lowest_value_first(tmp_path: Path) -> None:
    result = _collect([_trial("a", 4, 0.3), _trial("b", 4, 0.1), _trial("c", 4, 0.2)], tmp_path, "min")
    assert [r.trial_id for r in result.rows] == ["b", "c", "a"]


@pytest.mark.parametrize(
    "grid",
    [
        [],
        [_trial("t_quiet", 1)],  # stopped before it reported the metric
        [_trial("t_error", 0, error=ValueError("boom"))],
    ],
    ids=["no trials", "no metric", "only an error"],
)
def test_no_best_trial_without_a_reported_metric(tmp_path: Path, grid: list[SimpleNamespace]) -> None:
    result = _collect(grid, tmp_path)
    assert result.best is None and result.best_config is None
    assert not (tmp_path / "best_config.yaml").exists()
    assert f"no trial reported {METRIC}" in result.table


def test_best_config_goes_to_a_uri_sweep_folder(s3_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    folder = f"s3://{BUCKET}/{tmp_path.name}/runs/exp"
    result = _collect([_trial("t_a", 4, 0.4, params={"loss.fd_weight": 2500.0})], folder)
    assert result.best_config == f"{folder}/best_config.yaml"
    local = storage.download(str(result.best_config), tmp_path / "best_config.yaml")
    assert load_config(local, check_files=False).loss.fd_weight == 2500.0
