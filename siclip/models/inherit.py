"""Weight inheritance (WI): read source weights, copy them into a model, freeze what was inherited.

- :func:`load_source_state_dict`: ``MODEL:TAG`` (open_clip pretrained), ``.pt/.pth/.bin`` (``weights_only``),
  ``.safetensors``, or ``local-dir:PATH`` (``open_clip_config.json`` + weights). Apple MobileCLIP checkpoints
  (``text_encoder.*`` / ``image_encoder.*``) are converted to this project's layout on the way in.
- :func:`inherit_weights`: copy every matching tensor and report what was inherited, what is new (SAS-P
  blocks), what the source has that the model dropped (replaced blocks) and what does not fit.
- :func:`freeze_inherited`: freeze every module outside the SAS-P blocks (``requires_grad_(False)`` and
  kept in eval mode so BatchNorm statistics never move).
- :func:`set_train_mode`: ``model.train(mode)`` that keeps frozen modules in eval mode.

``siclip.models.build`` puts these together into the student and the teacher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from siclip.models.sasp import is_sasp
from siclip.storage import is_remote

__all__ = [
    "InheritError",
    "InheritReport",
    "freeze_inherited",
    "inherit_weights",
    "load_source_state_dict",
    "set_train_mode",
]

_FROZEN_ATTR = "_siclip_frozen"
_WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)
# Parameters a student may have that a source need not provide (they are not architecture).
_OPTIONAL_KEYS = ("logit_bias",)


class InheritError(ValueError):
    """The source weights do not fit the model; the message names the offending keys."""


@dataclass
class InheritReport:
    """What :func:`inherit_weights` did, key by key."""

    inherited: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    """Model keys the source lacks that are expected to be new (SAS-P blocks, optional parameters)."""
    dropped: list[str] = field(default_factory=list)
    """Source keys of blocks that simplification replaced."""
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Counts plus the first few keys of every problem list (for logs and run folders)."""
        out: dict[str, Any] = {k: len(getattr(self, k)) for k in ("inherited", "new", "dropped")}
        for k in ("missing", "mismatched", "unexpected"):
            out[k] = getattr(self, k)[:10]
        return out


# ----------------------------------------------------------------------------------------- loading
def _strip_module(sd: dict[str, Any]) -> dict[str, Any]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: dict[str, Any] = load_file(str(path), device="cpu")
    else:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        sd = obj
        for key in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                sd = obj[key]
                break
        if not isinstance(sd, dict):
            raise InheritError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    sd = _strip_module(sd)
    if any(k.startswith("student.") for k in sd) and not any(k.startswith("visual.") for k in sd):
        # a siclip task checkpoint (student + loss [+ teacher]): the student's weights are the source
        sd = {k[len("student.") :]: v for k, v in sd.items() if k.startswith("student.")}
    if any(k.startswith(("text_encoder.", "image_encoder.")) for k in sd):
        from siclip.models.mct import convert_apple_state_dict

        sd = convert_apple_state_dict(sd)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def load_source_state_dict(source: str) -> dict[str, torch.Tensor]:
    """The state dict named by ``source``: a file, ``local-dir:PATH`` or an open_clip ``MODEL:TAG``."""
    if source.startswith("local-dir:"):
        folder = Path(source[len("local-dir:") :])
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{source}: no open_clip_config.json in {folder}")
        json.loads((folder / "open_clip_config.json").read_text())  # fail early on a broken config
        for name in _WEIGHT_FILES:
            if (folder / name).is_file():
                return _load_file(folder / name)
        found = sorted(
            p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt")
        )
        if len(found) == 1:
            return _load_file(folder / found[0])
        raise FileNotFoundError(f"{source}: no (single) weights file in {folder}; found {found}")
    path = Path(source)
    if is_remote(source) and path.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        # a weights file in object storage (s3://...): every node reads it from there, none from its disk
        import tempfile

        from siclip import storage

        with tempfile.TemporaryDirectory(prefix="siclip-source-") as tmp:
            return _load_file(storage.download(source, Path(tmp) / path.name))
    if path.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such checkpoint file")
        return _load_file(path)
    if ":" in source:
        import open_clip

        from siclip.models.registry import register

        register()  # MODEL may be a siclip preset
        model_name, tag = source.split(":", 1)
        model = open_clip.create_model(model_name, pretrained=tag)  # downloads (needs network) or uses cache
        return dict(model.state_dict())
    raise ValueError(
        f"source: got {source!r}; allowed: an open_clip MODEL:TAG, a .pt/.pth/.bin/.safetensors file, or local-dir:PATH"
    )


