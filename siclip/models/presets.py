"""Named model presets: each is an open_clip model config, ``siclip/model_configs/<name>.json``, plus its inputs.

| preset | what |
| --- | --- |
| ``mobileclip-s0`` | timm ``fastvit_mci0`` at 256 px + MCt text tower (42.4 M), mean 0 / std 1, bilinear |
| ``siclip-s0`` | ``mobileclip-s0`` simplified with SAS-P blocks |
| ``mobileclip2-s0`` | open_clip's ``MobileCLIP2-S0`` (MCi0 + 12-layer text transformer) |
| ``siclip2-s0`` | ``mobileclip2-s0`` simplified |
| ``tiny-teacher`` | ``siclip_fastvit_tiny`` (2 attention blocks in the last stage) at 64 px + a 2-layer, width-64 |
|  | open_clip text transformer, context 32; trains on 2 CPU cores in minutes |
| ``tiny-student`` | ``tiny-teacher`` simplified |
| ``tiny-mct`` | ``siclip_fastvit_tiny`` + a small MCt tower (dim 64, 2 layers), to exercise MCt in fast tests |

A preset is its config file: after :func:`~siclip.models.registry.register`, ``open_clip.create_model(name)``
builds it (random init, training form), and :func:`build_preset` does exactly that. SAS-P is configuration:
a simplified preset's config carries its :class:`~siclip.config.SaspCfg` in ``vision_cfg.siclip_sasp`` (and
``text_cfg.siclip_sasp`` when the text tower is simplified); ``build_preset(name, sasp=...)`` writes another
one there. A simplified preset's *base* is the preset whose config is the same without SAS-P (``siclip-s0``
-> ``mobileclip-s0``). Configs with a multimodal decoder (the demo captioner's CoCa) are not presets.
Tokenizers are open_clip's ``SimpleTokenizer`` (no download).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from siclip.config import SaspCfg
from siclip.models.registry import CONFIG_DIR, SASP_KEY, register

__all__ = [
    "PresetInfo",
    "build_preset",
    "build_tokenizer",
    "build_transform",
    "list_presets",
    "preset_config",
    "preset_info",
    "sasp_config",
]

MOBILECLIP_MEAN = (0.0, 0.0, 0.0)
MOBILECLIP_STD = (1.0, 1.0, 1.0)
_TOWERS = {"image": "vision_cfg", "text": "text_cfg"}


@dataclass(frozen=True)
class PresetInfo:
    """What a caller needs besides the weights: base preset, preprocessing, context length, embedding size."""

    base: str | None
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    context_length: int
    embed_dim: int


@functools.cache
def _configs() -> dict[str, dict[str, Any]]:
    """Every preset's config, read once from ``siclip/model_configs``."""
    found = {p.stem: json.loads(p.read_text()) for p in sorted(CONFIG_DIR.glob("*.json"))}
    return {name: cfg for name, cfg in found.items() if "multimodal_cfg" not in cfg}


def list_presets() -> list[str]:
    """Every preset name, sorted."""
    return sorted(_configs())


def preset_config(name: str) -> dict[str, Any]:
    """A copy of the preset's open_clip model config (with its SAS-P settings, if any)."""
    if name not in _configs():
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(list_presets())}")
    return copy.deepcopy(_configs()[name])


