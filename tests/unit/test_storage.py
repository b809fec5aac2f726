"""Run files at a path or an s3:// URI (a local moto server): the same calls, the same results. No Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from siclip import storage
from siclip.config import SiclipCfg, load_config, save_config
from siclip.train.checkpoint import load_student_weights, save_student
from siclip.train.launch import check_resume_compatible, drop_unregistered_checkpoints
from siclip.train.metrics_table import read_metrics
from tests.s3_server import BUCKET, s3_env  # noqa: F401  (the fixture)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs")
    request.getfixturevalue("s3_env")
    return f"s3://{BUCKET}/{tmp_path.name}/runs"


def test_files_and_folders_round_trip(root: str, tmp_path: Path) -> None:
    run = storage.join(root, "run-a")
    assert not storage.exists(run) and storage.list_dirs(run) == []
    storage.write_text(storage.join(run, "notes", "a.txt"), "first")
    storage.write_text(storage.join(run, "notes", "a.txt"), "second")  # replaced, not appended
    assert storage.read_text(storage.join(run, "notes", "a.txt")) == "second"
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(run, "missing.txt"))
    local = tmp_path / "local"
    (local / "tb").mkdir(parents=True)
    (local / "tb" / "events.1").write_bytes(b"\x00\x01")
    storage.upload(local / "tb", storage.join(run, "tb"))
    assert storage.list_dirs(run) == ["notes", "tb"]
    back = storage.download(storage.join(run, "tb"), tmp_path / "back")
    assert (back / "events.1").read_bytes() == b"\x00\x01"
    storage.remove_dir(storage.join(run, "notes"))
    assert storage.list_dirs(run) == ["tb"]


def test_metrics_config_and_checkpoint_tidying_work_at_the_location(root: str) -> None:
    run = storage.join(root, "run-b")
    rows = [{"step": 1, "loss/total": 2.0}, {"step": 2, "loss/total": 1.5}]
    storage.write_text(storage.join(run, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(run) == rows
    assert read_metrics(storage.join(root, "nothing-here")) == []
    cfg = SiclipCfg()
    save_config(cfg, storage.join(run, "config.yaml"))
    assert yaml.safe_load(storage.read_text(storage.join(run, "config.yaml")))["loss"]["pm_weight"] == 0.1
    for name in ("checkpoint_a", "checkpoint_stale"):
        storage.write_text(storage.join(run, name, "model.safetensors"), "x")
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a", "metrics": {}}]}
    storage.write_text(storage.join(run, "checkpoint_manager_snapshot.json"), json.dumps(snapshot))
    assert drop_unregistered_checkpoints(run) == ["checkpoint_stale"]
    assert [n for n in storage.list_dirs(run) if n.startswith("checkpoint_")] == ["checkpoint_a"]
    from siclip.config import ConfigError, apply_overrides, from_dict, to_dict

    other = from_dict(apply_overrides(to_dict(cfg), ["loss.pm_weight=3"]))
    with pytest.raises(ConfigError, match=r"loss\.pm_weight: 0\.1 saved, 3\.0 now"):
        check_resume_compatible(other, run)


def test_eval_weights_load_from_a_run_folder_at_the_location(root: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = nn.Linear(3, 2)
    save_student(trained, tmp_path / "export" / "final")
    run = storage.join(root, "run-c")
    storage.upload(tmp_path / "export" / "final", storage.join(run, "final"))
    fresh = nn.Linear(3, 2)
    load_student_weights(fresh, run)
    assert torch.equal(fresh.weight, trained.weight) and torch.equal(fresh.bias, trained.bias)
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        load_student_weights(fresh, storage.join(root, "no-run"))


def test_a_config_written_to_s3_is_a_config(s3_env: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    uri = f"s3://{BUCKET}/{tmp_path.name}/best_config.yaml"
    save_config(SiclipCfg(), uri)
    local = storage.download(uri, tmp_path / "best_config.yaml")
    assert load_config(local, check_files=False) == SiclipCfg()


def test_sweep_tables_go_to_the_location(root: str) -> None:
    import csv
    import io

    from siclip.sweep import SweepResult, TrialRow, format_table
    from siclip.sweep.results import write_tables

    row = TrialRow("t_00000", {"loss.fd_weight": 800.0}, 0.61, "TERMINATED", 4, 40, "exp-t_00000")
    folder = storage.join(root, "exp")
    result = SweepResult(folder, "val/zeroshot_top1", "max", (row,), row, None, ("loss.fd_weight",))
    write_tables(result)
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(folder, "trials.csv")))))
    assert [(r["trial_id"], float(r["loss.fd_weight"])) for r in rows] == [("t_00000", 800.0)]
    assert storage.read_text(storage.join(folder, "trials.md")) == format_table(result) + "\n"