# ----------------------------------------------------------------------------------------- inheriting
def _under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def inherit_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, strict: bool = True
) -> InheritReport:
    """Copy ``state_dict`` into ``model`` where names and shapes match; report the rest.

    Keys under SAS-P modules (and ``logit_bias``) may be absent from the source (``new``); source keys of
    blocks that simplification replaced are ``dropped``. With ``strict`` any other missing, mismatched or
    unexpected key raises :class:`InheritError` naming them, and nothing is loaded.
    """
    from siclip.models.simplify import replaced_prefixes

    sasp_prefixes = [n for n, m in model.named_modules(remove_duplicate=False) if is_sasp(m) and n]
    dropped_prefixes = replaced_prefixes(model)
    target = model.state_dict(keep_vars=True)
    # Shared tensors appear under several names; a source saved with safetensors' save_model keeps one.
    alias: dict[int, list[str]] = {}
    for k, v in target.items():
        alias.setdefault(v.data_ptr() if v.numel() else id(v), []).append(k)
    report = InheritReport()
    to_load: dict[str, torch.Tensor] = {}
    for key, value in target.items():
        src_key = key
        if key not in state_dict:
            ptr = value.data_ptr() if value.numel() else id(value)
            src_key = next((a for a in alias[ptr] if a in state_dict), "")
        if not src_key:
            if _under(key, sasp_prefixes) or key in _OPTIONAL_KEYS:
                report.new.append(key)
            else:
                report.missing.append(key)
            continue
        src = state_dict[src_key]
        if tuple(src.shape) != tuple(value.shape):
            if src.numel() == value.numel() and key == "logit_scale":
                src = src.reshape(value.shape)
            else:
                report.mismatched.append(f"{key}: source {tuple(src.shape)} vs model {tuple(value.shape)}")
                continue
        to_load[key] = src
        report.inherited.append(key)
    for key in state_dict:
        if key not in target:
            (report.dropped if _under(key, dropped_prefixes) else report.unexpected).append(key)
    problems = [
        (n, getattr(report, n)) for n in ("missing", "mismatched", "unexpected") if getattr(report, n)
    ]
    if strict and problems:
        raise InheritError(
            "source weights do not fit the model: "
            + "; ".join(
                f"{n} {len(keys)}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                for n, keys in problems
            )
        )
    with torch.no_grad():
        for key, src in to_load.items():
            target[key].copy_(src.to(dtype=target[key].dtype, device=target[key].device))
    return report


# ----------------------------------------------------------------------------------------- freezing
def freeze_inherited(model: nn.Module, *, freeze_bn_stats: bool = True) -> list[str]:
    """Freeze every module outside the SAS-P blocks; returns the frozen top-most module names.

    Frozen: ``requires_grad_(False)`` and, with ``freeze_bn_stats``, ``eval()`` and a marker so
    :func:`set_train_mode` keeps them in eval (BatchNorm statistics never move). Without it they follow the
    model's train/eval mode, as in the authors' code. Trainable: SAS-P blocks, ``logit_scale``, ``logit_bias``.
    """
    sasp_names = [n for n, m in model.named_modules() if is_sasp(m)]

    def holds_sasp(name: str) -> bool:
        return any(s == name or s.startswith(name + ".") if name else True for s in sasp_names)

    def inside_sasp(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in sasp_names)

    model.requires_grad_(False)
    for name in sasp_names:
        model.get_submodule(name).requires_grad_(True)
    for pname in ("logit_scale", "logit_bias"):
        p = getattr(model, pname, None)
        if isinstance(p, nn.Parameter):
            p.requires_grad_(True)
    frozen: list[str] = []
    for name, m in model.named_modules():
        if inside_sasp(name) or holds_sasp(name):
            continue
        if any(f == "" or name.startswith(f + ".") for f in frozen):
            continue
        if freeze_bn_stats:
            setattr(m, _FROZEN_ATTR, True)
            m.eval()
        frozen.append(name)
    return frozen


def set_train_mode(model: nn.Module, train: bool = True) -> nn.Module:
    """``model.train(train)``, then put frozen (inherited) modules back in eval mode."""
    model.train(train)
    if train:
        for m in model.modules():
            if getattr(m, _FROZEN_ATTR, False):
                m.eval()
    return model
