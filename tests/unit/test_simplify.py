"""simplify(): which blocks are swapped, how weights are shared and inherited (tiny presets and bare open_clip,
timm and MCt blocks), that a simplified stack computes the SAS-P formula against a naive reference, and what
simplify() reports and marks for weight inheritance and export."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.transformer import ResidualAttentionBlock, TextTransformer, Transformer
from torch import nn

from siclip.config import SaspCfg
from siclip.models.presets import build_preset, build_tokenizer
from siclip.models.sasp import SASPBlock
from siclip.models.simplify import (
    find_replaceable,
    replaced_prefixes,
    sasp_module_names,
    simplify,
    simplify_tower,
    towers,
)

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


# ----------------------------------------------------------------------------------------- bare blocks


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


def _reference_mix(attn: Any, h: torch.Tensor) -> torch.Tensor:
    """``A(h) @ h`` per head on ``(B, N, C)`` tokens, ``A = alpha*I + beta*softmax(QK^T/sqrt(d)) - gamma/N``."""
    b, n, c = h.shape
    dh = attn.head_dim
    w, bias = attn.qk.weight, attn.qk.bias
    a = torch.empty_like(h)
    for bi in range(b):
        for hd in range(attn.num_heads):
            q = h[bi] @ w[hd * dh : (hd + 1) * dh].T
            k = h[bi] @ w[attn.num_heads * dh + hd * dh :][:dh].T
            if bias is not None:
                q = q + bias[hd * dh : (hd + 1) * dh]
                k = k + bias[attn.num_heads * dh + hd * dh :][:dh]
            probs = torch.softmax(q @ k.T / math.sqrt(dh), dim=-1)
            eye = torch.eye(n, dtype=h.dtype)
            mix = attn.alpha[hd] * eye + attn.beta[hd] * probs - attn.gamma[hd] / n
            cols = slice(hd * (c // attn.num_heads), (hd + 1) * (c // attn.num_heads))
            a[bi, :, cols] = mix @ h[bi, :, cols]
    return a


def _reference_block(block: Any, x: torch.Tensor) -> torch.Tensor:
    """``attn_gain * A(Norm(x)) @ Norm(x) + mlp_gain * MLP(Norm(x))``, batch-first tokens or a feature map."""
    h = block.norm(x)
    if h.dim() == 4:
        b, c, hh, ww = h.shape
        a = _reference_mix(block.attn, h.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, hh, ww)
    else:
        a = _reference_mix(block.attn, h)
    return block.attn_gain * a + block.mlp_gain * block.mlp(h)


@pytest.mark.parametrize("batch_first", [True, False])
def test_open_clip_stack_becomes_sasp_blocks_of_the_same_geometry(batch_first: bool) -> None:
    torch.manual_seed(1)
    stack = Transformer(width=8, layers=2, heads=2, batch_first=batch_first).double()
    with torch.no_grad():
        for blk in stack.resblocks:
            blk.attn.in_proj_bias.normal_()  # open_clip starts it at zero
            blk.ln_1.weight.uniform_(0.5, 1.5)
    old: list[Any] = [copy.deepcopy(blk) for blk in stack.resblocks]
    cfg = SaspCfg(attn_gain=0.7, mlp_gain=0.3)
    names = simplify_tower(stack, cfg)
    assert names == ["resblocks.0", "resblocks.1"]
    assert stack.siclip_sasp == {"cfg": dataclasses.asdict(cfg), "replaced": names}
    new: list[Any] = list(stack.resblocks)
    assert all(isinstance(blk, SASPBlock) for blk in new)
    for blk, src in zip(new, old, strict=True):
        assert blk.layout == "seq" and blk.batch_first is batch_first
        assert (blk.attn.num_heads, blk.attn.head_dim, blk.attn.qk.in_features) == (2, 4, 8)
        assert blk.attn.qk.weight.dtype == torch.float64
        # Q/K from the first replaced block (shared by default), norm and MLP from each block.
        assert torch.equal(blk.attn.qk.weight, old[0].attn.in_proj_weight[:16])
        assert torch.equal(blk.attn.qk.bias, old[0].attn.in_proj_bias[:16])
        assert torch.equal(blk.norm.weight, src.ln_1.weight) and torch.equal(
            blk.mlp.c_fc.weight, src.mlp.c_fc.weight
        )
    assert new[0].attn.qk is new[1].attn.qk  # default share="qk": one module, from the first block
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = _reference_block(new[1], _reference_block(new[0], x))
        out = stack(x)  # open_clip takes (B, N, C) and hands (N, B, C) to blocks that are not batch-first
    torch.testing.assert_close(out, ref)


def test_replaced_blocks_are_left_untouched() -> None:
    torch.manual_seed(2)
    stack = Transformer(width=8, layers=2, heads=2)
    old = list(stack.resblocks)
    before = [copy.deepcopy(blk.state_dict()) for blk in old]
    simplify_tower(stack, SaspCfg(share="none"))
    stack(torch.randn(2, 4, 8)).square().sum().backward()
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(1.0)  # an optimiser step on the simplified stack
    for blk, state in zip(old, before, strict=True):
        for key, value in blk.state_dict().items():
            assert torch.equal(value, state[key]), key


def _tiny_clip() -> Any:
    torch.manual_seed(3)
    vision = CLIPVisionCfg(layers=1, width=16, head_width=8, patch_size=8, image_size=16)
    text = CLIPTextCfg(context_length=6, vocab_size=50, width=8, heads=2, layers=2)
    return CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text)


def test_plain_open_clip_clip_keeps_its_text_tower_on_the_model() -> None:
    model = _tiny_clip()
    found = towers(model)
    assert found == {"image": model.visual, "text": model.transformer}
    assert towers(model.visual) == {}  # a ViT has a transformer but no token embedding: no text tower
    assert towers(model.transformer) == {}
    report = simplify(model, SaspCfg(replace="both"))
    assert report["replaced"] == [
        "visual.transformer.resblocks.0",
        "transformer.resblocks.0",
        "transformer.resblocks.1",
    ]
    assert replaced_prefixes(model) == report["replaced"]
    assert model.encode_text(torch.randint(0, 50, (2, 6))).shape == (2, 8)


def test_cross_attention_blocks_are_not_replaceable() -> None:
    stack = nn.Sequential(ResidualAttentionBlock(8, 2), ResidualAttentionBlock(8, 2, is_cross_attention=True))
    assert find_replaceable(stack) == ["0"]
    cross = stack[1]
    assert simplify_tower(stack, SaspCfg()) == ["0"]  # a direct child of the tower is replaced in place
    assert isinstance(stack[0], SASPBlock) and stack[1] is cross
    assert find_replaceable(_text(layers=2)) == BLOCKS[:2]


def test_configuration_errors_name_the_setting_and_the_tower() -> None:
    with pytest.raises(ValueError) as err:
        simplify(_model(), SaspCfg(replace="image"))  # a text-only model
    assert "sasp.replace" in str(err.value) and "image tower" in str(err.value)
    model = _tiny_clip()
    simplify(model, SaspCfg(replace="image"))
    with pytest.raises(ValueError) as err:
        simplify(model, SaspCfg(replace="both"))  # the image tower was simplified already
    assert "no attention block" in str(err.value) and "image tower" in str(err.value)


def test_mct_layers_become_sasp_blocks_of_the_same_geometry() -> None:
    from siclip.models.mct import TransformerEncoder

    torch.manual_seed(4)
    stack: Any = nn.Sequential(*(TransformerEncoder(8, num_heads=2, ffn_dim=16) for _ in range(2)))
    with torch.no_grad():
        for p in stack.parameters():
            p.normal_(0, 0.5)
    old: list[Any] = [copy.deepcopy(layer) for layer in stack]
    assert simplify_tower(stack, SaspCfg(share="none")) == ["0", "1"]
    new: list[Any] = list(stack)
    x = torch.randn(2, 5, 8)
    for blk, src in zip(new, old, strict=True):
        assert blk.layout == "seq" and blk.batch_first is True
        assert (blk.attn.num_heads, blk.attn.head_dim) == (2, 4)
        assert torch.equal(blk.attn.qk.weight, src.pre_norm_mha[1].qkv_proj.weight[:16])
        assert torch.equal(blk.attn.qk.bias, src.pre_norm_mha[1].qkv_proj.bias[:16])
        assert torch.equal(blk.norm.weight, src.pre_norm_mha[0].weight)
        with torch.no_grad():
            h = src.pre_norm_mha[0](x)
            # the MLP is MCt's FFN without its own pre-norm (one norm feeds both branches)
            torch.testing.assert_close(blk.mlp(h), src.pre_norm_ffn[1:](h))
            torch.testing.assert_close(blk(x), _reference_block(blk, x), rtol=1e-5, atol=1e-5)


def test_fastvit_block_with_a_biased_qkv_inherits_its_query_key_rows() -> None:
    from timm.models.fastvit import AttentionBlock

    torch.manual_seed(5)
    block: Any = AttentionBlock(dim=64, mlp_ratio=1.0)  # timm: head_dim 32, so 2 heads
    block.token_mixer.qkv = nn.Linear(64, 192, bias=True)
    with torch.no_grad():
        block.norm.running_mean.normal_()
    old = copy.deepcopy(block)
    stack = nn.Sequential(block).eval()
    assert simplify_tower(stack, SaspCfg()) == ["0"]
    new: Any = stack[0]
    assert new.layout == "conv" and (new.attn.num_heads, new.attn.head_dim) == (2, 32)
    assert torch.equal(new.attn.qk.weight, old.token_mixer.qkv.weight[:128])
    assert torch.equal(new.attn.qk.bias, old.token_mixer.qkv.bias[:128])
    assert torch.equal(new.norm.running_mean, old.norm.running_mean)
    x = torch.randn(1, 64, 2, 3)
    with torch.no_grad():
        torch.testing.assert_close(new(x), _reference_block(new, x), rtol=1e-5, atol=1e-5)
