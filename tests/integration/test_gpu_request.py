"""``train.use_gpu: yes`` on a cluster without GPU nodes asks Ray for GPUs and waits instead of refusing.

The worker group's placement group stays pending, a demand an autoscaler sees and would launch GPU nodes
for, until ``train.worker_start_timeout_s`` passes; then the run fails with one line naming that key and
its request is withdrawn. Runs on the shared local Ray session (2 CPUs, no GPU, no autoscaler).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from siclip.config import ConfigError, load_config
from siclip.train.launch import launch
from tests.helpers import tiny_world, write_config

pytestmark = [pytest.mark.ray]


def _gpu_groups(state: str) -> list[str]:
    return [
        pg_id
        for pg_id, pg in ray.util.placement_group_table().items()
        if pg["state"] == state and any(b.get("GPU") for b in pg["bundles"].values())
    ]


def _pending_gpu_demand() -> list[Any]:
    """What the autoscaler reads: placement-group demands that ask for a GPU."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    return [
        d
        for d in status.resource_demands.placement_group_demand
        if any(r.bundle.get("GPU") for r in d.bundles_by_count)
    ]


def test_use_gpu_yes_waits_for_gpus_then_times_out_naming_the_key(ray_session: None, tmp_path: Path) -> None:
    assert not ray.cluster_resources().get("GPU"), "this test needs a Ray without GPUs"
    tiny_world(str(tmp_path))
    path = write_config(
        tmp_path,
        "demo_teacher",
        [
            "train.use_gpu=yes",
            "train.worker_start_timeout_s=10",
            "train.max_steps=2",
            "train.run_name=gpu-wait",
            "data.loader_workers=0",
        ],
    )
    cfg = load_config(path)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            launch(cfg)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    pending: list[str] = []
    demand: list[Any] = []
    while thread.is_alive() and not (pending and demand):
        pending = pending or _gpu_groups("PENDING")
        demand = demand or (_pending_gpu_demand() if pending else [])
        time.sleep(0.2)
    thread.join(timeout=300)
    assert pending, f"no pending GPU placement group was ever requested; the run ended with {errors}"
    assert demand, "the pending GPU request never reached the autoscaler's resource demands"
    assert len(errors) == 1 and isinstance(errors[0], ConfigError), errors
    message = str(errors[0])
    assert message.startswith("train.worker_start_timeout_s: 10 s passed") and "'GPU': 1" in message
    assert "\n" not in message
    assert not set(pending) & set(_gpu_groups("PENDING")), "the timed-out request was left pending"
