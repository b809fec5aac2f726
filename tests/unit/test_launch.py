"""Launcher helpers that need no Ray session: checkpoint clean-up, the resume guard, the step budget."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from siclip.config import ConfigError, SiclipCfg, TrainCfg, apply_overrides, from_dict, save_config, to_dict
from siclip.demo import teacher_overrides
from siclip.train.launch import check_resume_compatible, drop_unregistered_checkpoints, resolve_max_steps


def _snapshot(run: Path, names: list[str]) -> None:
    results = [{"checkpoint_dir_name": n} for n in names]
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": results}))


def test_only_unregistered_checkpoint_folders_are_removed(tmp_path: Path) -> None:
    for name in ("checkpoint_a", "checkpoint_b", "checkpoint_stale"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_state.pt").write_bytes(b"x")
    (tmp_path / "final").mkdir()
    (tmp_path / "checkpoint_note.txt").write_text("a file, not a checkpoint folder")
    _snapshot(tmp_path, ["checkpoint_a", "checkpoint_b"])
    assert drop_unregistered_checkpoints(tmp_path) == ["checkpoint_stale"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [
        "checkpoint_a",
        "checkpoint_b",
        "checkpoint_manager_snapshot.json",
        "checkpoint_note.txt",
        "final",
    ]


def test_without_a_snapshot_nothing_is_removed(tmp_path: Path) -> None:
    (tmp_path / "checkpoint_a").mkdir()
    assert drop_unregistered_checkpoints(tmp_path) == []
    assert (tmp_path / "checkpoint_a").is_dir()


def test_max_steps_needs_steps_or_epochs() -> None:
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        resolve_max_steps(replace(SiclipCfg(), train=TrainCfg(max_steps=0, epochs=0)))
    assert resolve_max_steps(replace(SiclipCfg(), train=TrainCfg(max_steps=7))) == 7


def _run_with_checkpoint(tmp_path: Path, cfg: SiclipCfg) -> Path:
    save_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "checkpoint_a").mkdir()
    _snapshot(tmp_path, ["checkpoint_a"])
    return tmp_path


def test_resume_with_another_model_loss_or_teacher_is_refused(tmp_path: Path) -> None:
    cfg = SiclipCfg()
    check_resume_compatible(apply(cfg, ["loss.pm_weight=20"]), tmp_path)  # no run yet
    save_config(cfg, tmp_path / "config.yaml")
    check_resume_compatible(apply(cfg, ["loss.pm_weight=20"]), tmp_path)  # a run without checkpoints
    run = _run_with_checkpoint(tmp_path, cfg)
    check_resume_compatible(apply(cfg, ["train.max_steps=99", "optim.lr=0.1", "train.num_workers=2"]), run)
    for override, key in [
        ("loss.pm_weight=20", "loss.pm_weight: 0.1 saved, 20.0 now"),
        ("model.sasp.share=none", "model.sasp.share: 'qk' saved, 'none' now"),
        ("teacher.name=siclip-tiny-student", "teacher.name:"),
    ]:
        with pytest.raises(ConfigError, match=r"^train\.run_name: .*" + re.escape(key)):
            check_resume_compatible(apply(cfg, [override]), run)


def test_keys_an_older_run_did_not_know_are_skipped(tmp_path: Path) -> None:
    run = _run_with_checkpoint(tmp_path, SiclipCfg())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["loss"]["pm_weight"]
    saved["model"]["retired_option"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    check_resume_compatible(apply(SiclipCfg(), ["loss.pm_weight=20"]), run)


def apply(cfg: SiclipCfg, overrides: list[str]) -> SiclipCfg:
    return from_dict(apply_overrides(to_dict(cfg), overrides))


def test_demo_overrides_of_the_student_experiment_skip_the_teacher() -> None:
    given = [
        "loss.pm_weight=20",
        "train.num_workers=2",
        " model.inherit=false",
        "teacher.name=x",
        "ray.num_cpus=4",
    ]
    assert teacher_overrides(given) == ["train.num_workers=2", "ray.num_cpus=4"]
