"""register(): open_clip builds siclip's configs and exports by name; doing it again changes nothing.

The wrapping of open_clip's tower builders itself is tested in test_openclip_compat.py.
"""

from __future__ import annotations

import warnings
from typing import Any

import open_clip
import pytest
import torch

from siclip.models import registry
from siclip.models.mct import MCtTextEncoder
from siclip.models.sasp import SASPBlock

torch.set_num_threads(1)


def _register_quietly() -> list[str]:
    """register() and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry.register()
    return [str(w.message) for w in caught]


def test_open_clip_builds_siclip_configs_by_name() -> None:
    registry.register()
    assert {"siclip-s0", "tiny-student", "siclip-tiny-coca"} <= set(open_clip.list_models())
    student = open_clip.create_model("tiny-student")  # vision_cfg.siclip_sasp: SAS-P blocks
    assert sum(isinstance(m, SASPBlock) for m in student.modules()) == 2
    mct: Any = open_clip.create_model("tiny-mct")  # text_cfg.siclip_tower: the MCt text tower
    assert isinstance(mct.text, MCtTextEncoder) and mct.text.width == 64


def test_registering_again_changes_nothing() -> None:
    registry.register()
    assert not [m for m in _register_quietly() if "siclip" in m]  # timm: "Overwriting ... in registry"
    assert sum(isinstance(m, SASPBlock) for m in open_clip.create_model("tiny-student").modules()) == 2


def test_unknown_tower_kinds_and_sasp_on_a_tower_without_attention_are_refused() -> None:
    registry.register()
    text = dict(open_clip.get_model_config("tiny-mct")["text_cfg"])
    text[registry.TOWER_KEY] = {**text[registry.TOWER_KEY], "kind": "lstm"}
    with pytest.raises(ValueError, match="lstm"):
        open_clip.create_model("tiny-mct", text_cfg=text)
    # a ResNet image tower has no attention block for SAS-P to replace: refused, not silently left as is
    resnet = {"layers": [1, 1, 1, 1], "width": 8, "image_size": 32, registry.SASP_KEY: {}}
    with pytest.raises(ValueError, match="no attention block") as err:
        open_clip.create_model("tiny-teacher", vision_cfg=resnet)
    assert registry.SASP_KEY in str(err.value)


def test_tiny_fastvit_is_shaped_like_mci0() -> None:
    """RepMixer, RepMixer, then two 4-head attention blocks on 4x4 tokens at 64 px (what the tests rely on)."""
    import timm
    from timm.models.fastvit import Attention, RepConditionalPosEnc, RepMixer
    from torch import nn

    registry.register()
    model: Any = timm.create_model("siclip_fastvit_tiny")
    assert sum(p.numel() for p in model.parameters()) == 438480  # widths, depths, MLP ratios, SE, kernels
    assert model.num_classes == 0
    cfg = model.pretrained_cfg
    assert (cfg["input_size"], cfg["pool_size"], cfg["num_classes"]) == ((3, 64, 64), (2, 2), 0)
    mixers = [[type(b.token_mixer) for b in stage.blocks] for stage in model.stages]
    assert mixers == [[RepMixer], [RepMixer], [Attention, Attention]]
    widths = [[b.mlp.fc1.out_channels for b in stage.blocks] for stage in model.stages]
    assert widths == [[96], [192], [384, 384]]  # MLP ratio 3 on 32, 64, 128 channels
    assert model.stages[2].blocks[0].token_mixer.num_heads == 4
    assert isinstance(model.stages[0].downsample, nn.Identity)
    down = [model.stages[i].downsample.proj[0] for i in (1, 2)]
    assert [type(d.act) for d in down] == [nn.GELU, nn.GELU]  # large-kernel convs with activation
    assert [type(d.se).__name__ for d in down] == ["Identity", "SEModule"]  # SE only into the last stage
    pos = model.stages[2].pos_emb
    assert isinstance(pos, RepConditionalPosEnc) and pos.pos_enc.kernel_size == (3, 3)
    assert [type(s.pos_emb) for s in model.stages[:2]] == [nn.Identity, nn.Identity]
    with torch.no_grad():
        tokens = model.stages[:2](model.stem(torch.randn(1, 3, 64, 64)))
        assert model.stages[2].downsample(tokens).shape == (1, 128, 4, 4)


def test_tiny_fastvit_keeps_a_callers_pretrained_cfg_and_has_no_weights() -> None:
    import timm

    registry.register()
    custom = {"num_classes": 0, "input_size": (3, 96, 96), "pool_size": (3, 3)}
    model: Any = timm.create_model("siclip_fastvit_tiny", pretrained_cfg=custom)
    assert model.pretrained_cfg["input_size"] == (3, 96, 96)
    with pytest.raises(RuntimeError, match="No pretrained weights exist for siclip_fastvit_tiny"):
        timm.create_model("siclip_fastvit_tiny", pretrained=True)  # random init only: never silently
