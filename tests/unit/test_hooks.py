"""register(): what it does to a plain open_clip, and that doing it again changes nothing.

Pins: on a plain open_clip (fresh hooks state) register() wraps both tower builders exactly once, so
``open_clip.create_model`` builds a siclip SAS-P config by name; a second registration with fresh state (as
after a reload of the hooks module) wraps neither builder again, re-wraps only a builder someone replaced,
and does not re-register the timm FastViT (timm would warn "Overwriting"); a repeated ``register()`` in one
state is a no-op (open_clip's config directory is not rescanned).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import open_clip
import open_clip.model as oc_model
import pytest

from siclip.models import hooks
from siclip.models.sasp import SASPBlock


def _plain(builder: Callable[..., Any]) -> Callable[..., Any]:
    """open_clip's own builder under any siclip wrapper."""
    while getattr(builder, "_siclip", False):
        builder = builder.__wrapped__  # type: ignore[attr-defined]
    return builder


@pytest.fixture
def plain_open_clip(monkeypatch: pytest.MonkeyPatch) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Fresh hooks state and open_clip's unwrapped tower builders; both restored after the test."""
    hooks.register()
    vision, text = _plain(oc_model._build_vision_tower), _plain(oc_model._build_text_tower)
    monkeypatch.setattr(oc_model, "_build_vision_tower", vision)
    monkeypatch.setattr(oc_model, "_build_text_tower", text)
    monkeypatch.setattr(hooks, "_STATE", {"done": False})
    return vision, text


def _register_quietly() -> list[str]:
    """register() and the messages of the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hooks.register()
    return [str(w.message) for w in caught]


def test_register_wraps_plain_open_clip_once_and_builds_siclip_configs(
    plain_open_clip: tuple[Callable[..., Any], Callable[..., Any]],
) -> None:
    vision, text = plain_open_clip
    hooks.register()
    wrapped_vision, wrapped_text = oc_model._build_vision_tower, oc_model._build_text_tower
    assert wrapped_vision is not vision and wrapped_vision.__wrapped__ is vision  # type: ignore[attr-defined]
    assert wrapped_text is not text and wrapped_text.__wrapped__ is text  # type: ignore[attr-defined]
    model = open_clip.create_model("siclip-tiny-student")  # vision_cfg.siclip_sasp: needs the wrapper
    assert sum(isinstance(m, SASPBlock) for m in model.modules()) == 2


def test_registering_again_with_fresh_state_wraps_nothing_twice(
    plain_open_clip: tuple[Callable[..., Any], Callable[..., Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    vision, text = plain_open_clip
    hooks.register()
    wrapped_vision, wrapped_text = oc_model._build_vision_tower, oc_model._build_text_tower
    monkeypatch.setattr(hooks, "_STATE", {"done": False})  # what a reload of the hooks module does
    messages = _register_quietly()
    assert not [m for m in messages if "siclip_fastvit_tiny" in m]  # timm: "Overwriting ... in registry"
    assert oc_model._build_vision_tower is wrapped_vision
    assert oc_model._build_text_tower is wrapped_text
    # Someone put open_clip's text builder back: only that one is wrapped again, once.
    monkeypatch.setattr(oc_model, "_build_text_tower", text)
    monkeypatch.setattr(hooks, "_STATE", {"done": False})
    hooks.register()
    assert oc_model._build_vision_tower is wrapped_vision
    rewrapped = oc_model._build_text_tower
    assert rewrapped is not text and rewrapped.__wrapped__ is text  # type: ignore[attr-defined]
    assert _plain(oc_model._build_vision_tower) is vision


def test_register_is_a_no_op_after_the_first_call(
    plain_open_clip: tuple[Callable[..., Any], Callable[..., Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    scanned: list[Any] = []
    real = open_clip.add_model_config

    def spy(path: Any) -> None:
        scanned.append(path)
        real(path)

    monkeypatch.setattr(open_clip, "add_model_config", spy)
    hooks.register()
    assert scanned == [hooks.CONFIG_DIR]
    wrapped_vision = oc_model._build_vision_tower
    hooks.register()
    assert scanned == [hooks.CONFIG_DIR] and oc_model._build_vision_tower is wrapped_vision
    assert "siclip-tiny-student" in open_clip.list_models()


def test_tiny_fastvit_is_shaped_like_mci0() -> None:
    """RepMixer, RepMixer, then two 4-head attention blocks on 4x4 tokens at 64 px (what the tests rely on)."""
    import timm
    import torch
    from timm.models.fastvit import Attention, RepConditionalPosEnc, RepMixer
    from torch import nn

    hooks.register()
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

    hooks.register()
    custom = {"num_classes": 0, "input_size": (3, 96, 96), "pool_size": (3, 3)}
    model: Any = timm.create_model("siclip_fastvit_tiny", pretrained_cfg=custom)
    assert model.pretrained_cfg["input_size"] == (3, 96, 96)
    with pytest.raises(RuntimeError, match="No pretrained weights exist for siclip_fastvit_tiny"):
        timm.create_model("siclip_fastvit_tiny", pretrained=True)  # random init only: never silently
