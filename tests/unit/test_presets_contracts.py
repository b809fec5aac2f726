"""Preset look-up contracts beyond the registry's happy path.

Pins: :func:`preset_info` for plain open_clip names field by field (size, statistics, resize, context length,
embedding size read from the config; open_clip's own defaults when the config leaves them out; MobileCLIP
statistics only for MobileCLIP names), that a preset name always means the preset even when open_clip has
a config of that name, the loud error when a preset's config is not registered, that random-init builds
do not log open_clip's "No pretrained weights" warning yet leave the logger as it was, that teachers named
by open_clip config get that model's own tokenizer, and what :func:`build_transform` does (bilinear
resize + centre crop at eval, a random crop in training).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import open_clip
import open_clip.factory as oc_factory
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, SimpleTokenizer
from PIL import Image
from torchvision import transforms as T

from siclip.models.hooks import register
from siclip.models.presets import (
    PresetInfo,
    build_preset,
    build_tokenizer,
    build_transform,
    preset_config,
    preset_info,
)

torch.set_num_threads(1)

NO_WEIGHTS = "No pretrained weights loaded"


def _add_config(monkeypatch: pytest.MonkeyPatch, name: str, cfg: dict[str, Any]) -> None:
    """Make ``name`` an open_clip model config for this test (after siclip's configs are registered)."""
    register()  # it rescans open_clip's registry; add ours after that
    monkeypatch.setitem(oc_factory._MODEL_CONFIGS, name, cfg)


def _config(name: str, **text: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = open_clip.get_model_config(name)
    cfg["text_cfg"].update(text)
    return cfg


# ----------------------------------------------------------------------------------------- preset_info
def test_plain_open_clip_names_read_size_context_and_width_from_their_config() -> None:
    assert preset_info("MobileCLIP2-S0") == PresetInfo(
        base=None,
        image_size=256,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        interpolation="bilinear",
        context_length=77,
        embed_dim=512,
    )
    assert preset_info("ViT-B-16-SigLIP-256") == PresetInfo(
        base=None,
        image_size=256,
        mean=tuple(open_clip.OPENAI_DATASET_MEAN),  # type: ignore[arg-type]
        std=tuple(open_clip.OPENAI_DATASET_STD),  # type: ignore[arg-type]
        interpolation="bicubic",
        context_length=64,
        embed_dim=768,
    )


def test_keys_a_config_leaves_out_take_open_clips_own_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config("ViT-B-32")
    del cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    _add_config(monkeypatch, "siclip-test-defaults", cfg)
    info = preset_info("siclip-test-defaults")
    assert (info.image_size, info.context_length) == (
        CLIPVisionCfg().image_size,
        CLIPTextCfg().context_length,
    )
    # a real config without context_length (an HF text tower): open_clip's tokenizers use the default
    assert preset_info("roberta-ViT-B-32").context_length == DEFAULT_CONTEXT_LENGTH


def test_a_preset_name_means_the_preset_even_if_open_clip_has_that_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _add_config(monkeypatch, "tiny-student", _config("ViT-B-32"))
    info = preset_info("tiny-student")
    assert (info.base, info.image_size, info.context_length, info.embed_dim) == ("tiny-teacher", 64, 32, 64)
    assert build_tokenizer("tiny-student")(["a cat"]).shape == (1, 32)


def test_an_unregistered_preset_config_is_a_loud_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(open_clip, "get_model_config", lambda name: None)
    with pytest.raises(RuntimeError) as err:
        preset_config("tiny-student")
    assert str(err.value) == "open_clip has no model config 'siclip-tiny-teacher' (register() failed?)"


# ----------------------------------------------------------------------------------------- build_preset
def test_random_init_builds_do_not_warn_and_leave_logging_as_it_was(caplog: pytest.LogCaptureFixture) -> None:
    root_filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        build_preset("tiny-teacher")
    assert not [r for r in caplog.records if NO_WEIGHTS in r.getMessage()]
    assert logging.getLogger().filters == root_filters
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        open_clip.create_model("siclip-tiny-teacher")  # open_clip itself still warns
        logging.getLogger().warning("another warning")
    messages = [r.getMessage() for r in caplog.records]
    assert any(NO_WEIGHTS in m for m in messages) and "another warning" in messages


# ----------------------------------------------------------------------------------------- tokenizer
def test_an_open_clip_teacher_gets_its_own_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    # a config whose tokenizer cleans text differently from the presets' SimpleTokenizer
    name = "siclip-test-canonical"
    _add_config(monkeypatch, name, _config("ViT-B-32", tokenizer_kwargs={"clean": "canonicalize"}))
    texts = ["A cat, on a MAT!", "two dogs."]
    ours = build_tokenizer(name)(texts)
    assert torch.equal(ours, open_clip.get_tokenizer(name)(texts))
    assert not torch.equal(ours, SimpleTokenizer(context_length=77)(texts))


# ----------------------------------------------------------------------------------------- transform
def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))


def test_eval_transform_is_a_bilinear_resize_and_centre_crop() -> None:
    image = _image()

    def reference(mode: T.InterpolationMode) -> torch.Tensor:
        return T.Compose([T.Resize(64, interpolation=mode), T.CenterCrop(64), T.ToTensor()])(image)

    got = build_transform("tiny-student", train=False)(image)
    assert torch.allclose(got, reference(T.InterpolationMode.BILINEAR), atol=1e-6)
    assert not torch.allclose(got, reference(T.InterpolationMode.BICUBIC), atol=1e-3)


def test_train_transform_crops_at_random_eval_does_not() -> None:
    image = _image()
    train = build_transform("tiny-student", train=True)
    evaluate = build_transform("tiny-student", train=False)
    torch.manual_seed(0)
    crops = [train(image) for _ in range(4)]
    assert all(c.shape == (3, 64, 64) for c in crops)
    assert any(not torch.equal(crops[0], c) for c in crops[1:])
    assert torch.equal(evaluate(image), evaluate(image))
