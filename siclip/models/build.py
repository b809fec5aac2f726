"""The student and the teacher, built from their configs: presets, weight inheritance, SAS-P, freezing.

- :func:`build_student`: base preset -> exact load of ``model.source`` -> :func:`~siclip.models.simplify.simplify`
  (so Q/K and MLP inherit from the loaded attention blocks) -> freeze every unchanged module
  (:func:`~siclip.models.inherit.freeze_inherited`). SAS-P blocks and the logit scale/bias train.
- :func:`build_teacher`: a preset (or any open_clip model) + ``teacher.source`` weights, frozen, eval mode.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from siclip.config import ModelCfg, TeacherCfg
from siclip.models.inherit import InheritReport, freeze_inherited, inherit_weights, load_source_state_dict

__all__ = ["build_student", "build_teacher"]


def build_student(cfg: ModelCfg) -> tuple[nn.Module, InheritReport | None]:
    """The student: base preset, ``cfg.source`` weights (exact) when inheriting, SAS-P swap, freezing.

    Without inheritance (or without a source) every parameter is trainable: the ablation baseline.
    """
    from siclip.models.presets import build_preset, preset_info
    from siclip.models.simplify import sasp_module_names, simplify

    base = preset_info(cfg.name).base
    model = build_preset(base or cfg.name)
    report: InheritReport | None = None
    inheriting = bool(cfg.inherit and cfg.source)
    if inheriting:
        report = inherit_weights(model, load_source_state_dict(cfg.source), strict=True)
    if base is not None:
        simplify(model, cfg.sasp)
        if report is not None:
            names = sasp_module_names(model)
            report.new = [k for k in model.state_dict() if any(k.startswith(n + ".") for n in names)]
    if inheriting and cfg.freeze_inherited:
        freeze_inherited(model, freeze_bn_stats=cfg.freeze_bn_stats)
    logit_scale = getattr(model, "logit_scale", None)
    if cfg.freeze_logit_scale and isinstance(logit_scale, nn.Parameter):
        logit_scale.requires_grad_(False)
    if inheriting and cfg.freeze_inherited:
        logging.getLogger(__name__).info(
            "student %s: %d trainable of %d parameters",
            cfg.name,
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()),
        )
    return model, report


def build_teacher(cfg: TeacherCfg) -> nn.Module:
    """A frozen teacher in eval mode: a preset (or an open_clip model name) with ``cfg.source`` weights."""
    from siclip.models.presets import build_preset, list_presets

    if cfg.name in list_presets():
        model = build_preset(cfg.name)
        if cfg.source:
            inherit_weights(model, load_source_state_dict(cfg.source), strict=True)
    else:
        import open_clip

        from siclip.models.registry import register

        register()
        if cfg.name not in open_clip.list_models():
            raise ValueError(
                f"teacher.name: got {cfg.name!r}; allowed: a preset ({', '.join(list_presets())}) "
                "or an open_clip model name"
            )
        src = cfg.source
        if src and Path(src).suffix not in (".pt", ".pth", ".bin", ".safetensors") and ":" not in src:
            model = open_clip.create_model(cfg.name, pretrained=src)  # an open_clip pretrained tag
        else:
            model = open_clip.create_model(cfg.name)
            if src:
                inherit_weights(model, load_source_state_dict(src), strict=True)
    model.requires_grad_(False)
    return model.eval()
