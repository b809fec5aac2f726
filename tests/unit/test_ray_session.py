"""How siclip starts or joins Ray (``ray.init`` is replaced: unit tests never start Ray)."""

from __future__ import annotations

import importlib
import logging
from typing import Any

import pytest
import ray

from siclip import ray_session
from siclip.config import RayCfg


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return seen


def test_local_ray_without_dashboard_mutes_the_placement_group_cleaner(calls: list[dict[str, Any]]) -> None:
    ray_session.init_ray(RayCfg(num_cpus=2, object_store_memory_mb=128))
    (kw,) = calls
    assert kw["address"] == "local" and kw["num_cpus"] == 2 and kw["object_store_memory"] == 128 * 2**20
    hook = kw["runtime_env"]["worker_process_setup_hook"]
    module, name = hook.rsplit(".", 1)
    cleaner = importlib.import_module("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    assert cleaner.logger.name == ray_session._PG_CLEANER_LOGGER  # still where Ray logs from
    logger = logging.getLogger(ray_session._PG_CLEANER_LOGGER)
    logger.setLevel(logging.NOTSET)
    getattr(importlib.import_module(module), name)()  # what each Ray worker runs at start
    assert not logger.isEnabledFor(logging.WARNING) and logger.isEnabledFor(logging.ERROR)


def test_with_a_dashboard_or_a_cluster_nothing_is_muted(
    calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ray_session.init_ray(RayCfg(include_dashboard=True))
    assert "runtime_env" not in calls[-1]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    ray_session.init_ray(RayCfg())
    assert calls[-1] == {"address": "127.0.0.1:6379"}  # the cluster's own settings stand
