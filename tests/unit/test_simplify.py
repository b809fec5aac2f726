"""simplify(): which blocks are swapped, how weights are shared and inherited, on the tiny presets."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from siclip.config import SaspCfg
from siclip.models.presets import build_preset, build_tokenizer
from siclip.models.sasp import SASPBlock
from siclip.models.simplify import find_replaceable, simplify

torch.set_num_threads(1)

LAST_STAGE = "visual.trunk.stages.2.blocks"


@pytest.fixture(scope="module")
def teacher() -> Any:
    torch.manual_seed(0)
    return build_preset("tiny-teacher")


def _blocks(model: Any) -> list[Any]:
    return [model.get_submodule(f"{LAST_STAGE}.{i}") for i in range(2)]


def test_default_replaces_the_two_last_stage_blocks_and_shares_qk(teacher: Any) -> None:
    model: Any = copy.deepcopy(teacher)
    old = _blocks(model)
    report = simplify(model, SaspCfg())
    assert report["replaced"] == [f"{LAST_STAGE}.0", f"{LAST_STAGE}.1"]
    b0, b1 = _blocks(model)
    assert all(isinstance(b, SASPBlock) for b in (b0, b1)) and b0 is not b1
    assert b0.attn.qk.weight.data_ptr() == b1.attn.qk.weight.data_ptr()
    assert [f"{LAST_STAGE}.0.attn.qk.weight", f"{LAST_STAGE}.1.attn.qk.weight"] in report["shared"]
    assert b0.mlp.fc1.weight.data_ptr() != b1.mlp.fc1.weight.data_ptr()
    # Q/K inherited from the first replaced block; norm and MLP from each block.
    dim = old[0].token_mixer.qkv.in_features
    assert torch.equal(b0.attn.qk.weight, old[0].token_mixer.qkv.weight[: 2 * dim])
    for new, src in zip((b0, b1), old, strict=True):
        assert torch.equal(new.mlp.fc1.weight, src.mlp.fc1.weight)
        assert torch.equal(new.norm.weight, src.norm.weight)
        assert torch.equal(new.norm.running_var, src.norm.running_var)
    assert report["params_after"] < report["params_before"]
    assert find_replaceable(model.visual) == []  # nothing left to replace


def test_share_block_reuses_one_module(teacher: Any) -> None:
    model: Any = copy.deepcopy(teacher)
    report = simplify(model, SaspCfg(share="block"))
    b0, b1 = _blocks(model)
    assert b0 is b1
    assert all(p.data_ptr() == q.data_ptr() for p, q in zip(b0.parameters(), b1.parameters(), strict=True))
    qk_only: Any = copy.deepcopy(teacher)
    simplify(qk_only, SaspCfg(share="qk"))
    assert report["params_after"] < sum(p.numel() for p in qk_only.parameters())


def test_share_none_keeps_separate_tensors(teacher: Any) -> None:
    model: Any = copy.deepcopy(teacher)
    old = _blocks(model)
    report = simplify(model, SaspCfg(share="none"))
    b0, b1 = _blocks(model)
    assert b0.attn.qk.weight.data_ptr() != b1.attn.qk.weight.data_ptr()
    assert report["shared"] == []
    dim = old[1].token_mixer.qkv.in_features
    assert torch.equal(b1.attn.qk.weight, old[1].token_mixer.qkv.weight[: 2 * dim])


def test_zero_init_makes_attention_identity_and_fresh_mlp(teacher: Any) -> None:
    model: Any = copy.deepcopy(teacher)
    old = _blocks(model)
    simplify(model, SaspCfg(share="none", qk_init="zero", inherit_mlp=False, first_value=True))
    b0, b1 = _blocks(model)
    dim = old[0].token_mixer.qkv.in_features
    assert torch.count_nonzero(b0.attn.qk.weight[:dim]) == 0
    assert torch.equal(b0.attn.qk.weight[dim:], torch.zeros_like(b0.attn.qk.weight[dim:])) is False
    assert not torch.equal(b0.mlp.fc1.weight, old[0].mlp.fc1.weight)
    assert b0.attn.value is not None and b1.attn.value is None  # value matrix only in the first block
    tokens = torch.randn(2, 16, dim)
    assert torch.equal(b1.attn(tokens), tokens)


def test_gains_from_config(teacher: Any) -> None:
    model: Any = copy.deepcopy(teacher)
    simplify(model, SaspCfg(attn_gain=0.5, mlp_gain=0.2))
    b0, _ = _blocks(model)
    assert b0.attn_gain.item() == 0.5 and b0.mlp_gain.item() == pytest.approx(0.2)


def test_text_tower_of_open_clip(teacher: Any) -> None:
    model: Any = copy.deepcopy(teacher)
    old = model.text.transformer.resblocks[0]
    report = simplify(model, SaspCfg(replace="text"))
    assert report["replaced"] == ["text.transformer.resblocks.0", "text.transformer.resblocks.1"]
    new = model.text.transformer.resblocks[0]
    assert isinstance(new, SASPBlock) and new.layout == "seq"
    width = old.attn.embed_dim
    assert torch.equal(new.attn.qk.weight, old.attn.in_proj_weight[: 2 * width])
    assert torch.equal(new.attn.qk.bias, old.attn.in_proj_bias[: 2 * width])
    assert not any(isinstance(m, SASPBlock) for m in model.visual.modules())
    tokens = build_tokenizer("tiny-teacher")(["a red circle", "a blue square"])
    out = model.encode_text(tokens)
    assert out.shape == (2, 64) and torch.isfinite(out).all()


def test_causal_open_clip_text_tower_stays_identity_with_zero_query() -> None:
    from open_clip.transformer import TextTransformer

    torch.manual_seed(1)
    text = TextTransformer(context_length=8, vocab_size=100, width=16, heads=2, layers=2, output_dim=8)
    assert text.attn_mask is not None  # causal
    simplify_text = nn.Module()
    simplify_text.text = text
    simplify(simplify_text, SaspCfg(replace="text", qk_init="zero"))
    block: Any = text.transformer.resblocks[0]
    h = torch.randn(2, 8, 16)
    assert torch.equal(block.attn(h, text.attn_mask), h)
    assert torch.isfinite(text(torch.randint(0, 100, (2, 8)))).all()


def test_both_towers_of_mct_model() -> None:
    torch.manual_seed(2)
    model: Any = build_preset("tiny-mct")
    report = simplify(model, SaspCfg(replace="both"))
    text_blocks = [n for n in report["replaced"] if n.startswith("text.")]
    assert text_blocks == ["text.transformer.1", "text.transformer.2"]  # MCt's transformer layers
    assert len(report["replaced"]) == 4
    qk_groups = [g for g in report["shared"] if g[0].endswith("attn.qk.weight")]
    assert len(qk_groups) == 2  # one shared Q/K per tower, not across towers
    tokens = build_tokenizer("tiny-mct")(["a red circle"])
    loss = model.encode_text(tokens).sum() + model.encode_image(torch.randn(1, 3, 64, 64)).sum()
    loss.backward()


def test_replace_none_and_errors(teacher: Any) -> None:
    model: Any = copy.deepcopy(teacher)
    assert simplify(model, SaspCfg(replace="none"))["replaced"] == []
    simplify(model, SaspCfg())
    with pytest.raises(ValueError, match="no attention block"):
        simplify(model, SaspCfg())
