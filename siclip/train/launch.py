"""The driver side of training: ``launch(cfg)`` builds a Train V2 ``TorchTrainer`` and fits it.

``siclip train`` and every Ray Tune trial call this same function. A run is named by ``train.run_name``
under ``train.runs_dir`` (Ray Train's ``storage_path``); fitting again under the same name resumes from the
latest checkpoint, and ``train.max_failures`` lets Ray restart failed workers from it.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

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
from siclip.train.worker import run_dir_of, train_worker

__all__ = ["TrainResult", "init_ray", "launch", "resolve_max_steps"]


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    checkpoint: str | None
    metrics: dict[str, Any]
    max_steps: int


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


def registered_checkpoints(run_dir: Path) -> set[str] | None:
    """Folder names of the checkpoints Ray Train registered for a local run; None when it has no snapshot."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return None
    return {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}


def drop_unregistered_checkpoints(run_dir: Path) -> list[str]:
    """Remove ``checkpoint_*`` folders Ray Train never registered (a driver killed mid-upload leaves them).

    Ray resumes only from checkpoints listed in ``checkpoint_manager_snapshot.json`` and never deletes the
    others, so without this a crashed run accumulates stale copies beyond ``train.keep_checkpoints``.
    """
    registered = registered_checkpoints(run_dir)
    if registered is None:
        return []
    dropped = []
    for folder in run_dir.glob("checkpoint_*"):
        if folder.is_dir() and folder.name not in registered:
            shutil.rmtree(folder, ignore_errors=True)
            dropped.append(folder.name)
    return dropped


RESUME_SECTIONS = ("model", "loss", "teacher")
"""What a run is: resuming it with other values in these sections would mix two experiments (or fail to load)."""


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """``{"model.sasp.share": "qk", ...}`` from a nested (YAML or ``to_dict``) mapping."""
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(f"{prefix}.{key}", sub).items()}
    return {prefix: value}


def check_resume_compatible(cfg: SiclipCfg, run_dir: Path) -> None:
    """Refuse to resume a run that has checkpoints under a different model, loss or teacher.

    Compares with the run's saved ``config.yaml`` (local runs; with URI storage the checkpoints are remote
    and this check is skipped). Keys only one side knows (an older schema) are skipped.
    Everything else (steps, logging, workers, data loading, optimiser) may change between resumes.
    """
    saved_file = run_dir / "config.yaml"
    if not saved_file.is_file() or not registered_checkpoints(run_dir):
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
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


def _tidy_checkpoints(cfg: SiclipCfg, run_dir: Path) -> None:
    if is_uri(cfg.train.runs_dir):
        return
    for name in drop_unregistered_checkpoints(run_dir):
        print(f"siclip: removed {name}: written by an interrupted run, never registered by Ray Train")


def _use_gpu(cfg: SiclipCfg) -> bool:
    if cfg.train.use_gpu == "auto":
        return bool(ray.cluster_resources().get("GPU", 0))
    return cfg.train.use_gpu == "yes"


def launch(cfg: SiclipCfg, *, callbacks: list[Any] | None = None) -> TrainResult:
    """Train (or resume) the run ``cfg.train.run_name``; returns where it is and its last metrics."""
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards: got []; allowed: one or more shard paths or patterns")
    cfg = absolutize(cfg)
    max_steps = resolve_max_steps(cfg)
    run_dir = run_dir_of(cfg)
    check_resume_compatible(cfg, run_dir)
    init_ray(cfg.ray)
    use_gpu = _use_gpu(cfg)
    if use_gpu and not ray.cluster_resources().get("GPU", 0):
        raise ConfigError(
            "train.use_gpu: got 'yes'; the Ray cluster has no GPU (allowed here: 'auto' or 'no')"
        )
    if not use_gpu and cfg.train.precision in ("bf16", "fp16"):
        cfg = replace(cfg, train=replace(cfg.train, precision="fp32"))

    run_dir.mkdir(parents=True, exist_ok=True)
    _tidy_checkpoints(cfg, run_dir)
    save_config(cfg, run_dir / "config.yaml")
    storage = cfg.train.runs_dir if is_uri(cfg.train.runs_dir) else str(Path(cfg.train.runs_dir).resolve())

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={**to_dict(cfg), "_max_steps": max_steps},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name,
            storage_path=storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks or None,
        ),
    )
    try:
        result = trainer.fit()
    finally:  # a worker killed mid-upload (then restarted by FailureConfig) leaves its folder behind too
        _tidy_checkpoints(cfg, run_dir)
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    return TrainResult(
        run_dir=run_dir, checkpoint=checkpoint, metrics=dict(result.metrics or {}), max_steps=max_steps
    )
