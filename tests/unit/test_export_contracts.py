"""Export folder contract: ``export_open_clip`` creates nested folders and overwrites an old export (leaving
exactly its two files), writes the whole config as 2-space JSON (preprocessing, preset and loading hint),
carries the preset's preprocessing to the reloaded transform, refuses a fused model with its message before
writing anything; ``reparameterize(inplace=True)`` fuses the given model itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from siclip.models.export import (
    CONFIG_FILE,
    MODEL_FILE,
    export_model_cfg,
    export_open_clip,
    is_reparameterized,
    load_exported,
    reparameterize,
)
from siclip.models.mct import MCtTextEncoder

torch.set_num_threads(1)


def _tiny_mct() -> MCtTextEncoder:
    return MCtTextEncoder(embed_dim=8, dim=16, context_length=12, vocab_size=50, num_layers=1, num_heads=2)


def test_export_config_file_and_preprocessing_round_trip(tmp_path: Path) -> None:
    from siclip.models.presets import build_preset, build_transform

    model: Any = build_preset("tiny-mct")
    out = export_open_clip(model, "tiny-mct", tmp_path / "export")
    expected = {
        "model_cfg": export_model_cfg(model, "tiny-mct"),
        "preprocess_cfg": {
            "size": 64,
            "mean": [0.0, 0.0, 0.0],
            "std": [1.0, 1.0, 1.0],
            "interpolation": "bilinear",
            "resize_mode": "shortest",
        },
        "siclip": {
            "preset": "tiny-mct",
            "note": "call siclip.models.hooks.register() before open_clip loads this",
        },
    }
    assert (out / CONFIG_FILE).read_text() == json.dumps(expected, indent=2) + "\n"
    _, transform = load_exported(out)
    image = Image.fromarray(torch.randint(0, 256, (50, 90, 3), dtype=torch.uint8).numpy())
    assert torch.equal(transform(image), build_transform("tiny-mct", train=False)(image))


def test_export_makes_nested_folders_and_overwrites_an_old_export(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from siclip.models.presets import build_preset

    model: Any = build_preset("tiny-mct")
    target = tmp_path / "runs" / "a" / "export"
    assert export_open_clip(model, "tiny-mct", target) == target
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    assert export_open_clip(model, "tiny-mct", target) == target  # same folder again: replaced
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG_FILE, MODEL_FILE])
    saved = load_file(str(target / MODEL_FILE))
    assert saved.keys() == model.state_dict().keys()
    assert saved["logit_scale"].item() == 3.0


def test_export_refuses_a_fused_model_before_writing(tmp_path: Path) -> None:
    fused = reparameterize(_tiny_mct())
    with pytest.raises(ValueError) as err:
        export_open_clip(fused, "tiny-mct", tmp_path / "export")
    assert str(err.value) == (
        "export_open_clip needs the training (unfused) form; export before reparameterize()"
    )
    assert not (tmp_path / "export").exists()


def test_reparameterize_inplace_fuses_the_given_model() -> None:
    model = _tiny_mct()
    copy = reparameterize(model)
    assert copy is not model and is_reparameterized(copy) and not is_reparameterized(model)
    assert model.training and not copy.training
    same = reparameterize(model, inplace=True)
    assert same is model and is_reparameterized(model) and not model.training
