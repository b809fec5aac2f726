"""Small builders shared by integration and end-to-end tests: a tiny demo world and configs pointing at it."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import yaml

from siclip.config import apply_overrides
from siclip.demo import CONFIGS, _rebase

TINY_WORLD = {
    "n_web": 400,
    "n_clean": 120,
    "n_retrieval": 60,
    "n_zeroshot_per_class": 2,
    "samples_per_shard": 150,
}


@functools.lru_cache(maxsize=4)
def tiny_world(root: str) -> object:
    from siclip.data.demo_world import generate_demo_world

    return generate_demo_world(Path(root) / "world", image_size=64, **TINY_WORLD)


def write_config(root: Path, name: str, overrides: list[str], *, out: str = "cfg.yaml") -> Path:
    """``configs/<name>.yaml`` rebased under ``root`` (web shards instead of captioned ones) plus overrides."""
    data = _rebase(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), str(root))
    data["data"]["train_shards"] = [str(root / "world" / "web" / "web-*.tar")]
    data = apply_overrides(data, overrides)
    path = root / out
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONUNBUFFERED"] = "1"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


SICLIP = [sys.executable, "-m", "siclip.cli"]


def registered_checkpoints(run: Path) -> int:
    """Checkpoints Ray Train has registered for a run (a folder alone may still be uploading)."""
    from siclip.train.launch import registered_checkpoints as names

    return len(names(run) or ())
