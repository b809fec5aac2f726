"""Multi-worker training (gloo on CPU) and worker fault tolerance, with real Ray Train processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import SICLIP, registered_checkpoints, subprocess_env, tiny_world, write_config

pytestmark = [pytest.mark.slow]

BASE = [
    "train.eval_every=0",
    "train.log_every=2",
    "data.batch_size=16",
    "data.loader_workers=0",
    "optim.warmup_steps=2",
    "train.cpus_per_worker=1",
    "ray.object_store_memory_mb=128",
]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _checkpoint_dirs(run: Path) -> list[Path]:
    return sorted(p for p in run.glob("checkpoint_*") if p.is_dir())


def _checkpoint_steps(run: Path) -> list[int]:
    steps = []
    for folder in _checkpoint_dirs(run):
        state = torch.load(folder / "train_state.pt", weights_only=True)
        steps.append(int(state["counters"]["step"]))
    return steps


def test_two_workers_uneven_shards_stay_in_sync(tmp_path: Path) -> None:
    world = tiny_world(str(tmp_path))
    assert len(world.web_shards) == 3  # 400 samples in shards of 150: 150, 150, 100 — uneven
    cfg = write_config(
        tmp_path, "demo_teacher", [*BASE, "train.num_workers=2", "train.max_steps=12", "train.ckpt_every=6"]
    )
    proc = subprocess.run(
        [*SICLIP, "train", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=400,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    run = tmp_path / "teacher"
    rows = _rows(run)
    assert rows[-1]["step"] == 12 or any(r["step"] == 12 for r in rows)
    drift = [r["dist/param_max_abs_diff"] for r in rows if "dist/param_max_abs_diff" in r]
    assert drift == [0.0], out[-2000:]
    assert "parameters across 2 ranks differ by at most 0" in out
    assert _checkpoint_steps(run) == [6, 12]


def _train_worker_pids(root_pid: int) -> list[int]:
    """Ray Train worker processes descended from the ``siclip train`` process (its own local Ray)."""
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    pids = []
    for child in children:
        try:
            parent = child.parent()
            forked = parent is not None and "RayTrainWorker" in " ".join(parent.cmdline())
            if "RayTrainWorker" in " ".join(child.cmdline()) and not forked:  # not a data-loader fork
                pids.append(child.pid)
        except psutil.Error:
            continue
    return pids


def test_killed_worker_resumes_from_checkpoint(tmp_path: Path) -> None:
    tiny_world(str(tmp_path))
    cfg = write_config(
        tmp_path, "demo_teacher", [*BASE, "train.max_steps=30", "train.ckpt_every=6", "train.max_failures=1"]
    )
    run = tmp_path / "teacher"
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*SICLIP, "train", "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            start_new_session=True,
        )
        try:
            deadline = time.time() + 300
            while time.time() < deadline and not registered_checkpoints(run) and proc.poll() is None:
                time.sleep(0.5)
            victims = _train_worker_pids(proc.pid)
            assert victims, log_path.read_text()[-3000:]
            os.kill(victims[0], signal.SIGKILL)
            assert proc.wait(timeout=400) == 0, log_path.read_text()[-4000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    out = log_path.read_text()
    assert "resumed run 'teacher' from step" in out, out[-4000:]
    steps = _checkpoint_steps(run)
    assert steps[-1] == 30 and len(steps) == len(set(steps)) and len(steps) <= 2  # keep_checkpoints = 2
    assert max(r["step"] for r in _rows(run)) == 30
    assert (run / "final" / "model.safetensors").is_file()
