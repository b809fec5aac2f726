"""The driver side of training: ``launch(cfg)`` builds a Train V2 ``TorchTrainer`` and fits it.

``siclip train`` and every Ray Tune trial call this same function. A run is named by ``train.run_name``
under ``train.runs_dir`` (Ray Train's ``storage_path``: a folder every node sees, or a URI such as
``s3://``); fitting again under the same name resumes from the latest checkpoint, and
``train.max_failures`` lets Ray restart failed workers from it.

``train.use_gpu: yes`` asks Ray for one GPU per worker and waits up to ``train.worker_start_timeout_s`` for
it, so an autoscaler can launch GPU nodes; ``auto`` is yes when the cluster has GPUs or can launch them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from siclip import ray_compat, storage
from siclip.config import (
    ConfigError,
    SiclipCfg,
    absolutize,
    expand_shards,
    is_uri,
    replace,
    save_config,
    to_dict,
)
from siclip.ray_session import init_ray
from siclip.train.run_log import run_location
from siclip.train.worker import train_worker

__all__ = [
    "TrainResult",
    "check_cluster_storage",
    "init_ray",
    "launch",
    "resolve_max_steps",
    "resolve_use_gpu",
]


@dataclass(frozen=True)
class TrainResult:
    location: str
    """The run folder: a local path or a URI (``s3://...``)."""
    checkpoint: str | None
    metrics: dict[str, Any]
    max_steps: int

    @property
    def run_dir(self) -> Path:
        """The run folder on this machine's filesystem (an error for a run kept at a URI)."""
        if storage.is_remote(self.location):
            raise ValueError(f"run folder {self.location} is not on a local filesystem; use .location")
        return Path(self.location)


def resolve_max_steps(cfg: SiclipCfg) -> int:
    """``train.max_steps``, or ``train.epochs`` x the manifest's sample count / the global batch."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    if not cfg.train.epochs:
        raise ConfigError("train.max_steps: got 0 and train.epochs is 0; allowed: set one of them > 0")
    from siclip.data.shards import manifest_sample_count

    samples = manifest_sample_count(expand_shards(cfg.data.train_shards))
    if not samples:
        raise ConfigError(
            "train.epochs: no manifest.json with sample counts next to data.train_shards; "
            "allowed: set train.max_steps instead"
        )
    return max(1, math.ceil(cfg.train.epochs * samples / cfg.data.batch_size))


def registered_checkpoints(run_dir: str | Path) -> set[str] | None:
    """Folder names of the checkpoints Ray Train registered for a run; None when it has no snapshot."""
    try:
        text = storage.read_text(storage.join(run_dir, ray_compat.CHECKPOINT_SNAPSHOT_FILE))
    except (OSError, ValueError):
        return None
    return ray_compat.registered_checkpoint_names(text)


def drop_unregistered_checkpoints(run_dir: str | Path) -> list[str]:
    """Remove ``checkpoint_*`` folders Ray Train never registered (a driver killed mid-upload leaves them).

    Ray resumes only from checkpoints listed in its snapshot and never deletes the others, so without this
    a crashed run accumulates stale copies beyond ``train.keep_checkpoints``.
    """
    registered = registered_checkpoints(run_dir)
    if registered is None:
        return []
    dropped = []
    for name in storage.list_dirs(run_dir):
        if name.startswith("checkpoint_") and name not in registered:
            storage.remove_dir(storage.join(run_dir, name))
            dropped.append(name)
    return dropped


RESUME_SECTIONS = ("model", "loss", "teacher")
"""What a run is: resuming it with other values in these sections would mix two experiments (or fail to load)."""


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """``{"model.sasp.share": "qk", ...}`` from a nested (YAML or ``to_dict``) mapping."""
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(f"{prefix}.{key}", sub).items()}
    return {prefix: value}


def check_resume_compatible(cfg: SiclipCfg, run_dir: str | Path) -> None:
    """Refuse to resume a run that has checkpoints under a different model, loss or teacher.

    Compares with the run's saved ``config.yaml`` (in a folder or at a URI). Keys only one side knows (an
    older schema) are skipped. Everything else (steps, logging, workers, data loading, optimiser) may
    change between resumes.
    """
    if not registered_checkpoints(run_dir):
        return
    try:
        saved = yaml.safe_load(storage.read_text(storage.join(run_dir, "config.yaml"))) or {}
    except FileNotFoundError:
        return
    now = to_dict(cfg)
    diffs = []
    for section in RESUME_SECTIONS:
        old, new = _flat(section, saved.get(section, {})), _flat(section, now[section])
        diffs += [
            f"{k}: {old[k]!r} saved, {new[k]!r} now"
            for k in sorted(old.keys() & new.keys())
            if old[k] != new[k]
        ]
    if diffs:
        raise ConfigError(
            f"train.run_name: got {cfg.train.run_name!r}, a run in {run_dir} with checkpoints from a different "
            f"setup ({'; '.join(diffs)}); allowed: its saved settings to resume it, or a new train.run_name"
        )


def _tidy_checkpoints(run_dir: str) -> None:
    for name in drop_unregistered_checkpoints(run_dir):
        print(f"siclip: removed {name}: written by an interrupted run, never registered by Ray Train")


def resolve_use_gpu(cfg: SiclipCfg) -> bool:
    """``train.use_gpu`` for the connected cluster: auto is yes when it has GPUs or can launch GPU nodes.

    Where an autoscaler runs but Ray does not say what its node types hold (Ray 2.60's autoscalers name
    their types, not their resources), ``auto`` cannot know: a ``ConfigError`` asks for yes or no.
    Call once per run (a sweep: once for all its trials), after Ray is up.
    """
    if cfg.train.use_gpu != "auto":
        return cfg.train.use_gpu == "yes"
    if ray.cluster_resources().get("GPU", 0):
        return True
    scaler = ray_compat.autoscaler()
    if scaler.most is not None:
        return scaler.most.get("GPU", 0) > 0
    if scaler.present:
        raise ConfigError(
            "train.use_gpu: got auto on a cluster with no GPU now whose autoscaler may launch GPU nodes, and "
            "Ray does not say whether it can; allowed: train.use_gpu=yes (wait for GPU nodes) or "
            "train.use_gpu=no (train on CPUs)"
        )
    return False


def check_cluster_storage(cfg: SiclipCfg) -> None:
    """On a cluster of several nodes (or one an autoscaler can grow), ``train.runs_dir`` must be shared."""
    from siclip.preflight import check_shared_run_folder

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    check_shared_run_folder(cfg, nodes=nodes, can_add_nodes=ray_compat.autoscaler().present)


def _worker_resources(cfg: SiclipCfg, use_gpu: bool) -> dict[str, float]:
    return {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}


def _announce_wait(cfg: SiclipCfg, resources: dict[str, float]) -> None:
    """Say so when the workers will wait: the cluster does not have what they ask for right now."""
    have = ray.available_resources()
    if all(have.get(k, 0) >= v * cfg.train.num_workers for k, v in resources.items()):
        return
    print(
        f"siclip: waiting up to {cfg.train.worker_start_timeout_s} s (train.worker_start_timeout_s) for "
        f"{cfg.train.num_workers} worker(s) with {resources}; the cluster has {dict(have)} free now, "
        "an autoscaler can launch the rest"
    )


def _fit(trainer: TorchTrainer, cfg: SiclipCfg, resources: dict[str, float]) -> Any:
    """``trainer.fit()`` with the worker group's start bounded by ``train.worker_start_timeout_s``."""
    previous = os.environ.get(ray_compat.WORKER_START_TIMEOUT_ENV)
    os.environ[ray_compat.WORKER_START_TIMEOUT_ENV] = str(cfg.train.worker_start_timeout_s)
    try:
        return trainer.fit()
    except Exception as exc:
        if ray_compat.is_worker_start_timeout(exc):
            raise ConfigError(
                f"train.worker_start_timeout_s: {cfg.train.worker_start_timeout_s} s passed and Ray never "
                f"granted {cfg.train.num_workers} worker(s) with {resources}; allowed: a cluster that has or "
                "can launch such nodes, a longer timeout, or fewer/smaller workers (train.num_workers, "
                "train.cpus_per_worker, train.use_gpu)"
            ) from exc
        raise
    finally:
        if previous is None:
            os.environ.pop(ray_compat.WORKER_START_TIMEOUT_ENV, None)
        else:
            os.environ[ray_compat.WORKER_START_TIMEOUT_ENV] = previous


