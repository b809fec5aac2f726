"""Training end to end under Ray Train: a run killed with SIGKILL resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from siclip.train.worker import PAUSE_FILE_ENV, PAUSE_STEP_ENV
from tests.helpers import SICLIP, registered_checkpoints, subprocess_env, tiny_world, write_config

pytestmark = [pytest.mark.slow]

TEACHER = [
    "train.max_steps=24",
    "train.ckpt_every=4",
    "train.eval_every=0",
    "train.log_every=4",
    "data.batch_size=16",
    "data.loader_workers=0",
    "optim.warmup_steps=5",
    "ray.object_store_memory_mb=128",
    "ray.env_vars.SICLIP_TEST_TOKEN=never-saved-4f1c",  # a value no saved file may hold
]


def _checkpoints(run: Path) -> list[Path]:
    return sorted(p for p in run.glob("checkpoint_*") if p.is_dir())


def test_sigkill_then_rerun_resumes_and_finishes(tmp_path: Path) -> None:
    tiny_world(str(tmp_path))
    cfg = write_config(tmp_path, "demo_teacher", TEACHER)
    cmd = [*SICLIP, "train", "--config", str(cfg)]
    run = tmp_path / "teacher"
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - kept open for the child's whole life
    # the worker pauses after reporting its step-8 checkpoint (a test hook), so the kill point is chosen
    # here, never by how fast the machine is
    marker = tmp_path / "paused.pid"
    pause = {PAUSE_STEP_ENV: "8", PAUSE_FILE_ENV: str(marker)}
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env={**subprocess_env(), **pause}, start_new_session=True
    )
    try:
        for _ in range(3000):  # events, not time: the bound only keeps a broken run from hanging the suite
            if proc.poll() is not None or (marker.is_file() and registered_checkpoints(run) == 2):
                break
            time.sleep(0.2)
        assert proc.poll() is None and marker.is_file(), (tmp_path / "first.log").read_text()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=60)
        log.close()
    steps_before = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps_before) == 8

    second = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=400)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    resumed = [line for line in out.splitlines() if "resumed run 'teacher' from step" in line]
    assert resumed, out[-4000:]
    assert int(resumed[0].rsplit(" ", 1)[-1]) == 8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if "loss/total" in r]
    assert logged == sorted(set(logged)) and logged[-1] == 24  # no step logged twice across the restart
    assert (run / "final" / "model.safetensors").is_file()
    assert (run / "config.yaml").is_file()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    holding = [p for p in run.rglob("*") if p.is_file() and b"never-saved-4f1c" in p.read_bytes()]
    assert not holding, (
        f"ray.env_vars values saved in {holding}"
    )  # config.yaml, TensorBoard text, Ray's files
    assert "SICLIP_TEST_TOKEN" in (run / "config.yaml").read_text()
    # train.keep_checkpoints = 2, and the folder the killed run left half-registered is gone
    assert 1 <= len(_checkpoints(run)) == registered_checkpoints(run) <= 2


def test_bad_config_exits_2_before_ray(tmp_path: Path) -> None:
    tiny_world(str(tmp_path))
    cfg = write_config(tmp_path, "demo_teacher", TEACHER)
    cases = {
        "optim.lrr=1": "optim.lrr: unknown key",
        "optim.lr=fast": "optim.lr: got 'fast'; expected a number",
        f"data.train_shards=[{tmp_path}/nope-*.tar]": "data.train_shards: got",
    }
    for override, needle in cases.items():
        proc = subprocess.run(
            [*SICLIP, "train", "--config", str(cfg), override],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr
        assert not (tmp_path / "teacher").exists(), "a rejected config must start nothing"
