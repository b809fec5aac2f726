"""Checkpoint files (Ray-free): model weights as safetensors, training state loadable with weights_only=True.

A checkpoint folder holds ``model.safetensors`` (the task: ``student.*`` and ``loss.*``; tensors shared by
SAS-P weight sharing are stored once) and ``train_state.pt`` (optimizer, scheduler, grad scaler, counters,
RNG states; plain tensors and Python numbers only). A student-only export (``final/``) holds the student's
``model.safetensors`` with unprefixed keys, which weight inheritance and ``siclip eval`` read directly.
Files are written to a temporary folder and renamed, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

__all__ = [
    "MODEL_FILE",
    "STATE_FILE",
    "fetch_model_file",
    "find_model_file",
    "load_checkpoint",
    "load_student_weights",
    "save_checkpoint",
    "save_student",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"


def _rng_state() -> dict[str, Any]:
    """Every global generator's full state, as plain tensors (``weights_only`` loading accepts them).

    The states are read, never advanced, so writing a checkpoint does not change the run's random stream.
    """
    version, mt, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor([version, *mt], dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "python" not in state:  # checkpoints written before the full states were kept
        random.seed(int(state["python_seed"]))
        np.random.seed(int(state["python_seed"]) % (2**32))
        return
    version, *mt = (int(v) for v in state["python"].tolist())
    gauss = state["python_gauss"].tolist()
    random.setstate((version, tuple(mt), gauss[0] if gauss else None))
    pos, has_gauss, np_gauss = state["numpy_extra"].tolist()
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(pos), int(has_gauss), float(np_gauss)))


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_checkpoint(
    folder: str | os.PathLike[str],
    *,
    task: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any | None,
    counters: Mapping[str, int | float],
) -> Path:
    """Write a complete checkpoint to ``folder`` atomically (temp folder + rename)."""
    final = Path(folder)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(task, str(tmp / MODEL_FILE))
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "counters": dict(counters),
        "rng": _rng_state(),
    }
    torch.save(state, tmp / STATE_FILE)
    _replace_dir(tmp, final)
    return final


def load_checkpoint(
    folder: str | os.PathLike[str],
    *,
    task: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
) -> dict[str, int | float]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns its counters (step, ...)."""
    folder = Path(folder)
    load_model(task, str(folder / MODEL_FILE), strict=True)
    state = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    return dict(state["counters"])


def save_student(student: nn.Module, folder: str | os.PathLike[str]) -> Path:
    """Export the student alone (unprefixed keys) to ``folder/model.safetensors``."""
    final = Path(folder)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(student, str(tmp / MODEL_FILE))
    _replace_dir(tmp, final)
    return final / MODEL_FILE


def find_model_file(path: str | os.PathLike[str]) -> Path:
    """Resolve ``--checkpoint``: a weights file, a checkpoint folder, or a run folder (final or latest)."""
    p = Path(path)
    if p.is_file():
        return p
    if (p / MODEL_FILE).is_file():
        return p / MODEL_FILE
    if (p / "final" / MODEL_FILE).is_file():
        return p / "final" / MODEL_FILE
    ckpts = sorted(p.glob("checkpoint_*/" + MODEL_FILE))
    if ckpts:
        return ckpts[-1]
    raise FileNotFoundError(
        f"--checkpoint: got {str(path)!r}; no {MODEL_FILE} in it, in final/ or in checkpoint_*/"
    )


def fetch_model_file(location: str, folder: str | os.PathLike[str]) -> Path:
    """``find_model_file`` for a URI (``s3://...``): download only the one weights file it names.

    Tries, in ``find_model_file``'s order, the URI itself, its ``model.safetensors``, its ``final/`` and
    its latest ``checkpoint_*`` folder; the file lands in ``folder``.
    """
    from siclip import storage

    candidates = [location, storage.join(location, MODEL_FILE), storage.join(location, "final", MODEL_FILE)]
    ckpts = [n for n in storage.list_dirs(location) if n.startswith("checkpoint_")]
    candidates += [storage.join(location, name, MODEL_FILE) for name in sorted(ckpts, reverse=True)]
    for candidate in candidates:
        if candidate.endswith((".safetensors", ".pt", ".pth", ".bin")) and storage.exists(candidate):
            return storage.download(candidate, Path(folder) / candidate.rsplit("/", 1)[-1])
    raise FileNotFoundError(
        f"--checkpoint: got {location!r}; no {MODEL_FILE} in it, in final/ or in checkpoint_*/"
    )


def load_student_weights(student: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Load student weights from a student export or a full task checkpoint (``student.`` prefix).

    ``path`` may be a URI (``s3://BUCKET/runs/NAME``): the weights file is downloaded to a temporary folder.
    """
    from siclip.config import is_uri

    if is_uri(str(path)):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="siclip-ckpt-") as tmp:
            load_student_weights(student, fetch_model_file(str(path), tmp))
        return Path(str(path))
    file = find_model_file(path)
    if file.suffix != ".safetensors":
        from siclip.models.inherit import load_source_state_dict

        student.load_state_dict(load_source_state_dict(str(file)), strict=True)
        return file
    with safe_open(str(file), framework="pt") as f:
        prefixed = any(k.startswith("student.") for k in f.keys())  # noqa: SIM118 (safe_open has no __iter__)
    if not prefixed:
        load_model(student, str(file), strict=True)
        return file
    holder = nn.Module()
    holder.student = student
    missing, _unexpected = load_model(holder, str(file), strict=False)  # loss.* keys are not needed here
    if missing:
        raise KeyError(f"{file}: missing student weights: {', '.join(sorted(missing)[:8])}")
    return file
