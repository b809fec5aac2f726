"""MCt text tower: size, Apple key layout / converter, attention and pooling math, RepMixer fusion."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from siclip.models.mct import MCtTextEncoder, MultiHeadAttention, convert_apple_state_dict

torch.set_num_threads(1)


def test_full_size_mct_has_42_4_m_parameters() -> None:
    mct = MCtTextEncoder()  # dim 512, context 77, vocab 49408, 4 layers, projection to 512
    n = sum(p.numel() for p in mct.parameters())
    assert abs(n - 42.4e6) / 42.4e6 < 0.01, n
    assert (mct.context_length, mct.vocab_size) == (77, 49408)
    # the defaults are Apple's MCt (siclip-mobileclip-s0.json spells them out): width 512, 8 heads, non-causal
    assert (mct.width, mct.output_dim, mct.causal) == (512, 512, False)
    assert {m.pre_norm_mha[1].num_heads for m in mct.transformer[1:-1]} == {8}
    assert {k: tuple(v.shape) for k, v in mct.state_dict().items()} == apple_text_keys(512, 4, 49408, 77, 512)
    assert [type(m).__name__ for m in mct.transformer] == ["RepMixerBlock"] + ["TransformerEncoder"] * 4 + [
        "RepMixerBlock"
    ]


def apple_text_keys(dim: int, layers: int, vocab: int, ctx: int, embed: int) -> dict[str, tuple[int, ...]]:
    """Apple's ``text_encoder.*`` names and shapes for variant ``mct``, written from Apple's module code
    (mobileclip/text_encoder.py, modules/text/repmixer.py, modules/common/transformer.py)."""
    ffn = int(math.ceil(dim * 4.0 / 16.0) * 16)
    bn = {
        "weight": (dim,),
        "bias": (dim,),
        "running_mean": (dim,),
        "running_var": (dim,),
        "num_batches_tracked": (),
    }
    keys: dict[str, tuple[int, ...]] = {
        "embedding_layer.weight": (vocab, dim),
        "positional_embedding.pos_embed.pos_embed": (1, 1, ctx, dim),
        "final_layer_norm.weight": (dim,),
        "final_layer_norm.bias": (dim,),
        "projection_layer": (dim, embed),
    }

    def repmixer_block(i: int) -> None:
        p = f"transformer.{i}."
        for branch in (
            "token_mixer.norm.rbr_skip",
            "token_mixer.mixer.rbr_skip",
            "token_mixer.mixer.rbr_conv.0.bn",
            "convffn.conv.bn",
        ):
            keys.update({f"{p}{branch}.{k}": s for k, s in bn.items()})
        keys[p + "token_mixer.mixer.rbr_conv.0.conv.weight"] = (dim, 1, 1, 11)
        keys[p + "token_mixer.layer_scale"] = (dim, 1, 1)
        keys[p + "convffn.conv.conv.weight"] = (dim, 1, 1, 11)
        keys[p + "convffn.fc1.weight"] = (4 * dim, dim, 1, 1)
        keys[p + "convffn.fc1.bias"] = (4 * dim,)
        keys[p + "convffn.fc2.weight"] = (dim, 4 * dim, 1, 1)
        keys[p + "convffn.fc2.bias"] = (dim,)
        keys[p + "layer_scale"] = (dim, 1, 1)

    repmixer_block(0)
    for i in range(1, layers + 1):
        p = f"transformer.{i}."
        keys.update({
            p + "pre_norm_mha.0.weight": (dim,), p + "pre_norm_mha.0.bias": (dim,),
            p + "pre_norm_mha.1.qkv_proj.weight": (3 * dim, dim), p + "pre_norm_mha.1.qkv_proj.bias": (3 * dim,),
            p + "pre_norm_mha.1.out_proj.weight": (dim, dim), p + "pre_norm_mha.1.out_proj.bias": (dim,),
            p + "pre_norm_ffn.0.weight": (dim,), p + "pre_norm_ffn.0.bias": (dim,),
            p + "pre_norm_ffn.1.weight": (ffn, dim), p + "pre_norm_ffn.1.bias": (ffn,),
            p + "pre_norm_ffn.4.weight": (dim, ffn), p + "pre_norm_ffn.4.bias": (dim,),
        })  # fmt: skip
    repmixer_block(layers + 1)
    return keys


def test_state_dict_follows_apple_layout() -> None:
    mct = MCtTextEncoder(embed_dim=24, dim=32, context_length=16, vocab_size=300, num_layers=2, num_heads=4)
    ours = {k: tuple(v.shape) for k, v in mct.state_dict().items()}
    assert ours == apple_text_keys(32, 2, 300, 16, 24)


def test_convert_apple_checkpoint_round_trip() -> None:
    from siclip.models.presets import build_preset

    torch.manual_seed(0)
    model = build_preset("tiny-mct")
    apple = {
        "text_encoder." + k: torch.randn(s) if s else torch.tensor(7)
        for k, s in apple_text_keys(64, 2, 49408, 32, 64).items()
    }
    apple["logit_scale"] = torch.tensor(4.2)
    converted = convert_apple_state_dict({"state_dict": apple})
    text_keys = {"text." + k[len("text_encoder.") :] for k in apple if k.startswith("text_encoder.")}
    assert set(converted) == {"logit_scale"} | text_keys
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.startswith("visual.") for k in missing)
    loaded = model.state_dict()
    for k, v in apple.items():
        assert torch.equal(loaded[k.replace("text_encoder.", "text.")], v)
    assert convert_apple_state_dict(converted).keys() == converted.keys()  # idempotent


def test_convert_apple_image_keys_go_through_timm() -> None:
    proj = torch.randn(8, 4)
    apple = {
        "image_encoder.model.patch_embed.0.rbr_conv.0.conv.weight": torch.randn(2, 3, 3, 3),
        "image_encoder.model.network.0.0.token_mixer.mixer.rbr_skip.weight": torch.randn(2),
        "image_encoder.model.head.proj": proj,
        "logit_scale": torch.tensor(1.0),
    }
    out = convert_apple_state_dict(apple)
    assert "visual.trunk.stem.0.conv_kxk.0.conv.weight" in out
    assert "visual.trunk.stages.0.blocks.0.token_mixer.mixer.identity.weight" in out
    assert torch.equal(out["visual.trunk.head.fc.weight"], proj.T)
    assert torch.equal(out["visual.trunk.head.fc.bias"], torch.zeros(4))


def test_multi_head_attention_matches_naive_per_head_loop() -> None:
    torch.manual_seed(1)
    mha = MultiHeadAttention(12, 3)
    x = torch.randn(2, 5, 12)
    w, b = mha.qkv_proj.weight, mha.qkv_proj.bias
    heads = []
    for h in range(3):
        rows = slice(h * 4, (h + 1) * 4)
        q = x @ w[rows].T + b[rows]
        k = x @ w[12:][rows].T + b[12:][rows]
        v = x @ w[24:][rows].T + b[24:][rows]
        heads.append(torch.softmax(q @ k.transpose(1, 2) / 2.0, -1) @ v)
    ref = mha.out_proj(torch.cat(heads, -1))
    torch.testing.assert_close(mha(x), ref, atol=1e-5, rtol=1e-5)


def test_eot_pooling() -> None:
    torch.manual_seed(2)
    mct = MCtTextEncoder(
        embed_dim=8, dim=16, context_length=6, vocab_size=50, num_layers=1, num_heads=2
    ).eval()
    text = torch.tensor([[3, 49, 5, 0, 0, 0], [3, 4, 5, 6, 49, 0]])
    tokens = mct.forward_tokens(text)
    torch.testing.assert_close(mct(text), torch.stack([tokens[0, 1], tokens[1, 4]]) @ mct.projection_layer)


@pytest.mark.parametrize("causal", [False, True])
def test_causal_switch(causal: bool) -> None:
    """Each RepMixer block reaches +-10 positions; at context 30 only attention links position 0 to 29."""
    torch.manual_seed(4)
    kw = dict(embed_dim=8, dim=16, context_length=30, vocab_size=50, num_layers=1, num_heads=2)
    mct: Any = MCtTextEncoder(causal=causal, **kw).eval()  # type: ignore[arg-type]
    text = torch.randint(1, 40, (1, 30))
    changed = text.clone()
    changed[0, 29] = 45
    first = mct.forward_tokens(text)[0, 0]
    first_changed = mct.forward_tokens(changed)[0, 0]
    assert torch.equal(first, first_changed) == causal


@pytest.mark.parametrize("causal", [False, True])
def test_repmixer_fusion_matches_training_form(causal: bool) -> None:
    from siclip.models.export import reparameterize

    torch.manual_seed(3)
    mct = MCtTextEncoder(embed_dim=8, dim=16, context_length=12, vocab_size=50, num_layers=1, num_heads=2,
                         causal=causal)  # fmt: skip
    with torch.no_grad():
        for m in mct.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
            if hasattr(m, "layer_scale"):
                m.get_parameter("layer_scale").normal_(0, 0.3)
    mct.eval()
    fused: Any = reparameterize(mct)
    assert all(
        getattr(b.token_mixer, "reparam_conv", None) is not None
        for b in (fused.transformer[0], fused.transformer[-1])
    )
    text = torch.randint(0, 50, (3, 12))
    torch.testing.assert_close(fused(text), mct(text), atol=1e-4, rtol=1e-4)
