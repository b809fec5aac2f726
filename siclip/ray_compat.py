"""Every use of Ray's private internals, in one place, gated to the Ray versions they were checked against.

siclip needs a few things Ray has no public API for: which checkpoints Ray Train registered (its snapshot
file), the placement groups of Train controllers that died with their Tune trial, what an autoscaling
cluster *could* launch, the environment variable that bounds a worker group's start, and how a job's driver
learns its runtime env. Their names and formats change between Ray releases without notice, so each is read
here, and nowhere else, after :func:`check_ray_version` confirmed the running Ray is one they were read from
(pyproject.toml pins it exactly; a test fails loudly when the two disagree). A missing key in a file Ray
wrote is treated as "not there", never as a ``KeyError``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

__all__ = [
    "CHECKPOINT_SNAPSHOT_FILE",
    "PG_CLEANER_LOGGER",
    "TESTED_RAY_VERSIONS",
    "WORKER_START_TIMEOUT_ENV",
    "RayVersionError",
    "check_ray_version",
    "is_worker_start_timeout",
    "job_working_dir",
    "loopback_node",
    "max_cluster_resources",
    "orphaned_train_placement_groups",
    "registered_checkpoint_names",
]

TESTED_RAY_VERSIONS = ("2.60.0",)
"""Ray releases whose internals below were read and tested; pyproject.toml pins the same one."""

CHECKPOINT_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train V2's list of registered checkpoints in a run folder (ray.train.v2._internal.constants)."""

WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Seconds a Train V2 worker group waits for its placement group; the driver's value reaches the controller
(it is in Ray Train's ENV_VARS_TO_PROPAGATE). Default 60 s: too short for a GPU node's boot and image pull."""

PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
"""Logger of Train V2's placement-group cleaner (muted when there is no dashboard for it to ask)."""

_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by the job supervisor for a submitted job's driver: JSON with the job's ``runtime_env``."""


class RayVersionError(RuntimeError):
    """The running Ray is not one whose private internals siclip was checked against."""


def check_ray_version(version: str | None = None) -> str:
    """Return the running Ray version, or raise naming it and the tested ones."""
    if version is None:
        import ray

        version = ray.__version__
    if version not in TESTED_RAY_VERSIONS:
        raise RayVersionError(
            f"ray {version} is installed but siclip reads Ray internals checked only against "
            f"{', '.join(TESTED_RAY_VERSIONS)}; allowed: install ray=={TESTED_RAY_VERSIONS[-1]} "
            "(pyproject.toml pins it), or re-check siclip/ray_compat.py against the new release"
        )
    return version


# ------------------------------------------------------------------------------------- checkpoints
def registered_checkpoint_names(snapshot_text: str) -> set[str] | None:
    """Folder names of the checkpoints a Train V2 snapshot lists; None when the text is not a snapshot.

    Registered means kept (``checkpoint_results``), the latest, or reported and still being processed
    (``pending_training_results``): none of them may be deleted. Entries without a name are skipped.
    """
    check_ray_version()
    try:
        snapshot = json.loads(snapshot_text)
    except ValueError:
        return None
    if not isinstance(snapshot, dict):
        return None
    entries: list[Any] = [
        *(snapshot.get("checkpoint_results") or []),
        *(snapshot.get("pending_training_results") or []),
        snapshot.get("latest_checkpoint_result"),
    ]
    return {
        str(e["checkpoint_dir_name"]) for e in entries if isinstance(e, dict) and e.get("checkpoint_dir_name")
    }


# ------------------------------------------------------------------------------------- cluster state
def max_cluster_resources() -> dict[str, float]:
    """The most of each resource the autoscaler may ever launch ({} without an autoscaler config).

    Read from the cluster config the autoscaler publishes to the GCS (Ray Train checks its worker group
    against the same numbers); a cluster started by hand has none.
    """
    check_ray_version()
    from ray._private import state as ray_state

    return {k: float(v) for k, v in (ray_state.state.get_max_resources_from_cluster_config() or {}).items()}


def orphaned_train_placement_groups() -> list[Any]:
    """Placement groups of this job made by an actor that is now dead (a Train controller Tune killed).

    A group made by the driver itself (Tune's trial groups) has no creator actor and counts as "creator
    dead" in the GCS; only groups made by an actor qualify. Detached and removed groups are skipped.
    """
    check_ray_version()
    import ray
    from ray._private import state as ray_state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    table_data = gcs_pb2.PlacementGroupTableData  # type: ignore[attr-defined]
    job = ray.get_runtime_context().get_job_id()
    found = []
    for raw in ray_state.state._connect_and_get_accessor().get_placement_group_table():
        pg = table_data.FromString(raw)
        if pg.state == table_data.REMOVED or pg.is_detached:
            continue
        by_actor = bool(pg.creator_actor_id) and not ray.ActorID(pg.creator_actor_id).is_nil()
        if by_actor and pg.creator_actor_dead and pg.creator_job_id.hex() == job:
            found.append(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
    return found


def is_worker_start_timeout(error: BaseException) -> bool:
    """Whether ``fit()`` failed because its worker group's resources were not granted in time.

    ``fit()`` raises the public ``ray.train.ControllerError`` around the controller's exception, whose
    class is private.
    """
    check_ray_version()
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    e: BaseException | None = error
    while e is not None:
        if isinstance(e, WorkerGroupStartupTimeoutError):
            return True
        if isinstance(e, ControllerError) and isinstance(
            e.controller_failure, WorkerGroupStartupTimeoutError
        ):
            return True
        e = e.__cause__
    return False


# ------------------------------------------------------------------------------------- jobs
def job_working_dir() -> str | None:
    """The ``working_dir`` of the submitted job this driver runs in (its upload), or None outside a job."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not raw:  # outside a job: answered without importing Ray (the CLI calls this before anything else)
        return None
    check_ray_version()
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    working_dir = runtime_env.get("working_dir") if isinstance(runtime_env, dict) else None
    return str(working_dir) if working_dir else None


# Ray 2.60 turns an explicit loopback node address into this machine's network address (``ray.init``
# resolves 127.0.0.1 "for remote access") except where it does not allow clusters (macOS, Windows): there
# the node is 127.0.0.1 and every Ray process binds to it. That switch is read from this module constant
# (and, in processes Ray starts, from this environment variable).
# tests/integration/test_ray_local_security.py checks it on the pinned Ray.
_CLUSTER_SWITCH_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """While Ray starts: its node address is 127.0.0.1, so GCS, raylet and agents listen on loopback only."""
    from ray._private import ray_constants

    check_ray_version()

    saved_const = ray_constants.ENABLE_RAY_CLUSTER
    saved_env = os.environ.get(_CLUSTER_SWITCH_ENV)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[_CLUSTER_SWITCH_ENV] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(_CLUSTER_SWITCH_ENV, None)
        else:
            os.environ[_CLUSTER_SWITCH_ENV] = saved_env
