"""How siclip starts or joins Ray (``ray.init`` is replaced: unit tests never start Ray)."""

from __future__ import annotations

import importlib
import logging
from typing import Any

import pytest
import ray

from siclip import ray_session
from siclip.config import RayCfg
from siclip.ray_compat import PG_CLEANER_LOGGER


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
    assert cleaner.logger.name == PG_CLEANER_LOGGER  # still where Ray logs from
    logger = logging.getLogger(PG_CLEANER_LOGGER)
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


def test_token_files_become_owner_only(
    calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    default = home / ".ray" / "auth_token"
    default.write_text("t" * 64)
    default.chmod(0o644)  # what Ray 2.60 leaves with the usual umask
    other = tmp_path / "token"
    other.write_text("u" * 64)
    other.chmod(0o640)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    ray_session.init_ray(RayCfg())
    assert (default.stat().st_mode & 0o777, other.stat().st_mode & 0o777) == (0o600, 0o600)


def test_a_chosen_node_address_is_passed_to_ray(calls: list[dict[str, Any]]) -> None:
    ray_session.init_ray(RayCfg(node_ip_address="10.1.2.3"))
    assert calls[-1]["_node_ip_address"] == "10.1.2.3"
    ray_session.init_ray(RayCfg(node_ip_address=""))  # Ray's own choice
    assert "_node_ip_address" not in calls[-1]