def _without_sasp(cfg: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(cfg)
    for key in _TOWERS.values():
        out[key].pop(SASP_KEY, None)
    return out


def sasp_config(cfg: dict[str, Any], sasp: SaspCfg) -> dict[str, Any]:
    """A copy of the model config ``cfg`` with its towers simplified as ``sasp`` says (none: no SAS-P).

    Each tower gets the settings :func:`~siclip.models.simplify.tower_sasp` gives it, as
    :func:`~siclip.models.simplify.simplify` would use them.
    """
    from siclip.models.simplify import REPLACED_TOWERS, tower_sasp

    out = _without_sasp(cfg)
    for kind in REPLACED_TOWERS[sasp.replace]:
        out[_TOWERS[kind]][SASP_KEY] = dataclasses.asdict(tower_sasp(sasp, kind))
    return out


def _simplified(cfg: dict[str, Any]) -> bool:
    return any(SASP_KEY in cfg[key] for key in _TOWERS.values())


def _base(name: str) -> str | None:
    """The preset whose config is ``name``'s without SAS-P; None for a preset that is not simplified."""
    cfg = _configs()[name]
    if not _simplified(cfg):
        return None
    plain = _without_sasp(cfg)
    return next((other for other, c in _configs().items() if other != name and c == plain), None)


def _info(cfg: dict[str, Any], *, base: str | None, mobile: bool) -> PresetInfo:
    """PresetInfo from an open_clip model config; keys it leaves out take open_clip's own defaults."""
    import open_clip

    return PresetInfo(
        base=base,
        image_size=int(cfg["vision_cfg"].get("image_size", 224)),
        # MobileCLIP-style models: mean 0 / std 1, bilinear; otherwise open_clip's (OpenAI, bicubic) (docs/platform.md).
        mean=MOBILECLIP_MEAN if mobile else tuple(open_clip.OPENAI_DATASET_MEAN),  # type: ignore[arg-type]
        std=MOBILECLIP_STD if mobile else tuple(open_clip.OPENAI_DATASET_STD),  # type: ignore[arg-type]
        interpolation="bilinear" if mobile else "bicubic",
        context_length=int(cfg["text_cfg"].get("context_length", 77)),
        embed_dim=int(cfg["embed_dim"]),
    )


def _open_clip_info(name: str) -> PresetInfo | None:
    """PresetInfo for a plain open_clip model name (a teacher that is not a preset), else None."""
    import open_clip

    register()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        return None
    return _info(cfg, base=None, mobile=name.lower().startswith("mobileclip"))


def preset_info(name: str) -> PresetInfo:
    """Base preset, image size, normalisation, interpolation, context length and embedding size.

    Also answers for a plain open_clip model name (e.g. a ``ViT-B-32`` teacher) with open_clip's defaults.
    """
    if name not in _configs():
        info = _open_clip_info(name)
        if info is not None:
            return info
    # Every preset here is a MobileCLIP-style model (one config reader for presets and open_clip names).
    return _info(preset_config(name), base=_base(name), mobile=True)


class _QuietNoWeights(logging.Filter):
    """open_clip warns on every random-init build; presets are random-init by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


_QUIET = _QuietNoWeights()


def build_preset(name: str, *, sasp: SaspCfg | None = None) -> nn.Module:
    """Build a preset with random weights in training form (an open_clip ``CustomTextCLIP``).

    A simplified preset takes ``sasp`` instead of its config's SAS-P settings when one is given; ``sasp`` is
    ignored for the others.
    """
    import open_clip

    cfg = preset_config(name)
    if sasp is not None and _simplified(cfg):
        cfg = sasp_config(cfg, sasp)
    register()
    root = logging.getLogger()
    root.addFilter(_QUIET)
    try:
        # the preset's own towers (with the SAS-P settings they get here), whatever else open_clip registered
        return open_clip.create_model(name, vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"])
    finally:
        root.removeFilter(_QUIET)


def build_tokenizer(name: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's ``SimpleTokenizer`` at the preset's context length: ``list[str] -> LongTensor [B, L]``.

    For a plain open_clip model name, that model's own tokenizer (``open_clip.get_tokenizer``).
    """
    if name not in _configs() and _open_clip_info(name) is not None:
        import open_clip

        return open_clip.get_tokenizer(name)  # the open_clip model's own tokenizer (teachers)
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=preset_info(name).context_length)


def build_transform(name: str, *, train: bool, image_size: int = 0) -> Callable[[Any], torch.Tensor]:
    """open_clip's ``image_transform`` with the preset's size (or ``image_size``), mean/std and resize."""
    from open_clip.transform import image_transform

    info = preset_info(name)
    return image_transform(
        image_size or info.image_size,
        is_train=train,
        mean=info.mean,
        std=info.std,
        interpolation=info.interpolation,
    )
