"""Small builders shared by integration and end-to-end tests: a tiny demo world and configs pointing at it."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from siclip.config import apply_overrides
from siclip.demo import CONFIGS, rebase_demo_paths

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
    data = rebase_demo_paths(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), str(root))
    data["data"]["train_shards"] = [str(root / "world" / "web" / "web-*.tar")]
    data = apply_overrides(data, overrides)
    path = root / out
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


AVX2_KERNELS = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
"""oneDNN's AVX2 kernels, as an AVX2-only CPU runs them (some crash where AVX-512 ones do not)."""


def subprocess_env() -> dict[str, str]:
    """The environment of every child process the tests start: AVX2 kernels unless the caller chose an ISA,
    so a kernel that crashes on AVX2-only machines fails the suite on any x86 machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONUNBUFFERED"] = "1"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    for key, value in AVX2_KERNELS.items():
        env.setdefault(key, value)
    return env


def child_report(proc: subprocess.CompletedProcess[str], *, tail: int = 4000) -> str:
    """How a child process ended (the signal named when one killed it) and the end of its output."""
    code = proc.returncode
    if code is not None and code < 0:
        try:
            how = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"killed by signal {-code}"
    else:
        how = f"exit status {code}"
    out = (proc.stdout or "") + (proc.stderr or "")
    return f"child {how}; output ends:\n{out[-tail:]}"


SICLIP = [sys.executable, "-m", "siclip.cli"]


def registered_checkpoints(run: Path) -> int:
    """Checkpoints Ray Train has registered for a run (a folder alone may still be uploading)."""
    from siclip.train.launch import registered_checkpoints as names

    return len(names(run) or ())


def save_state_dict(sd: dict, path: Path) -> Path:
    """Write a state dict as the file its suffix names (``.safetensors``, else ``torch.save``)."""
    import torch
    from safetensors.torch import save_file

    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


def same_state(a: dict, b: dict) -> bool:
    """The same keys, and every tensor equal."""
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
