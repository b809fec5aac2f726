"""The Ray internals siclip reads are where ray_compat says, on exactly the Ray pyproject.toml pins.

No Ray session: only Ray's modules, classes and constants are inspected. When Ray is upgraded, these
tests fail first and name what moved, instead of a run failing on a cluster.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import ray

from siclip import ray_compat

REPO = Path(__file__).resolve().parents[2]


def test_pyproject_pins_exactly_the_tested_ray_and_it_is_installed() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_dep,) = [d for d in deps if re.match(r"ray\b", d)]
    pinned = ray_dep.split("==", 1)[1] if "==" in ray_dep else None
    assert pinned == ray_compat.TESTED_RAY_VERSIONS[-1], (
        f"{ray_dep!r}: pin ray=={ray_compat.TESTED_RAY_VERSIONS}"
    )
    assert ray_compat.check_ray_version() == ray.__version__


def test_an_unknown_ray_fails_loudly_before_any_internal_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ray_compat.RayVersionError, match=r"^ray 2\.61\.0 is installed .*ray==2\.60\.0"):
        ray_compat.check_ray_version("2.61.0")
    monkeypatch.setattr(ray, "__version__", "2.99.1")
    monkeypatch.setenv(
        ray_compat.JOB_CONFIG_ENV, '{"runtime_env": {}}'
    )  # inside a job: it reads Ray's format
    for call in (
        lambda: ray_compat.registered_checkpoint_names("{}"),
        ray_compat.max_cluster_resources,
        ray_compat.autoscaler,
        ray_compat.orphaned_train_placement_groups,
        ray_compat.job_working_dir,
        lambda: ray_compat.is_worker_start_timeout(RuntimeError()),
    ):
        with pytest.raises(ray_compat.RayVersionError, match=r"2\.99\.1"):
            call()


def test_every_private_name_is_still_where_ray_keeps_it() -> None:
    constants = importlib.import_module("ray.train.v2._internal.constants")
    assert constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME == ray_compat.CHECKPOINT_SNAPSHOT_FILE
    assert constants.WORKER_GROUP_START_TIMEOUT_S_ENV_VAR == ray_compat.WORKER_START_TIMEOUT_ENV
    # the driver's value must reach the controller, where the worker group reads it
    assert ray_compat.WORKER_START_TIMEOUT_ENV in constants.ENV_VARS_TO_PROPAGATE
    cleaner = importlib.import_module("ray.train.v2._internal.execution.controller.placement_group_cleaner")
    assert cleaner.logger.name == ray_compat.PG_CLEANER_LOGGER
    runtime_env_constants = importlib.import_module("ray._private.runtime_env.constants")
    assert runtime_env_constants.RAY_JOB_CONFIG_JSON_ENV_VAR == ray_compat.JOB_CONFIG_ENV
    state = importlib.import_module("ray._private.state")
    assert callable(state.state.get_max_resources_from_cluster_config)
    assert callable(state.state._connect_and_get_accessor)
    gcs_pb2 = importlib.import_module("ray.core.generated.gcs_pb2")
    fields = gcs_pb2.PlacementGroupTableData.DESCRIPTOR.fields_by_name
    for name in ("state", "is_detached", "creator_actor_id", "creator_actor_dead", "creator_job_id"):
        assert name in fields, name
    manager = importlib.import_module("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    keys = manager._CheckpointManagerState.model_fields
    for name in ("checkpoint_results", "pending_training_results", "latest_checkpoint_result"):
        assert name in keys, name
    assert "checkpoint_dir_name" in manager._TrainingResultState.model_fields


def test_registered_names_read_ray_s_own_snapshot_and_skip_what_is_missing() -> None:
    manager = importlib.import_module("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    result = manager._TrainingResultState
    snapshot = manager._CheckpointManagerState(
        checkpoint_results=[result(checkpoint_dir_name="checkpoint_a", metrics={})],
        checkpoint_report_indices=[0],
        latest_checkpoint_result=result(checkpoint_dir_name="checkpoint_b", metrics={}),
        pending_training_results=[result(checkpoint_dir_name="checkpoint_c", metrics={})],
        pending_validation_specs=[False],
        current_report_index=2,
        validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[],
        failed_validation_checkpoint_dir_names=[],
    ).model_dump_json()
    assert ray_compat.registered_checkpoint_names(snapshot) == {
        "checkpoint_a",
        "checkpoint_b",
        "checkpoint_c",
    }
    odd = {"checkpoint_results": [{"metrics": {}}, {"checkpoint_dir_name": "checkpoint_x"}]}
    assert ray_compat.registered_checkpoint_names(json.dumps(odd)) == {"checkpoint_x"}  # no KeyError
    assert ray_compat.registered_checkpoint_names("{}") == set()
    assert ray_compat.registered_checkpoint_names("not json") is None
    assert ray_compat.registered_checkpoint_names("[1]") is None


def test_a_worker_start_timeout_is_recognised_through_ray_s_wrapper() -> None:
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    timeout = WorkerGroupStartupTimeoutError(num_workers=2)
    assert ray_compat.is_worker_start_timeout(ControllerError(timeout))
    try:
        raise RuntimeError("fit failed") from ControllerError(timeout)
    except RuntimeError as wrapped:
        assert ray_compat.is_worker_start_timeout(wrapped)
    assert not ray_compat.is_worker_start_timeout(ControllerError(RuntimeError("other")))


def test_job_working_dir_reads_the_supervisor_s_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ray_compat.JOB_CONFIG_ENV, raising=False)
    assert ray_compat.job_working_dir() is None
    config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {}}
    monkeypatch.setenv(ray_compat.JOB_CONFIG_ENV, json.dumps(config))
    assert ray_compat.job_working_dir() == "gcs://_ray_pkg_abc.zip"
    monkeypatch.setenv(ray_compat.JOB_CONFIG_ENV, json.dumps({"runtime_env": {}}))
    assert ray_compat.job_working_dir() is None


def test_the_session_mutes_the_logger_ray_compat_names() -> None:
    from siclip.ray_session import quiet_without_dashboard

    logger = logging.getLogger(ray_compat.PG_CLEANER_LOGGER)
    logger.setLevel(logging.NOTSET)
    quiet_without_dashboard()
    assert not logger.isEnabledFor(logging.WARNING)


def _mirrored(node_id_hex: str) -> str:
    """The type name a monitor without an autoscaling config gives a node it mirrors (Ray's own function)."""
    from ray.autoscaler._private.util import format_readonly_node_type

    return str(format_readonly_node_type(node_id_hex))


def _v1_status(node_types: dict[str, str], *, report: bool = True) -> str:
    """``__autoscaling_status`` as Ray 2.60's v1 monitor writes it: its own ``AutoscalerSummary``, as JSON."""
    from dataclasses import asdict

    from ray.autoscaler._private.autoscaler import AutoscalerSummary

    summary = AutoscalerSummary(
        active_nodes={},
        idle_nodes=None,
        pending_nodes=[],
        pending_launches={},
        failed_nodes=[],
        node_type_mapping=node_types,
        legacy=True,
    )
    status: dict[str, Any] = {"time": 0.0, "load_metrics_report": {"usage": {}}}
    if report:
        status["autoscaler_report"] = asdict(summary)
    return json.dumps(status)


@pytest.mark.parametrize(
    ("status", "present"),
    [
        # a head started with an autoscaling config: its own type, GPU workers at zero
        (_v1_status({"ffff00000": "ray.head.default"}), True),
        # a head started by hand: the monitor mirrors each node under "node_" + its ID
        (_v1_status({"10.0.0.1": _mirrored("ab12" * 14), "10.0.0.2": _mirrored("cd34" * 14)}), False),
        (_v1_status({}, report=False), False),  # no autoscaler report (yet)
        (None, False),  # no monitor at all
        ("not json", False),
    ],
)
def test_an_autoscaler_is_told_from_the_node_types_its_monitor_reports(
    monkeypatch: pytest.MonkeyPatch, status: str | None, present: bool
) -> None:
    from ray._private import state as ray_state

    monkeypatch.setattr(ray_state.state, "get_max_resources_from_cluster_config", lambda: None)
    monkeypatch.setattr("ray.autoscaler.v2.utils.is_autoscaler_v2", lambda **_: False)
    monkeypatch.setattr("ray.experimental.internal_kv._internal_kv_get", lambda key, **_: status)
    found = ray_compat.autoscaler()
    assert found.present is present and found.most is None  # Ray 2.60 never says what a type holds
    assert ray_compat.max_cluster_resources() == {}


def test_a_published_cluster_config_gives_the_autoscaler_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private import state as ray_state

    monkeypatch.setattr(
        ray_state.state, "get_max_resources_from_cluster_config", lambda: {"CPU": 64, "GPU": 8}
    )
    assert ray_compat.autoscaler() == ray_compat.Autoscaler(present=True, most={"CPU": 64.0, "GPU": 8.0})


def test_the_v1_status_key_is_where_ray_keeps_it() -> None:
    from ray._private import ray_constants

    assert ray_compat.AUTOSCALING_STATUS_KEY == ray_constants.DEBUG_AUTOSCALING_STATUS


def _v2_status(head_type: str, pending: list[str]) -> Any:
    """A v2 autoscaler's cluster status, built from Ray's own schema classes."""
    from ray.autoscaler.v2.schema import ClusterStatus, LaunchRequest, NodeInfo

    head = NodeInfo(
        instance_type_name="", ray_node_type_name=head_type, instance_id="h", ip_address="10.0.0.1"
    )
    launches = [
        LaunchRequest(
            instance_type_name="g5",
            ray_node_type_name=t,
            count=1,
            state=LaunchRequest.Status.PENDING,
            request_ts_s=0,
        )
        for t in pending
    ]
    return ClusterStatus(active_nodes=[head], pending_launches=launches)


@pytest.mark.parametrize(
    ("status", "present"),
    [
        (lambda: _v2_status("headgroup", ["gpu-group"]), True),  # KubeRay with an autoscaler: its groups
        (lambda: _v2_status(_mirrored("ef56" * 14), []), False),  # v2 without a config mirrors its nodes
        (lambda: (_ for _ in ()).throw(TimeoutError("GCS busy")), True),  # on, but unreadable now: assume one
    ],
)
def test_a_v2_autoscaler_is_told_from_its_cluster_status(
    monkeypatch: pytest.MonkeyPatch, status: Any, present: bool
) -> None:
    from ray._private import state as ray_state

    monkeypatch.setattr(ray_state.state, "get_max_resources_from_cluster_config", lambda: None)
    monkeypatch.setattr("ray.autoscaler.v2.utils.is_autoscaler_v2", lambda **_: True)
    monkeypatch.setattr("ray.autoscaler.v2.sdk.get_cluster_status", lambda *a, **k: status())
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Ctx", (), {"gcs_address": "127.0.0.1:1"})())
    assert ray_compat.autoscaler() == ray_compat.Autoscaler(present=present, most=None)
