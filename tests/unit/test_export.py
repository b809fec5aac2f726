"""Inference form and open_clip export: fused == unfused, exported folder reloads through open_clip."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from siclip.config import SaspCfg
from siclip.models.export import export_open_clip, is_reparameterized, load_exported, reparameterize
from siclip.models.presets import build_preset, build_tokenizer
from siclip.models.sasp import SASPBlock

torch.set_num_threads(1)

CAPTIONS = ["a red circle on the left", "two blue squares", "a small green star"]


def _trained_looking(name: str, **kwargs: Any) -> Any:
    """A preset whose BatchNorm statistics and layer scales are not at their init (fusion is then non-trivial)."""
    torch.manual_seed(0)
    model = build_preset(name, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0, 0.2)
        for n, p in model.named_parameters():
            if "layer_scale" in n or n.endswith("gamma"):
                p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("name", ["tiny-teacher", "tiny-student", "tiny-mct"])
def test_reparameterised_matches_training_form(name: str) -> None:
    model = _trained_looking(name)
    fused: Any = reparameterize(model)
    assert is_reparameterized(fused) and not is_reparameterized(model)
    images = torch.randn(3, 3, 64, 64)
    texts = build_tokenizer(name)(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(
            fused.encode_image(images), model.encode_image(images), atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(fused.encode_text(texts), model.encode_text(texts), atol=1e-4, rtol=1e-4)
    sasp = [m for m in fused.modules() if isinstance(m, SASPBlock)]
    if name == "tiny-student":
        assert sasp[0].attn.qk is sasp[1].attn.qk  # sharing survives the copy


@pytest.mark.parametrize(
    ("name", "sasp"),
    [
        ("tiny-student", SaspCfg()),
        ("tiny-mct", None),
        ("tiny-student", SaspCfg(replace="both", share="block")),
    ],
)
def test_export_reloads_through_open_clip(tmp_path: Path, name: str, sasp: SaspCfg | None) -> None:
    from open_clip import CustomTextCLIP

    model = _trained_looking(name, sasp=sasp)
    out = export_open_clip(model, name, tmp_path / "export")
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["preprocess_cfg"]["mean"] == [0.0, 0.0, 0.0] and config["preprocess_cfg"]["size"] == 64
    assert (out / "open_clip_model.safetensors").is_file()
    if sasp is not None:
        assert config["model_cfg"]["vision_cfg"]["siclip_sasp"]["share"] == sasp.share
        assert ("siclip_sasp" in config["model_cfg"]["text_cfg"]) == (sasp.replace == "both")
    reloaded: Any
    reloaded, transform = load_exported(out)
    assert isinstance(reloaded, CustomTextCLIP)
    reloaded.eval()
    images = torch.randn(2, 3, 64, 64)
    texts = build_tokenizer(name)(CAPTIONS[:2])
    with torch.no_grad():
        assert torch.equal(reloaded.encode_image(images), model.encode_image(images))
        assert torch.equal(reloaded.encode_text(texts), model.encode_text(texts))
    assert sum(isinstance(m, SASPBlock) for m in reloaded.modules()) == sum(
        isinstance(m, SASPBlock) for m in model.modules()
    )
    assert list(transform.transforms[-1].mean) == [0.0, 0.0, 0.0]  # preprocessing travels with the export


def test_export_refuses_fused_model(tmp_path: Path) -> None:
    fused = reparameterize(build_preset("tiny-teacher"))
    with pytest.raises(ValueError, match="unfused"):
        export_open_clip(fused, "tiny-teacher", tmp_path)


def test_bench_infer_tiny(tmp_path: Path) -> None:
    from siclip.bench.infer import bench_infer, format_table, write_table

    result = bench_infer(
        ("tiny-student", "tiny-teacher"), image_size=64, batch_sizes=(1, 2), repeats=2, threads=1
    )
    assert {(r["model"], r["batch"]) for r in result["rows"]} == {
        (m, b) for m in ("tiny-student", "tiny-teacher") for b in (1, 2)
    }
    # the table's numbers are what was timed: img/s is batch / seconds, the best is at least the median,
    # and the ratio is the two models' speeds divided
    for r in result["rows"]:
        assert r["img_per_s"] == pytest.approx(r["batch"] / r["seconds"])
        assert r["best_img_per_s"] >= r["img_per_s"]
    speed = {(r["model"], r["batch"]): r["img_per_s"] for r in result["rows"]}
    assert result["ratio"] == {
        b: pytest.approx(speed[("tiny-student", b)] / speed[("tiny-teacher", b)]) for b in (1, 2)
    }
    table = format_table(result)
    assert table.startswith("| batch | tiny-student img/s") and table.count("\n| ") == 3
    assert "| 2 | " in table
    path = write_table(table, tmp_path / "inference.md", note="a note about the machine")
    assert "a note about the machine" in path.read_text() and table in path.read_text()
