"""A run's logs (``siclip.train.run_log``), without Ray: the metrics table a user reads, TensorBoard events, and
a resume that does not log a step twice."""

from __future__ import annotations

from pathlib import Path

from siclip.config import SiclipCfg, TrainCfg
from siclip.train.metrics_table import read_metrics
from siclip.train.run_log import RunLog, run_location


def _cfg(tmp_path: Path) -> SiclipCfg:
    return SiclipCfg(train=TrainCfg(runs_dir=str(tmp_path / "runs"), run_name="r"))


def test_scalars_land_in_the_run_folders_table_and_tensorboard(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert Path(run_location(cfg)) == tmp_path / "runs" / "r"
    log = RunLog(cfg, max_steps=4, start_step=0)
    log.scalars(1, {"loss/total": 2.0})
    log.scalars(2, {"loss/total": 1.5, "val/score": 0.25})
    log.progress(2, {"loss/total": 1.5})
    log.close()
    assert read_metrics(run_location(cfg)) == [
        {"step": 1, "loss/total": 2.0},
        {"step": 2, "loss/total": 1.5, "val/score": 0.25},
    ]
    assert any((Path(run_location(cfg)) / "tb").glob("events.out.tfevents.*"))


def test_a_resume_drops_the_rows_after_its_checkpoint(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    first = RunLog(cfg, max_steps=4, start_step=0)
    for step in (1, 2, 3):
        first.scalars(step, {"loss/total": float(step)})
    first.close()
    resumed = RunLog(cfg, max_steps=4, start_step=2)  # the checkpoint was at step 2
    resumed.scalars(3, {"loss/total": 30.0})
    resumed.close()
    assert [(r["step"], r["loss/total"]) for r in read_metrics(run_location(cfg))] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
    ]
