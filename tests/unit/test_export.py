"""Inference form and open_clip export: fused == unfused, the exported folder (its files, config and
preprocessing) reloads through open_clip with the same outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from siclip.config import SaspCfg
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
from siclip.models.presets import build_preset, build_tokenizer, build_transform
from siclip.models.sasp import InferenceShapedAttention, SASPBlock, ShapedAttention, to_inference

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


def test_export_refuses_a_fused_model_before_writing(tmp_path: Path) -> None:
    fused = reparameterize(build_preset("tiny-teacher"))
    with pytest.raises(ValueError, match="unfused"):
        export_open_clip(fused, "tiny-teacher", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_export_config_and_preprocessing_round_trip(tmp_path: Path) -> None:
    model: Any = build_preset("tiny-mct")
    out = export_open_clip(model, "tiny-mct", tmp_path / "export")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["model_cfg"] == export_model_cfg(model, "tiny-mct")
    assert config["preprocess_cfg"] == {
        "size": 64,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "interpolation": "bilinear",
        "resize_mode": "shortest",
    }
    assert config["siclip"]["preset"] == "tiny-mct"
    _, transform = load_exported(out)
    image = Image.fromarray(torch.randint(0, 256, (50, 90, 3), dtype=torch.uint8).numpy())
    assert torch.equal(transform(image), build_transform("tiny-mct", train=False)(image))


def test_export_makes_nested_folders_and_overwrites_an_old_export(tmp_path: Path) -> None:
    from safetensors.torch import load_file

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


def test_reparameterize_inplace_fuses_the_given_model() -> None:
    model = MCtTextEncoder(embed_dim=8, dim=16, context_length=12, vocab_size=50, num_layers=1, num_heads=2)
    copy = reparameterize(model)
    assert copy is not model and is_reparameterized(copy) and not is_reparameterized(model)
    assert model.training and not copy.training
    same = reparameterize(model, inplace=True)
    assert same is model and is_reparameterized(model) and not model.training


def test_bench_infer_tiny(tmp_path: Path) -> None:
    from siclip.bench.infer import bench_infer, format_table, write_table

    result = bench_infer(
        ("tiny-student", "tiny-teacher"), image_size=64, batch_sizes=(1, 2), pairs=3, threads=1
    )
    assert {(r["model"], r["batch"]) for r in result["rows"]} == {
        (m, b) for m in ("tiny-student", "tiny-teacher") for b in (1, 2)
    }
    # the table's numbers are what was timed: img/s is batch / seconds (medians over the pairs)
    for r in result["rows"]:
        assert r["img_per_s"] == pytest.approx(r["batch"] / r["seconds"])
    assert set(result["ratio"]) == {1, 2}
    for batch, r in result["ratio"].items():
        ratios = sorted(t1 / t0 for t0, t1 in result["times"][batch])
        assert len(ratios) == r["pairs"] == 3 and r["median"] == pytest.approx(ratios[1])
        assert ratios[0] <= r["low"] <= r["median"] <= r["high"] <= ratios[-1]
    table = format_table(result)
    assert table.startswith("| batch | tiny-student img/s | tiny-teacher img/s | tiny-student / tiny-teacher")
    assert table.count("\n| ") == 3 and "| 2 | " in table and "3 back-to-back pairs" in table
    path = write_table(table, tmp_path / "inference.md", note="a note about the machine")
    assert "a note about the machine" in path.read_text() and table in path.read_text()


def test_pairs_alternate_which_model_runs_first() -> None:
    from siclip.bench.infer import time_pairs

    calls: list[str] = []

    class Named(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(self.name)
            return x

    times = time_pairs((Named("a"), Named("b")), batch=1, image_size=4, pairs=4, channels_last=False)
    assert len(times) == 4 and all(t0 > 0 and t1 > 0 for t0, t1 in times)
    assert "".join(calls) == "ab" + "ab" + "ba" + "ab" + "ba"  # warm-up, then the order alternates


def test_bootstrap_interval_of_the_median_covers_the_true_median() -> None:
    from siclip.bench.infer import bootstrap_median_interval, paired_ratios

    assert paired_ratios([(1.0, 2.0), (0.5, 0.25)]) == [2.0, 0.5]
    assert bootstrap_median_interval([1.1] * 5) == (1.1, 1.1)
    rng = np.random.default_rng(0)
    # Lognormal ratios around a true median of 1.03 (log-normal: median = exp(mu)); 95 % intervals from
    # 15 pairs should cover it in about 95 % of 300 independent benchmarks.
    covered = 0
    for seed in range(300):
        values = list(np.exp(rng.normal(np.log(1.03), 0.05, size=15)))
        low, high = bootstrap_median_interval(values, resamples=2000, seed=seed)
        assert low <= float(np.median(values)) <= high
        covered += low <= 1.03 <= high
    assert 0.88 <= covered / 300 <= 0.995
    wide = bootstrap_median_interval(list(np.exp(rng.normal(0, 0.2, size=15))), resamples=2000)
    narrow = bootstrap_median_interval(list(np.exp(rng.normal(0, 0.02, size=15))), resamples=2000)
    assert wide[1] - wide[0] > 3 * (narrow[1] - narrow[0])


@pytest.mark.parametrize(
    ("value", "head_dim", "bias"),
    [(False, None, False), (False, None, True), (True, 4, True)],
)
def test_inference_attention_equals_the_training_form_without_shape_matrices(
    value: bool, head_dim: int | None, bias: bool
) -> None:
    """alpha*v + beta*softmax(QK^T/sqrt(d))*v - gamma*mean(v) against A @ v with A built explicitly."""
    torch.manual_seed(0)
    attn = ShapedAttention(16, num_heads=2, value=value, head_dim=head_dim, qk_bias=bias)
    with torch.no_grad():
        for p in (attn.alpha, attn.beta, attn.gamma):
            p.uniform_(0.5, 1.5)
        attn.qk.weight.normal_(0, 0.5)
        if attn.value is not None:
            attn.value.weight.add_(0.2 * torch.randn(16, 16))
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        trained = attn(x)
        v = (attn.value(x) if attn.value is not None else x).view(3, 7, 2, 8).transpose(1, 2)
        explicit = (attn.attention_matrix(x) @ v).transpose(1, 2).reshape(3, 7, 16)
        assert to_inference(attn) == 1 and type(attn) is InferenceShapedAttention
        fast = attn(x)
        mask = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)  # masked: the training form, same result
        torch.testing.assert_close(attn(x, mask), ShapedAttention.forward(attn, x, mask))
    torch.testing.assert_close(trained, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, explicit, atol=1e-5, rtol=1e-5)


def test_reparameterize_switches_every_shaped_attention_and_keeps_names_and_sharing() -> None:
    model = _trained_looking("tiny-student", sasp=SaspCfg(share="qk"))
    fused = reparameterize(model)
    attns = [m for m in fused.modules() if isinstance(m, ShapedAttention)]
    assert attns and all(type(m) is InferenceShapedAttention for m in attns)
    assert not any(type(m) is InferenceShapedAttention for m in model.modules())  # the original is untouched
    names = {n: sorted(m.state_dict()) for n, m in fused.named_modules() if isinstance(m, ShapedAttention)}
    before = {n: sorted(m.state_dict()) for n, m in model.named_modules() if isinstance(m, ShapedAttention)}
    assert names == before and len(names) == 2
    assert attns[0].qk is attns[1].qk
