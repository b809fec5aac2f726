"""Inference form and open_clip export of siclip models.

- :func:`reparameterize`: fuse RepMixer / MobileOne / conditional-position branches for inference
  (``timm.utils.reparameterize_model``; MCt's RepMixer fuses through the same walk) and compute SAS-P
  shaped attention without its ``N x N`` identity and centring matrices. Train and checkpoint in the
  unfused form; fuse only the copy you run.
- :func:`export_open_clip`: write ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and
  ``open_clip_model.safetensors`` so that, after :func:`siclip.models.registry.register`,
  ``open_clip.create_model_and_transforms("local-dir:" + out_dir)`` rebuilds the model with the same
  weights and preprocessing. SAS-P towers are recorded as ``vision_cfg.siclip_sasp`` /
  ``text_cfg.siclip_sasp`` and MCt as ``text_cfg.siclip_tower``; plain open_clip (without ``register()``)
  refuses those keys rather than building a different model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["export_model_cfg", "export_open_clip", "is_reparameterized", "load_exported", "reparameterize"]

MODEL_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"


def reparameterize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The fused inference form in eval mode (a copy unless ``inplace``); shared tensors stay shared.

    SAS-P shaped attention switches to :class:`~siclip.models.sasp.InferenceShapedAttention`, which never
    builds the ``alpha*I`` and ``gamma*C`` matrices (same parameters, same outputs).
    """
    from timm.utils import reparameterize_model

    from siclip.models.sasp import to_inference

    fused = reparameterize_model(model, inplace=inplace)
    to_inference(fused)
    return fused.eval()


def is_reparameterized(model: nn.Module) -> bool:
    """True when some branch has been fused (its ``reparam_conv`` exists)."""
    return any(getattr(m, "reparam_conv", None) is not None for m in model.modules())


def export_model_cfg(model: nn.Module, preset_name: str) -> dict[str, Any]:
    """The open_clip ``model_cfg`` that rebuilds ``model`` (a ``preset_name`` model, maybe simplified)."""
    from siclip.models.presets import preset_config
    from siclip.models.registry import SASP_KEY
    from siclip.models.simplify import towers

    cfg = preset_config(preset_name)
    parts = towers(model)
    for kind, key in (("image", "vision_cfg"), ("text", "text_cfg")):
        cfg[key].pop(SASP_KEY, None)
        marker = getattr(parts.get(kind), "siclip_sasp", None)  # what simplify() did to this tower
        if marker:
            cfg[key][SASP_KEY] = dict(marker["cfg"])
    return cfg


def export_open_clip(model: nn.Module, preset_name: str, out_dir: str | Path) -> Path:
    """Write ``model`` (training form) as an open_clip ``local-dir`` folder; returns the folder."""
    from safetensors.torch import save_file

    from siclip.models.presets import preset_info

    if is_reparameterized(model):
        raise ValueError("export_open_clip needs the training (unfused) form; export before reparameterize()")
    info = preset_info(preset_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": export_model_cfg(model, preset_name),
        "preprocess_cfg": {
            "size": info.image_size,
            "mean": list(info.mean),
            "std": list(info.std),
            "interpolation": info.interpolation,
            "resize_mode": "shortest",
        },
        "siclip": {
            "preset": preset_name,
            "note": "call siclip.models.registry.register() before open_clip loads this",
        },
    }
    # open_clip loads strictly by name, so shared tensors are written once per name (copies, same values).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out / (MODEL_FILE + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(out / MODEL_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_exported(out_dir: str | Path) -> tuple[nn.Module, Any]:
    """``open_clip.create_model_and_transforms("local-dir:...")`` after :func:`~siclip.models.registry.register`.

    Returns ``(model, eval_transform)``.
    """
    import open_clip

    from siclip.models.registry import register

    register()
    model, _train_tf, eval_tf = open_clip.create_model_and_transforms("local-dir:" + str(out_dir))
    return model, eval_tf