def launch(cfg: SiclipCfg, *, callbacks: list[Any] | None = None) -> TrainResult:
    """Train (or resume) the run ``cfg.train.run_name``; returns where it is and its last metrics."""
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards: got []; allowed: one or more shard paths or patterns")
    cfg = absolutize(cfg)
    max_steps = resolve_max_steps(cfg)
    run_dir = run_location(cfg)
    check_resume_compatible(cfg, run_dir)
    init_ray(cfg.ray)
    check_cluster_storage(cfg)
    use_gpu = resolve_use_gpu(cfg)
    if not use_gpu and cfg.train.precision in ("bf16", "fp16"):
        cfg = replace(cfg, train=replace(cfg.train, precision="fp32"))
    resources = _worker_resources(cfg, use_gpu)

    _tidy_checkpoints(run_dir)
    save_config(cfg, storage.join(run_dir, "config.yaml"))
    storage_path = (
        cfg.train.runs_dir if is_uri(cfg.train.runs_dir) else str(Path(cfg.train.runs_dir).resolve())
    )

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**to_dict(cfg), "_max_steps": max_steps},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            # controller_failure_limit 0: a worker group that did not start within the timeout fails the
            # run with a clear error instead of Ray retrying it for ever (its default, -1)
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.train.max_failures,
                controller_failure_limit=0,  # type: ignore[call-arg]  # Train V2 field; mypy sees V1
            ),
            callbacks=callbacks or None,
        ),
    )
    _announce_wait(cfg, resources)
    try:
        result = _fit(trainer, cfg, resources)
    finally:  # a worker killed mid-upload (then restarted by FailureConfig) leaves its folder behind too
        _tidy_checkpoints(run_dir)
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return TrainResult(
        location=run_dir, checkpoint=checkpoint, metrics=dict(result.metrics or {}), max_steps=max_steps
    )
