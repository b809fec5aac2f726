"""Parameter counts of a CLIP model: image tower, text tower, total and trainable (shared tensors once)."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["SASP_CHOICES", "param_counts", "sasp_choice_counts"]


def _count(params: list[nn.Parameter]) -> int:
    # Every list below comes from ``Module.parameters()``, which yields a shared tensor (one Parameter object
    # registered under several names) once, so a plain sum counts it once.
    return sum(p.numel() for p in params)


def param_counts(model: nn.Module) -> dict[str, int]:
    """``{"image", "text", "total", "trainable"}`` parameter counts, each shared tensor counted once.

    ``text`` is everything outside the image tower except the logit scale/bias, so it also works for
    open_clip's plain ``CLIP`` whose text tower lives on the model itself.
    """
    everything = list(model.parameters())
    visual = getattr(model, "visual", None)
    image_params = list(visual.parameters()) if isinstance(visual, nn.Module) else []
    image_ids = {id(p) for p in image_params}
    scalars = {
        id(getattr(model, n)) for n in ("logit_scale", "logit_bias") if getattr(model, n, None) is not None
    }
    text_params = [p for p in everything if id(p) not in image_ids and id(p) not in scalars]
    return {
        "image": _count(image_params),
        "text": _count(text_params),
        "total": _count(everything),
        "trainable": _count([p for p in everything if p.requires_grad]),
    }


SASP_CHOICES: dict[str, dict[str, str]] = {
    "image": {"replace": "image"},
    "image + text, text mixer in pairs": {
        "replace": "both",
        "text_share": "mixer_pairs",
        "text_gains": "unit",
    },
    "image + text, one Q/K per tower": {"replace": "both"},
    "text, mixer in pairs": {"replace": "text", "text_share": "mixer_pairs", "text_gains": "unit"},
}
"""``siclip info``'s simplification choices (``model.sasp`` keys over the given settings): the image tower
alone (the paper's claims), and the text tower simplified too, in pairs as the authors' ``ws_light_mobileclip_s0``
(MCt's layers 1-4, mixers shared 1-2 and 3-4) or with one Q/K for the tower."""


def sasp_choice_counts(name: str, sasp: Any = None) -> dict[str, dict[str, int]]:
    """``param_counts`` of the SAS-P preset ``name`` under each of :data:`SASP_CHOICES` (on top of ``sasp``,
    a :class:`~siclip.config.SaspCfg`; default the schema's), without the ``trainable`` count."""
    import dataclasses

    from siclip.config import SaspCfg
    from siclip.models.presets import build_preset

    base = sasp or SaspCfg()
    out = {}
    for label, keys in SASP_CHOICES.items():
        counts = param_counts(build_preset(name, sasp=dataclasses.replace(base, **keys)))
        out[label] = {k: v for k, v in counts.items() if k != "trainable"}
    return out
