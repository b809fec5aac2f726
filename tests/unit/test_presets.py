"""Presets: each is one config file open_clip builds; SAS-P is configuration; every preset builds and runs
forward/backward; real parameter counts; what preset_info reads; tokenizers and transforms."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, SimpleTokenizer
from PIL import Image
from torchvision import transforms as T

from siclip.config import SaspCfg
from siclip.models.info import param_counts
from siclip.models.presets import (
    PresetInfo,
    build_preset,
    build_tokenizer,
    build_transform,
    list_presets,
    preset_config,
    preset_info,
    sasp_config,
)
from siclip.models.registry import CONFIG_DIR, SASP_KEY, register
from siclip.models.sasp import SASPBlock
from siclip.models.simplify import shared_tensors, simplify

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
    # a preset is its config file (the demo captioner's CoCa config there is not a preset)
    assert set(list_presets()) == {p.stem for p in CONFIG_DIR.glob("*.json")} - {"siclip-tiny-coca"}
    with pytest.raises(ValueError) as err:
        build_preset("mobileclip-s9")
    assert "mobileclip-s9" in str(err.value) and all(name in str(err.value) for name in list_presets())
    with pytest.raises(ValueError, match="tiny-teacher"):
        preset_info("nope")


@pytest.mark.parametrize("name", TINY)
def test_build_preset_is_open_clip_building_the_config_by_name(name: str) -> None:
    register()
    ours, theirs = build_preset(name), open_clip.create_model(name)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    assert shared_tensors(ours) == shared_tensors(theirs)


def _structure(model: Any) -> tuple[dict[str, Any], list[list[str]]]:
    return {k: v.shape for k, v in model.state_dict().items()}, shared_tensors(model)


def _settings(model: Any) -> dict[str, list[float]]:
    names = ("attn_gain", "mlp_gain", "alpha", "beta", "gamma")
    return {n: p.flatten().tolist() for n, p in model.named_parameters() if n.endswith(names)}


@pytest.mark.parametrize(
    "sasp",
    [
        SaspCfg(),
        SaspCfg(share="block", first_value=True),
        SaspCfg(replace="both", text_share="mixer_pairs", text_gains="unit"),
        SaspCfg(replace="text", share="none"),
        SaspCfg(replace="none"),
    ],
)
def test_sasp_passed_in_builds_what_simplifying_the_base_builds(sasp: SaspCfg) -> None:
    """The config route (SAS-P settings in the tower configs) and the student's route (base, then simplify)."""
    base = build_preset("tiny-teacher")
    simplify(base, sasp)
    built = build_preset("tiny-student", sasp=sasp)
    assert _structure(built) == _structure(base)
    # the values set from the settings (not drawn at random): gains and the per-head alpha, beta, gamma
    assert _settings(built) == _settings(base)
    if sasp.text_gains == "unit":
        assert built.text.transformer.resblocks[0].mlp_gain.item() == 1.0
    # the preset's own settings are the schema's defaults: the student built by default is the preset
    if sasp == SaspCfg():
        assert _structure(build_preset("tiny-student")) == _structure(built)


def test_a_simplified_preset_is_its_base_config_with_sasp_settings() -> None:
    bases = {name: preset_info(name).base for name in list_presets()}
    assert bases == {
        "mobileclip-s0": None,
        "siclip-s0": "mobileclip-s0",
        "mobileclip2-s0": None,
        "siclip2-s0": "mobileclip2-s0",
        "tiny-teacher": None,
        "tiny-student": "tiny-teacher",
        "tiny-mct": None,
    }
    for name, base in bases.items():
        if base is not None:
            assert sasp_config(preset_config(name), SaspCfg(replace="none")) == preset_config(base)
            assert SASP_KEY in preset_config(name)["vision_cfg"]
    # mobileclip2-s0 is open_clip's MobileCLIP2-S0, written down here
    assert preset_config("mobileclip2-s0") == open_clip.get_model_config("MobileCLIP2-S0")
    # sasp is ignored for a preset that is not simplified
    plain = build_preset("tiny-teacher", sasp=SaspCfg(replace="both"))
    assert not any(isinstance(m, SASPBlock) for m in plain.modules())


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
    info = preset_info("ViT-B-32")
    assert info.base is None and info.interpolation == "bicubic" and info.image_size == 224
    assert info.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert preset_info("MobileCLIP2-S0").mean == (0.0, 0.0, 0.0)
    assert build_tokenizer("ViT-B-32")(["a cat"]).shape == (1, 77)


NO_WEIGHTS = "No pretrained weights loaded"


def _add_config(tmp_path: Path, name: str, base: str, **text: Any) -> None:
    """Make ``name`` an open_clip model config: ``base``'s with ``text`` in its text config."""
    register()
    cfg: dict[str, Any] = open_clip.get_model_config(base)
    cfg["text_cfg"].update(text)
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)


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


def test_keys_a_config_leaves_out_take_open_clips_own_defaults(tmp_path: Path) -> None:
    register()
    cfg: dict[str, Any] = open_clip.get_model_config("ViT-B-32")
    del cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    (tmp_path / "siclip-test-defaults.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    info = preset_info("siclip-test-defaults")
    assert (info.image_size, info.context_length) == (
        CLIPVisionCfg().image_size,
        CLIPTextCfg().context_length,
    )
    # a real config without context_length (an HF text tower): open_clip's tokenizers use the default
    assert preset_info("roberta-ViT-B-32").context_length == DEFAULT_CONTEXT_LENGTH


def test_random_init_builds_do_not_warn_and_leave_logging_as_it_was(caplog: pytest.LogCaptureFixture) -> None:
    root_filters = list(logging.getLogger().filters)
    with caplog.at_level(logging.WARNING):
        build_preset("tiny-teacher")
    assert not [r for r in caplog.records if NO_WEIGHTS in r.getMessage()]
    assert logging.getLogger().filters == root_filters
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        open_clip.create_model("tiny-teacher")  # open_clip itself still warns
    assert any(NO_WEIGHTS in r.getMessage() for r in caplog.records)


def test_an_open_clip_teacher_gets_its_own_tokenizer(tmp_path: Path) -> None:
    # a config whose tokenizer cleans text differently from the presets' SimpleTokenizer
    name = "siclip-test-canonical"
    _add_config(tmp_path, name, "ViT-B-32", tokenizer_kwargs={"clean": "canonicalize"})
    texts = ["A cat, on a MAT!", "two dogs."]
    ours = build_tokenizer(name)(texts)
    assert torch.equal(ours, open_clip.get_tokenizer(name)(texts))
    assert not torch.equal(ours, SimpleTokenizer(context_length=77)(texts))


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
