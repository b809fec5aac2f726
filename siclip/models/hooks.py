"""What open_clip needs to build siclip's models by name: configs, a tiny timm FastViT, two tower hooks.

:func:`register` (idempotent; every siclip builder calls it) does three things:

1. registers ``siclip_fastvit_tiny`` with timm: a small FastViT shaped like MCi0 (RepMixer stages, then
   **two attention blocks in the last stage**, conditional positional encoding) for 64 px CPU tests;
2. adds ``siclip/model_configs/`` to open_clip's model configs (``siclip-mobileclip-s0``, ``siclip-s0``,
   ``siclip2-s0``, ``siclip-tiny-teacher``, ``siclip-tiny-student``, ``siclip-tiny-mct``, ...);
3. wraps ``open_clip.model._build_vision_tower`` / ``_build_text_tower`` so a tower config may carry two
   extra keys that open_clip itself does not know:

   - ``text_cfg["siclip_tower"] = {"kind": "mct", ...MCtTextEncoder kwargs}`` builds the MCt text tower;
   - ``vision_cfg["siclip_sasp"]`` / ``text_cfg["siclip_sasp"] = {SaspCfg fields}`` builds the tower as
     usual, then simplifies it with SAS-P blocks (structure only; weights are loaded afterwards).

With the hook in place, ``open_clip.create_model("siclip-s0")`` and
``open_clip.create_model_and_transforms("local-dir:" + export_dir)`` rebuild siclip models; without it
(plain open_clip) the extra keys are rejected by open_clip's config dataclasses, so a missing
``register()`` fails loudly instead of building the wrong model.
"""

from __future__ import annotations

from functools import partial, wraps
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["CONFIG_DIR", "register"]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_STATE = {"done": False}


def siclip_fastvit_tiny(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """FastViT with small widths: RepMixer, RepMixer, then 2 attention blocks (4 heads, 4x4 tokens at 64 px)."""
    from timm.models.fastvit import RepConditionalPosEnc, _create_fastvit

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
    return _create_fastvit("siclip_fastvit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


def _register_timm() -> None:
    import timm
    from timm.models import register_model

    if "siclip_fastvit_tiny" not in timm.list_models("siclip_*"):
        register_model(siclip_fastvit_tiny)


def _wrap_builders() -> None:
    import open_clip.model as oc_model

    from siclip.config import SaspCfg

    orig_vision = oc_model._build_vision_tower
    orig_text = oc_model._build_text_tower

    def _sasp(cfg: dict[str, Any]) -> SaspCfg:
        return SaspCfg(**cfg)

    @wraps(orig_vision)
    def build_vision(embed_dim: int, vision_cfg: Any, *args: Any, **kwargs: Any) -> nn.Module:
        sasp = None
        if isinstance(vision_cfg, dict) and "siclip_sasp" in vision_cfg:
            vision_cfg = dict(vision_cfg)
            sasp = _sasp(vision_cfg.pop("siclip_sasp"))
        visual = orig_vision(embed_dim, vision_cfg, *args, **kwargs)
        if sasp is not None:
            from siclip.models.simplify import simplify_tower

            simplify_tower(visual, sasp)
        return visual

    @wraps(orig_text)
    def build_text(embed_dim: int, text_cfg: Any, *args: Any, **kwargs: Any) -> nn.Module:
        sasp = tower = None
        if isinstance(text_cfg, dict) and ("siclip_sasp" in text_cfg or "siclip_tower" in text_cfg):
            text_cfg = dict(text_cfg)
            sasp = _sasp(text_cfg.pop("siclip_sasp")) if "siclip_sasp" in text_cfg else None
            tower = text_cfg.pop("siclip_tower", None)
        if tower is not None:
            from siclip.models.mct import build_mct

            spec = dict(tower)
            kind = spec.pop("kind", "mct")
            if kind != "mct":
                raise ValueError(f"text_cfg.siclip_tower.kind: got {kind!r}; allowed: 'mct'")
            text: nn.Module = build_mct(
                embed_dim,
                context_length=text_cfg.get("context_length", 77),
                vocab_size=text_cfg.get("vocab_size", 49408),
                **spec,
            )
        else:
            text = orig_text(embed_dim, text_cfg, *args, **kwargs)
        if sasp is not None:
            from siclip.models.simplify import simplify_tower

            simplify_tower(text, sasp)
        return text

    # Each builder is wrapped at most once, even if this module is reloaded (fresh _STATE).
    if not getattr(orig_vision, "_siclip", False):
        build_vision._siclip = True  # type: ignore[attr-defined]
        oc_model._build_vision_tower = build_vision
    if not getattr(orig_text, "_siclip", False):
        build_text._siclip = True  # type: ignore[attr-defined]
        oc_model._build_text_tower = build_text


def register() -> None:
    """Make open_clip able to build every siclip preset and export (idempotent, cheap after the first call)."""
    if _STATE["done"]:
        return
    import open_clip

    _register_timm()
    _wrap_builders()
    open_clip.add_model_config(CONFIG_DIR)
    _STATE["done"] = True
