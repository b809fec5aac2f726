"""Two Train workers on two Ray nodes, storage on S3 (a local moto server), both nodes lost mid-run.

The run must finish at ``max_steps`` from its last checkpoint on two fresh nodes, with every output
(config.yaml, metrics.jsonl, TensorBoard events, final/) in the S3 run folder, no step logged twice, and
nothing written under the driver's working directory. The cluster lives in a subprocess
(multinode_scenario.py), so the suite's shared local Ray session is untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from siclip import storage
from tests.helpers import subprocess_env, tiny_world, write_config
from tests.s3_server import BUCKET, local_s3

pytestmark = [pytest.mark.slow]

SCENARIO = Path(__file__).with_name("multinode_scenario.py")
MAX_STEPS = 8


def test_node_loss_on_a_two_node_cluster_resumes_from_s3_and_logs_each_step_once(tmp_path: Path) -> None:
    tiny_world(str(tmp_path))
    work = tmp_path / "driver"
    work.mkdir()
    runs = f"s3://{BUCKET}/{tmp_path.name}/runs"
    config = write_config(
        tmp_path,
        "demo_teacher",
        [
            f"train.runs_dir={runs}",
            "train.run_name=two-nodes",
            "train.num_workers=2",
            "train.cpus_per_worker=1",
            f"train.max_steps={MAX_STEPS}",
            "train.ckpt_every=2",
            "train.log_every=1",
            "train.eval_every=0",
            "train.max_failures=1",
            "train.worker_start_timeout_s=120",
            "train.use_gpu=no",
            "data.batch_size=8",
            "data.loader_workers=0",
            "optim.warmup_steps=2",
        ],
    )
    with local_s3() as s3:
        env = {**subprocess_env(), **s3}
        proc = subprocess.run(
            [sys.executable, str(SCENARIO), str(config), str(work)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        out = proc.stdout + proc.stderr
        (Path(tmp_path) / "scenario.log").write_text(out)
        assert proc.returncode == 0, out[-5000:]
        (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        outcome = json.loads(line[len("RESULT ") :])
        assert "error" not in outcome, out[-5000:]
        assert outcome["paused_at"] == 4, outcome
        assert not set(outcome["removed_nodes"]) & set(outcome["alive_nodes"]), outcome
        assert set(outcome["fresh_nodes"]) <= set(outcome["alive_nodes"]), outcome
        assert outcome["step"] == MAX_STEPS and outcome["location"] == f"{runs}/two-nodes"
        assert "resumed run 'two-nodes' from step 4" in out, out[-5000:]

        import os

        os.environ.update(s3)  # read the results back through the same storage layer
        run = outcome["location"]
        rows = [json.loads(x) for x in storage.read_text(storage.join(run, "metrics.jsonl")).splitlines()]
        steps = [r["step"] for r in rows if "loss/total" in r]
        assert steps == list(range(1, MAX_STEPS + 1)), steps  # each step once, none lost, none repeated
        assert storage.exists(storage.join(run, "config.yaml"))
        assert storage.exists(storage.join(run, "final", "model.safetensors"))
        events = storage.list_dirs(storage.join(run))
        assert "tb" in events and "final" in events
        assert storage.exists(storage.join(run, "checkpoint_manager_snapshot.json"))
        for key in s3:
            os.environ.pop(key, None)
    assert not any(work.iterdir()) or {p.name for p in work.iterdir()} <= {"paused-at", "go"}, list(
        work.iterdir()
    )
