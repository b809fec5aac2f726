"""A sweep may target any validation metric its config's evaluation reports, the paper suite's included
(``val/imagenet1k/top1``), and is refused before Ray starts on one it never reports."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmark_fixtures as fx

from siclip import sweep
from siclip.config import ConfigError, SiclipCfg, apply_overrides, from_dict, to_dict


def _cfg(*overrides: str) -> SiclipCfg:
    base = to_dict(SiclipCfg())
    base["tune"]["space"] = {"loss.pm_weight": {"uniform": [0.1, 1.0]}}
    return from_dict(apply_overrides(base, ["data.train_shards=[]", *overrides]))


@pytest.fixture(autouse=True)
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr("siclip.ray_session.init_ray", refuse)


def test_a_paper_suite_metric_is_a_valid_sweep_metric() -> None:
    cfg = _cfg("eval.benchmarks=[imagenet1k,mscoco]", "tune.metric=val/imagenet1k/top1")
    # accepted: the sweep goes on to its next check (no training shards), still before Ray starts
    with pytest.raises(ConfigError, match=r"^data\.train_shards"):
        sweep.run_sweep(cfg)
    for metric in ("val/mscoco/i2t_r@5", "val/imagenet1k/mean_per_class_recall"):
        with pytest.raises(ConfigError, match=r"^data\.train_shards"):
            sweep.run_sweep(_cfg("eval.benchmarks=[imagenet1k,mscoco]", f"tune.metric={metric}"))


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        # a benchmark not in eval.benchmarks, a metric the dataset's task has not, a K not in recall_at
        (["eval.benchmarks=[mscoco]", "tune.metric=val/imagenet1k/top1"], "val/mscoco/i2t_r@1"),
        (["eval.benchmarks=[mscoco]", "tune.metric=val/mscoco/top1"], "val/mscoco/t2i_r@10"),
        (
            ["eval.benchmarks=[flickr30k]", "eval.recall_at=[1]", "tune.metric=val/flickr30k/i2t_r@5"],
            "t2i_r@1",
        ),
    ],
)
def test_a_metric_the_evaluation_never_reports_is_refused_naming_the_allowed_ones(
    overrides: list[str], named: str
) -> None:
    with pytest.raises(ConfigError, match=r"^tune\.metric: got 'val/") as info:
        sweep.run_sweep(_cfg(*overrides))
    assert named in str(info.value) and "\n" not in str(info.value)


def test_no_held_out_data_at_all_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^tune\.metric: .*eval\.benchmarks"):
        sweep.run_sweep(_cfg("tune.metric=val/imagenet1k/top1"))


_BagModel = fx.BagModel


def test_the_accepted_metrics_are_exactly_what_training_time_evaluation_reports(tmp_path: Path) -> None:
    """The same names the worker reports (``val/`` + the keys of ``evaluate_cfg``) on a real evaluation."""
    from siclip.eval.suite import evaluate_cfg

    wds = fx.make_wds_classification(
        tmp_path / "wds", ["red", "green", "blue", "grey", "pink", "dark"], ["a {c}."]
    )
    cfg = _cfg(
        "model.name=tiny-student",
        "eval.benchmarks=[imagenet1k,mscoco]",
        f"eval.roots.imagenet1k={wds}",
        f"eval.roots.mscoco={fx.make_mscoco(tmp_path / 'coco')}",
        "eval.recall_at=[1,5]",
        "eval.loader_workers=0",
    )
    reported = {f"val/{k}" for k in evaluate_cfg(_BagModel(), cfg)}
    assert reported == set(sweep.val_metrics(cfg))


@pytest.mark.parametrize("metric", ["val/zeroshot_top1", "val/zeroshot_top5", "val/zeroshot_top1_unseen"])
def test_a_zero_shot_metric_is_a_valid_sweep_metric_with_a_zero_shot_folder(
    tmp_path: Path, metric: str
) -> None:
    cfg = _cfg(f"eval.zeroshot_dir={tmp_path}", f"tune.metric={metric}")
    with pytest.raises(ConfigError, match=r"^data\.train_shards"):  # accepted: on to the next check
        sweep.run_sweep(cfg)
