"""A real 4-trial Ray Tune sweep on a tiny demo world: ASHA stops trials early, every trial logs to
TensorBoard, the best config retrains through the CLI unchanged, and --resume restores the sweep; a trial that
errors fails ``siclip tune`` and is named, and a rerun without --resume starts a new sweep."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import torch

from siclip.config import from_dict, load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EXPERIMENT = "sweep-test"


def _base_cfg(tmp_path: Path) -> dict:
    from siclip.data.demo_world import generate_demo_world

    world = generate_demo_world(
        tmp_path / "world",
        n_web=600,
        n_clean=8,
        n_retrieval=8,
        n_zeroshot_per_class=1,
        image_size=32,
        samples_per_shard=300,
    )
    return {
        "data": {
            "train_shards": world.web_shards,
            "batch_size": 32,
            "loader_workers": 0,
            "shuffle_buffer": 64,
            "synthetic": "off",
        },
        "model": {"name": "tiny-student", "image_size": 32},
        "teacher": {"name": "tiny-teacher"},
        "optim": {"warmup_steps": 1, "schedule": "constant"},
        "train": {
            "runs_dir": str(tmp_path / "runs"),
            "max_steps": 8,
            "ckpt_every": 2,
            "log_every": 2,
            "cpus_per_worker": 0.99,  # + 0.01 for the trial driver: two trials fit on 2 CPUs
            "progress": False,
        },
        "tune": {
            # The learning rate spans 3.5 decades, so some trials are clearly worse after 2 steps.
            "space": {
                "optim.lr": {"loguniform": [1e-6, 3e-2]},
                "loss.fd_weight": {"loguniform": [500, 20000]},
            },
            "metric": "loss/clip",
            "mode": "min",
            "scheduler": "asha",
            "grace_period": 1,
            "reduction_factor": 2,
            "num_samples": 4,
            "max_concurrent_trials": 2,
            "cpus_per_trial": 0.01,
            "experiment_name": EXPERIMENT,
            "seed": 3,
        },
    }


def test_sweep_stops_early_writes_tables_and_best_config_retrains(ray_session: None, tmp_path: Path) -> None:
    from siclip.cli import main
    from siclip.sweep import run_sweep

    torch.set_num_threads(1)
    cfg = from_dict(_base_cfg(tmp_path))
    result = run_sweep(cfg)
    print(result.table)

    runs = tmp_path / "runs"
    assert result.experiment_dir == runs / EXPERIMENT
    assert len(result.rows) == 4
    assert {r.status for r in result.rows} <= {"TERMINATED", "STOPPED"}
    stopped = [r for r in result.rows if r.status == "STOPPED"]
    finished = [r for r in result.rows if r.status == "TERMINATED"]
    assert stopped, "ASHA stopped no trial"
    assert finished, "no trial ran to the end"
    assert all(r.iterations == 4 and r.step == 8 for r in finished)
    assert all(1 <= r.iterations < 4 for r in stopped)
    # Best first: a finished trial with the lowest metric among the finished ones.
    assert result.best == result.rows[0] and result.best.status == "TERMINATED"
    assert result.best.metric == min(r.metric for r in finished if r.metric is not None)
    for row in result.rows:
        assert 1e-6 <= row.params["optim.lr"] <= 3e-2
        assert 500 <= row.params["loss.fd_weight"] <= 20000
        events = list((runs / row.run_name / "tb").glob("events.out.tfevents.*"))
        assert events, f"no TensorBoard events for trial {row.trial_id}"

    with open(result.experiment_dir / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["trial_id"] for t in table] == [r.trial_id for r in result.rows]
    assert (result.experiment_dir / "trials.md").read_text().startswith("| trial_id | loss.fd_weight |")

    # The best config is the full resolved config: it loads unchanged and trains under a fresh name.
    assert result.best_config == result.experiment_dir / "best_config.yaml"
    best = load_config(result.best_config)
    assert best.train.run_name == f"{EXPERIMENT}-best"
    assert best.optim.lr == pytest.approx(result.best.params["optim.lr"])
    assert best.loss.fd_weight == pytest.approx(result.best.params["loss.fd_weight"])
    assert best.data == cfg.data and best.model == cfg.model
    assert main(["train", "--config", str(result.best_config), "train.max_steps=2"]) == 0
    assert list((runs / f"{EXPERIMENT}-best" / "tb").glob("events.out.tfevents.*"))

    # Rerunning the same experiment restores it: no trial is rerun, the table is the same.
    started = time.perf_counter()
    again = run_sweep(cfg, resume=True)
    assert time.perf_counter() - started < 30
    assert [(r.trial_id, r.status, r.iterations) for r in again.rows] == [
        (r.trial_id, r.status, r.iterations) for r in result.rows
    ]


def _small_sweep(tmp_path: Path, space: dict, name: str) -> dict:
    data = _base_cfg(tmp_path)
    data["train"].update({"max_steps": 2, "ckpt_every": 2, "log_every": 1})
    data["tune"].update(
        {
            "space": space,
            "scheduler": "fifo",
            "num_samples": 1,
            "experiment_name": name,
            "metric": "loss/clip",
        }
    )
    return data


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _tune(tmp_path: Path, data: dict, *args: str) -> int:
    import yaml

    from siclip.cli import main

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return main(["tune", "--config", str(path), *args])


def test_errored_trial_fails_the_command_and_a_rerun_starts_a_new_sweep(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    torch.set_num_threads(1)
    runs = tmp_path / "runs"
    missing = str(tmp_path / "no-such-weights.pt")  # the trial fails on the worker, where it loads weights
    data = _small_sweep(tmp_path, {"model.source": {"grid": [missing]}}, "errs")

    assert _tune(tmp_path, data) == 1
    out, err = capsys.readouterr()
    (bad,) = _rows(runs / "errs" / "trials.csv")
    assert bad["status"] == "ERROR" and bad["model.source"] == missing
    assert any(line.startswith(f"ERROR: trial {bad['trial_id']}") for line in out.splitlines()), out
    assert "no such checkpoint file" in out and bad["trial_id"] in err
    # each trial's sampled values are kept with it, as JSON
    params = json.loads((runs / f"errs-{bad['trial_id']}" / "sweep_params.json").read_text())
    assert params == {"model.source": missing}
    first_table = (runs / "errs" / "trials.csv").read_text()

    # The same name with a changed space and no --resume: a new sweep, in its own folder, as asked.
    changed = _small_sweep(tmp_path, {"optim.lr": {"grid": [2e-3]}}, "errs")
    assert _tune(tmp_path, changed) == 0
    out, _ = capsys.readouterr()
    assert "errs-2" in out
    (row,) = _rows(runs / "errs-2" / "trials.csv")
    assert float(row["optim.lr"]) == 2e-3 and row["status"] == "TERMINATED"
    best = load_config(runs / "errs-2" / "best_config.yaml")
    assert best.optim.lr == 2e-3
    assert (runs / "errs" / "trials.csv").read_text() == first_table  # the first sweep is untouched

    # --resume restores only the sweep's own space, and says that it unpickles Tune's state.
    assert _tune(tmp_path, changed, "--resume") == 2
    _, err = capsys.readouterr()
    assert err.count("\n") == 1 and "tune.space" in err, err
    changed["tune"]["experiment_name"] = "errs-2"
    assert _tune(tmp_path, changed, "--resume") == 0  # every trial finished: nothing is rerun
    out, err = capsys.readouterr()
    assert "unpickles" in err
    assert _rows(runs / "errs-2" / "trials.csv") == [row]
    assert not (runs / "errs-3").exists()


def test_trials_that_cannot_run_together_wait_their_turn(
    ray_session: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two trials of 0.01 + 1.5 CPUs on 2 CPUs: the second starts after the first instead of its Train
    workers timing out (10 s here, shorter than one trial) while the first still holds the CPUs."""
    torch.set_num_threads(1)
    data = _small_sweep(tmp_path, {"optim.lr": {"grid": [1e-3, 2e-3]}}, "turns")
    data["train"].update({"cpus_per_worker": 1.5, "worker_start_timeout_s": 10})
    data["tune"]["max_concurrent_trials"] = 2
    assert _tune(tmp_path, data) == 0
    out, _ = capsys.readouterr()
    assert "max_concurrent_trials 2 -> 1" in out, out
    rows = _rows(tmp_path / "runs" / "turns" / "trials.csv")
    assert sorted(r["status"] for r in rows) == ["TERMINATED", "TERMINATED"], rows
