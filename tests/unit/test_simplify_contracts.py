"""What simplify() reports and marks, read back by weight inheritance and export, on tiny open_clip text towers.

Pins: ``sasp_module_names`` lists a block shared under ``share="block"`` once per position (inheritance
marks every position's state-dict keys as new); ``replaced_prefixes`` prefixes each tower's marker names with
the tower's model-level name, and leaves them bare when the tower is the model itself; ``to_inference``
counts each shaped attention once, however many blocks share it.
"""

from __future__ import annotations

from typing import Any

import torch
from open_clip.transformer import TextTransformer
from torch import nn

from siclip.config import SaspCfg
from siclip.models.sasp import InferenceShapedAttention, ShapedAttention, to_inference
from siclip.models.simplify import replaced_prefixes, sasp_module_names, simplify, simplify_tower

torch.set_num_threads(1)

BLOCKS = ["transformer.resblocks.0", "transformer.resblocks.1", "transformer.resblocks.2"]


def _text(layers: int = 3) -> TextTransformer:
    torch.manual_seed(0)
    return TextTransformer(context_length=6, vocab_size=50, width=8, heads=2, layers=layers, output_dim=4)


def _model(layers: int = 3) -> Any:
    model = nn.Module()
    model.text = _text(layers)
    return model


def test_block_sharing_lists_every_position_of_the_shared_block() -> None:
    model = _model()
    simplify(model, SaspCfg(replace="text", share="block"))
    blocks = [model.text.transformer.resblocks[i] for i in range(3)]
    assert blocks[0] is blocks[1] is blocks[2]
    assert sasp_module_names(model) == [f"text.{b}" for b in BLOCKS]
    # Every position's keys are in the state dict, so each must be found under one of these names.
    keys = [k for k in model.state_dict() if ".resblocks." in k]
    assert all(any(k.startswith(n + ".") for n in sasp_module_names(model)) for k in keys)
    assert {k.split(".")[3] for k in keys} == {"0", "1", "2"}


def test_replaced_prefixes_are_model_level_names() -> None:
    model = _model(layers=2)
    simplify(model, SaspCfg(replace="text"))
    assert replaced_prefixes(model) == [f"text.{b}" for b in BLOCKS[:2]]
    bare = _text(layers=2)  # a tower simplified on its own: its marker names are already model-level
    assert simplify_tower(bare, SaspCfg()) == BLOCKS[:2]
    assert replaced_prefixes(bare) == BLOCKS[:2]
    assert replaced_prefixes(_text(layers=2)) == []  # nothing simplified, no marker


def test_to_inference_counts_each_shared_attention_once() -> None:
    shared = ShapedAttention(8, num_heads=2)
    model = nn.ModuleList([ShapedAttention(8, num_heads=2), shared, ShapedAttention(8, num_heads=2), shared])
    assert to_inference(model) == 3
    assert all(type(m) is InferenceShapedAttention for m in model)
    assert to_inference(model) == 0  # already switched
