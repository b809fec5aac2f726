"""Launcher helpers that need no Ray session: stale checkpoint clean-up and the step budget."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from siclip.config import ConfigError, SiclipCfg, TrainCfg
from siclip.train.launch import drop_unregistered_checkpoints, resolve_max_steps


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
