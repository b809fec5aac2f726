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
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AUTOSCALING_STATUS_KEY",
    "CHECKPOINT_SNAPSHOT_FILE",
    "JOB_CONFIG_ENV",
    "NO_AUTOSCALER",
    "PG_CLEANER_LOGGER",
    "TESTED_RAY_VERSIONS",
    "WORKER_START_TIMEOUT_ENV",
    "Autoscaler",
    "RayVersionError",
    "autoscaler",
    "check_ray_version",
    "is_worker_start_timeout",
    "job_working_dir",
    "loopback_node",
    "max_cluster_resources",
    "orphaned_train_placement_groups",
    "registered_checkpoint_names",
    "v1_status_node_types",
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

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
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
@dataclass(frozen=True)
class Autoscaler:
    """What Ray says about the connected cluster's autoscaler."""

    present: bool
    """An autoscaler with node types of its own runs (it may add nodes); False on a cluster started by hand."""
    most: dict[str, float] | None
    """The most of each resource it may ever launch; None where Ray does not publish it (Ray 2.60's v1 and v2
    autoscalers publish node type names and counts, not the resources of a type)."""


NO_AUTOSCALER = Autoscaler(present=False, most=None)

# The v1 monitor's status JSON in the GCS internal KV (ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS).
AUTOSCALING_STATUS_KEY = "__autoscaling_status"
# The node types a monitor *without* an autoscaling config makes up, one per node it mirrors:
# "node_" + the node ID in hex (ray.autoscaler._private.util.format_readonly_node_type).
_READONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]{56}")


def _configured_node_types(names: Iterable[str]) -> bool:
    """Whether any node type name is one of an autoscaling config (not a mirrored node's made-up name)."""
    return any(name and not _READONLY_NODE_TYPE.fullmatch(name) for name in names)


def v1_status_node_types(status_text: str | bytes | None) -> list[str]:
    """The node type names in the v1 monitor's ``__autoscaling_status`` JSON ([] without an autoscaler report).

    Its ``autoscaler_report`` (an ``AutoscalerSummary``) names types in ``active_nodes``, ``idle_nodes`` and
    ``pending_launches`` (type -> count), ``pending_nodes`` ([ip, type, status]), ``failed_nodes`` ([ip, type])
    and ``node_type_mapping`` (ip -> type).
    """
    try:
        status = json.loads(status_text or "null")
    except ValueError:
        return []
    report = status.get("autoscaler_report") if isinstance(status, dict) else None
    if not isinstance(report, dict):
        return []
    names: list[str] = []
    for key in ("active_nodes", "idle_nodes", "pending_launches"):
        value = report.get(key)
        if isinstance(value, dict):
            names += [str(k) for k in value]
    for key, at in (("pending_nodes", 1), ("failed_nodes", 1)):
        for entry in report.get(key) or []:
            if isinstance(entry, list | tuple) and len(entry) > at:
                names.append(str(entry[at]))
    mapping = report.get("node_type_mapping")
    if isinstance(mapping, dict):
        names += [str(v) for v in mapping.values()]
    return names


def _v2_node_types() -> list[str]:
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    nodes = [*status.active_nodes, *status.idle_nodes, *status.pending_nodes, *status.failed_nodes]
    launches = [*status.pending_launches, *status.failed_launches]
    return [n.ray_node_type_name for n in nodes] + [r.ray_node_type_name for r in launches]


def autoscaler() -> Autoscaler:
    """The connected cluster's autoscaler (Ray must be initialised).

    In order: the cluster config in the GCS (``ReportClusterConfig``: max resources known; Ray 2.60 itself
    never writes it, a platform may), then the node types the running autoscaler reports: the v1 monitor's
    ``__autoscaling_status`` in the GCS internal KV, or the v2 autoscaler's cluster status. A monitor runs on
    every head node; one without an autoscaling config only mirrors the nodes there are, under made-up type
    names, and counts as no autoscaler. A v1 monitor that has not reported yet (its first seconds) reads as
    none.
    """
    check_ray_version()
    from ray._private import state as ray_state
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    most = {k: float(v) for k, v in (ray_state.state.get_max_resources_from_cluster_config() or {}).items()}
    if most:
        return Autoscaler(present=True, most=most)
    if is_autoscaler_v2(fetch_from_server=True):
        try:
            names = _v2_node_types()
        except Exception:  # the v2 autoscaler is on (the GCS says so) but its status cannot be read now
            return Autoscaler(present=True, most=None)
    else:
        names = v1_status_node_types(_internal_kv_get(AUTOSCALING_STATUS_KEY))
    return Autoscaler(present=True, most=None) if _configured_node_types(names) else NO_AUTOSCALER


def max_cluster_resources() -> dict[str, float]:
    """The most of each resource the autoscaler may ever launch; {} when there is none or Ray does not say."""
    return autoscaler().most or {}


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
    raw = os.environ.get(JOB_CONFIG_ENV)
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
