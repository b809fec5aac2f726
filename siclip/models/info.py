"""Parameter counts of a CLIP model: image tower, text tower, total and trainable (shared tensors once)."""

from __future__ import annotations

from torch import nn

__all__ = ["param_counts"]


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
