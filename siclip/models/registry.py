"""register(): makes open_clip build siclip's model configs by name, and reload siclip's exports.

:func:`register` (idempotent; every siclip builder calls it) does three things, each only if not done yet:

1. registers ``siclip_fastvit_tiny`` with timm: a small FastViT shaped like MCi0 (RepMixer stages, then
   **two attention blocks in the last stage**, conditional positional encoding) for 64 px CPU tests;
2. adds ``siclip/model_configs/`` (:data:`CONFIG_DIR`) to open_clip's model configs: every preset of
   ``siclip.models.presets`` under its own name, and the demo captioner ``siclip-tiny-coca``;
3. routes open_clip's tower builders through siclip (``siclip.openclip_compat.wrap_tower_builders``), so a
   tower config may carry two keys that open_clip itself does not know:

   - ``text_cfg["siclip_tower"] = {"kind": "mct", ...MCtTextEncoder kwargs}`` builds the MCt text tower;
   - ``vision_cfg["siclip_sasp"]`` / ``text_cfg["siclip_sasp"] = {SaspCfg fields}`` builds the tower as
     usual, then simplifies it with SAS-P blocks (structure only; weights are loaded afterwards).

With it, ``open_clip.create_model("siclip-s0")`` and ``open_clip.create_model_and_transforms("local-dir:" +
export_dir)`` build siclip models; without it (plain open_clip) the extra keys are rejected by open_clip's
config dataclasses, so a missing ``register()`` fails loudly instead of building the wrong model.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["CONFIG_DIR", "SASP_KEY", "TOWER_KEY", "register", "siclip_fastvit_tiny"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
SASP_KEY = "siclip_sasp"
"""A tower config's SAS-P settings: the fields of a :class:`~siclip.config.SaspCfg` for that tower."""
TOWER_KEY = "siclip_tower"
"""A text config's siclip-built tower: ``{"kind": "mct", ...}``."""


def siclip_fastvit_tiny(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """FastViT with small widths: RepMixer, RepMixer, then 2 attention blocks (4 heads, 4x4 tokens at 64 px)."""
    from timm.models import build_model_with_cfg
    from timm.models.fastvit import FastVit, RepConditionalPosEnc

    model_args: dict[str, Any] = dict(
        layers=(1, 1, 2),
        embed_dims=(32, 64, 128),
        mlp_ratios=(3, 3, 3),
        downsamples=(False, True, True),
        se_downsamples=(False, False, True),
        pos_embs=(None, None, partial(RepConditionalPosEnc, spatial_shape=(3, 3))),
        token_mixers=("repmixer", "repmixer", "attention"),
        lkc_use_act=True,
    )
    if kwargs.get("pretrained_cfg") is None:  # timm.create_model passes None explicitly
        kwargs["pretrained_cfg"] = {"num_classes": 0, "input_size": (3, 64, 64), "pool_size": (2, 2)}
    model: nn.Module = build_model_with_cfg(
        FastVit, "siclip_fastvit_tiny", pretrained, **dict(model_args, **kwargs)
    )
    return model


def _build_vision(build: Any, embed_dim: int, vision_cfg: Any, *args: Any, **kwargs: Any) -> nn.Module:
    sasp = None
    if isinstance(vision_cfg, dict) and SASP_KEY in vision_cfg:
        vision_cfg = dict(vision_cfg)
        sasp = vision_cfg.pop(SASP_KEY)
    visual: nn.Module = build(embed_dim, vision_cfg, *args, **kwargs)
    if sasp is not None:
        _simplify(visual, sasp, "vision_cfg")
    return visual


def _build_text(build: Any, embed_dim: int, text_cfg: Any, *args: Any, **kwargs: Any) -> nn.Module:
    sasp = tower = None
    if isinstance(text_cfg, dict) and (SASP_KEY in text_cfg or TOWER_KEY in text_cfg):
        text_cfg = dict(text_cfg)
        sasp = text_cfg.pop(SASP_KEY, None)
        tower = text_cfg.pop(TOWER_KEY, None)
    if tower is not None:
        from siclip.models.mct import build_mct

        spec = dict(tower)
        kind = spec.pop("kind", "mct")
        if kind != "mct":
            raise ValueError(f"text_cfg.{TOWER_KEY}.kind: got {kind!r}; allowed: 'mct'")
        text: nn.Module = build_mct(
            embed_dim,
            context_length=text_cfg.get("context_length", 77),
            vocab_size=text_cfg.get("vocab_size", 49408),
            **spec,
        )
    else:
        text = build(embed_dim, text_cfg, *args, **kwargs)
    if sasp is not None:
        _simplify(text, sasp, "text_cfg")
    return text


def _simplify(tower: nn.Module, fields: dict[str, Any], where: str) -> None:
    from siclip.config import SaspCfg
    from siclip.models.simplify import simplify_tower

    if not simplify_tower(tower, SaspCfg(**fields)):
        raise ValueError(
            f"{where}.{SASP_KEY}: no attention block to replace in this tower ({type(tower).__name__})"
        )


def register() -> None:
    """Make open_clip able to build every siclip preset and export (idempotent)."""
    import open_clip
    import timm
    from timm.models import register_model

    from siclip.openclip_compat import wrap_tower_builders

    if "siclip_fastvit_tiny" not in timm.list_models("siclip_*"):
        register_model(siclip_fastvit_tiny)
    wrap_tower_builders(_build_vision, _build_text)
    known = set(open_clip.list_models())
    if any(p.stem not in known for p in CONFIG_DIR.glob("*.json")):
        open_clip.add_model_config(CONFIG_DIR)
