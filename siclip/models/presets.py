"""Named model presets (timm style): real MobileCLIP/SiCLIP models and tiny CPU ones, plus their inputs.

| preset | what |
| --- | --- |
| ``mobileclip-s0`` | timm ``fastvit_mci0`` at 256 px + MCt text tower (42.4 M), mean 0 / std 1, bilinear |
| ``siclip-s0`` | ``mobileclip-s0`` simplified with SAS-P blocks (the :class:`SaspCfg` passed in) |
| ``mobileclip2-s0`` | open_clip's ``MobileCLIP2-S0`` (MCi0 + 12-layer text transformer) |
| ``siclip2-s0`` | ``mobileclip2-s0`` simplified |
| ``tiny-teacher`` | ``siclip_fastvit_tiny`` (2 attention blocks in the last stage) at 64 px + a 2-layer, width-64 |
|  | open_clip text transformer, context 32; trains on 2 CPU cores in minutes |
| ``tiny-student`` | ``tiny-teacher`` simplified |
| ``tiny-mct`` | ``siclip_fastvit_tiny`` + a small MCt tower (dim 64, 2 layers), to exercise MCt in fast tests |

Every preset is an open_clip model config in ``siclip/model_configs`` built with ``open_clip.create_model``
(random init, training form); simplified presets build their base and call
:func:`~siclip.models.simplify.simplify`. Tokenizers are open_clip's ``SimpleTokenizer`` (no download).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from siclip.config import SaspCfg

__all__ = [
    "PresetInfo",
    "build_preset",
    "build_tokenizer",
    "build_transform",
    "list_presets",
    "preset_config",
    "preset_info",
]

MOBILECLIP_MEAN = (0.0, 0.0, 0.0)
MOBILECLIP_STD = (1.0, 1.0, 1.0)


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


@dataclass(frozen=True)
class _Preset:
    config: str
    """The open_clip model config of the base (unsimplified) architecture."""
    base: str | None = None


_PRESETS: dict[str, _Preset] = {
    "mobileclip-s0": _Preset("siclip-mobileclip-s0"),
    "siclip-s0": _Preset("siclip-mobileclip-s0", base="mobileclip-s0"),
    "mobileclip2-s0": _Preset("MobileCLIP2-S0"),
    "siclip2-s0": _Preset("MobileCLIP2-S0", base="mobileclip2-s0"),
    "tiny-teacher": _Preset("siclip-tiny-teacher"),
    "tiny-student": _Preset("siclip-tiny-teacher", base="tiny-teacher"),
    "tiny-mct": _Preset("siclip-tiny-mct"),
}


def list_presets() -> list[str]:
    """Every preset name, sorted."""
    return sorted(_PRESETS)


def _spec(name: str) -> _Preset:
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(list_presets())}")
    return _PRESETS[name]


def preset_config(name: str) -> dict[str, Any]:
    """A copy of the open_clip model config (dict) of the preset's base architecture."""
    import open_clip

    from siclip.models.hooks import register

    register()
    cfg = open_clip.get_model_config(_spec(name).config)
    if cfg is None:
        raise RuntimeError(f"open_clip has no model config {_spec(name).config!r} (register() failed?)")
    return cfg


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

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        return None
    return _info(cfg, base=None, mobile=name.lower().startswith("mobileclip"))


def preset_info(name: str) -> PresetInfo:
    """Base preset, image size, normalisation, interpolation, context length and embedding size.

    Also answers for a plain open_clip model name (e.g. a ``ViT-B-32`` teacher) with open_clip's defaults.
    """
    if name not in _PRESETS:
        from siclip.models.hooks import register

        register()
        info = _open_clip_info(name)
        if info is not None:
            return info
    # Every preset here is a MobileCLIP-style model (one config reader for presets and open_clip names).
    return _info(preset_config(name), base=_spec(name).base, mobile=True)


class _QuietNoWeights(logging.Filter):
    """open_clip warns on every random-init build; presets are random-init by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


_QUIET = _QuietNoWeights()


def build_preset(name: str, *, sasp: SaspCfg | None = None) -> nn.Module:
    """Build a preset with random weights in training form (an open_clip ``CustomTextCLIP``).

    Simplified presets build their base and apply ``sasp or SaspCfg()``; ``sasp`` is ignored for the
    others.
    """
    spec = _spec(name)
    if spec.base is not None:
        from siclip.models.simplify import simplify

        model = build_preset(spec.base)
        simplify(model, sasp or SaspCfg())
        return model
    import open_clip

    from siclip.models.hooks import register

    register()
    root = logging.getLogger()
    root.addFilter(_QUIET)
    try:
        return open_clip.create_model(spec.config)
    finally:
        root.removeFilter(_QUIET)


def build_tokenizer(name: str) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's ``SimpleTokenizer`` at the preset's context length: ``list[str] -> LongTensor [B, L]``.

    For a plain open_clip model name, that model's own tokenizer (``open_clip.get_tokenizer``).
    """
    if name not in _PRESETS and _open_clip_info(name) is not None:
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
