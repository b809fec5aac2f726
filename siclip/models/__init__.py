"""Pure-torch models: SAS-P block, simplification, MCt text tower, presets, weight inheritance, export.

- ``sasp``: :class:`ShapedAttention`, :class:`SASPBlock` (conv and sequence layouts), ``is_sasp``.
- ``simplify``: ``simplify(model, SaspCfg)`` swaps attention blocks for SAS-P blocks and shares weights.
- ``mct``: MobileCLIP-S0's MCt text tower (Apple's key layout) and ``convert_apple_state_dict``.
- ``presets``: ``list_presets``, ``build_preset``, ``preset_info``, ``build_tokenizer``, ``build_transform``
  (a preset is an open_clip config in ``siclip/model_configs/``).
- ``inherit``: ``load_source_state_dict``, ``inherit_weights``, ``freeze_inherited``, ``set_train_mode``.
- ``build``: ``build_student``, ``build_teacher``.
- ``export``: ``reparameterize``, ``export_open_clip``, ``load_exported``; ``info``: ``param_counts``.
- ``registry``: ``register()`` lets open_clip build siclip configs (``siclip-s0``, ``local-dir:`` exports);
  every builder above calls it, call it yourself before using open_clip directly on an export.
"""

from siclip.models.registry import register

__all__ = ["register"]
