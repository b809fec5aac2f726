"""Every preset builds and runs forward/backward; real parameter counts; tokenizers, transforms, hooks."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from siclip.models.info import param_counts
from siclip.models.presets import (
    PresetInfo,
    build_preset,
    build_tokenizer,
    build_transform,
    list_presets,
    preset_info,
)
from siclip.models.sasp import SASPBlock

torch.set_num_threads(1)

TINY = ["tiny-teacher", "tiny-student", "tiny-mct"]
REAL = ["mobileclip-s0", "siclip-s0", "mobileclip2-s0", "siclip2-s0"]
# open_clip's MobileCLIP2-S0 (63 M text tower) and its simplified form: same SAS-P swap as siclip-s0, slow.
REAL_PARAMS = [
    "mobileclip-s0",
    "siclip-s0",
    pytest.param("mobileclip2-s0", marks=pytest.mark.slow),
    pytest.param("siclip2-s0", marks=pytest.mark.slow),
]


@functools.cache
def _built(name: str) -> Any:
    torch.manual_seed(0)
    return build_preset(name)


def test_registry_names_and_unknown_name() -> None:
    assert set(list_presets()) == set(TINY + REAL)
    with pytest.raises(ValueError, match="valid presets: mobileclip-s0, mobileclip2-s0"):
        build_preset("mobileclip-s9")
    with pytest.raises(ValueError, match="tiny-teacher"):
        preset_info("nope")


def _forward_backward(name: str, batch: int) -> None:
    model = _built(name)
    info = preset_info(name)
    model.train()
    images = torch.randn(batch, 3, info.image_size, info.image_size)
    texts = build_tokenizer(name)(["a red circle on the left", "two blue squares"][:batch])
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(texts, normalize=True)
    assert img.shape == (batch, info.embed_dim) and txt.shape == (batch, info.embed_dim)
    logits = model.logit_scale.exp() * img @ txt.T
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(batch))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    has_sasp = any(isinstance(m, SASPBlock) for m in model.modules())
    assert has_sasp == (info.base is not None)


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_forward_backward(name: str) -> None:
    _forward_backward(name, batch=2)


@pytest.mark.parametrize("name", REAL_PARAMS)
def test_real_presets_forward_backward_at_256px(name: str) -> None:
    _forward_backward(name, batch=1)


def test_real_parameter_counts() -> None:
    mobileclip = param_counts(_built("mobileclip-s0"))
    siclip = param_counts(_built("siclip-s0"))
    assert abs(mobileclip["image"] - 11.4e6) / 11.4e6 < 0.01, mobileclip
    assert abs(mobileclip["text"] - 42.4e6) / 42.4e6 < 0.01, mobileclip
    assert siclip["image"] <= 0.87 * mobileclip["image"], (siclip, mobileclip)
    assert siclip["text"] == mobileclip["text"]
    assert siclip["total"] == siclip["image"] + siclip["text"] + 1  # + logit_scale
    assert siclip["trainable"] == siclip["total"]


def test_preset_info_tokenizer_and_transform() -> None:
    info = preset_info("siclip-s0")
    assert info == PresetInfo(
        base="mobileclip-s0",
        image_size=256,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        interpolation="bilinear",
        context_length=77,
        embed_dim=512,
    )
    tiny = preset_info("tiny-student")
    assert (tiny.base, tiny.image_size, tiny.context_length, tiny.embed_dim) == ("tiny-teacher", 64, 32, 64)
    tokens = build_tokenizer("tiny-student")(["a red circle", "a much longer caption " * 20])
    assert tokens.dtype == torch.long and tokens.shape == (2, 32)
    assert tokens[0, 0] == 49406 and tokens[0].argmax() == 4  # SOT, 3 words, EOT
    image = Image.fromarray(np.full((80, 100, 3), 255, dtype=np.uint8))
    for train in (False, True):
        x = build_transform("tiny-student", train=train)(image)
        assert x.shape == (3, 64, 64)
        assert torch.allclose(x, torch.ones_like(x))  # mean 0 / std 1: white stays 1.0
    assert build_transform("tiny-student", train=False, image_size=48)(image).shape == (3, 48, 48)


def test_plain_open_clip_names_for_teachers() -> None:
    import open_clip

    info = preset_info("ViT-B-32")
    assert info.base is None and info.interpolation == "bicubic" and info.image_size == 224
    assert info.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert preset_info("MobileCLIP2-S0").mean == (0.0, 0.0, 0.0)
    assert build_tokenizer("ViT-B-32")(["a cat"]).shape == (1, 77)


def test_open_clip_builds_siclip_configs_by_name() -> None:
    import open_clip

    from siclip.models.hooks import register

    register()
    model = open_clip.create_model("siclip-tiny-student")
    assert sum(isinstance(m, SASPBlock) for m in model.modules()) == 2
    assert "siclip-s0" in open_clip.list_models()
