"""MCt text tower: size, Apple key layout / converter, every layer's math against explicit ops, causal
masking, RepMixer / MobileOne fusion (dtype, device, BatchNorm eps), ``lock``, gradient checkpointing."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from siclip.models.mct import (
    MCtTextEncoder,
    MobileOne1d,
    MultiHeadAttention,
    RepMixer,
    TransformerEncoder,
    convert_apple_state_dict,
)

torch.set_num_threads(1)


def _tiny(**kw: Any) -> MCtTextEncoder:
    args: dict[str, Any] = dict(
        embed_dim=8, dim=16, context_length=12, vocab_size=50, num_layers=2, num_heads=2
    )
    args.update(kw)
    return MCtTextEncoder(**args)


def _randomise_bn(module: nn.Module, *, var_low: float, var_high: float) -> None:
    """BatchNorm statistics and affine terms away from their init (else every fold is trivially exact)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(var_low, var_high)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
            if hasattr(m, "layer_scale"):
                m.get_parameter("layer_scale").normal_(0, 0.3)


def test_full_size_mct_has_42_4_m_parameters() -> None:
    mct = MCtTextEncoder()  # dim 512, context 77, vocab 49408, 4 layers, projection to 512
    n = sum(p.numel() for p in mct.parameters())
    assert abs(n - 42.4e6) / 42.4e6 < 0.01, n
    assert (mct.context_length, mct.vocab_size) == (77, 49408)
    # the defaults are Apple's MCt (siclip/model_configs/mobileclip-s0.json spells them out): width 512, 8 heads, non-causal
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
    _randomise_bn(mct, var_low=0.5, var_high=2.0)
    mct.eval()
    fused: Any = reparameterize(mct)
    assert all(
        getattr(b.token_mixer, "reparam_conv", None) is not None
        for b in (fused.transformer[0], fused.transformer[-1])
    )
    text = torch.randint(0, 50, (3, 12))
    torch.testing.assert_close(fused(text), mct(text), atol=1e-4, rtol=1e-4)


def test_mobileone_fused_kernel_is_the_eval_block_with_eps() -> None:
    """Variances of the order of BatchNorm's eps: folding ``var - eps`` instead of ``var + eps`` is far off."""
    torch.manual_seed(0)
    block = MobileOne1d(3, 5, num_conv_branches=2).double()
    _randomise_bn(block, var_low=1e-5, var_high=1e-4)
    block.eval()
    kernel, bias = block.fused_kernel_bias()
    assert kernel.shape == (3, 1, 1, 5) and bias.shape == (3,)
    x = torch.randn(2, 3, 1, 9, dtype=torch.float64)
    fused = F.conv2d(x, kernel, bias, padding=(0, 2), groups=3)
    torch.testing.assert_close(fused, block(x), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.bfloat16, 0.05)])
def test_repmixer_fusion_keeps_the_blocks_dtype(dtype: torch.dtype, tol: float) -> None:
    """A float64 / bfloat16 RepMixer fuses to a conv of its own dtype that runs on its input and equals it
    (float64: exactly, with variances near BatchNorm's eps)."""
    torch.manual_seed(2)
    mixer = RepMixer(4, kernel_size=5)
    _randomise_bn(mixer, var_low=1e-5, var_high=1e-2)
    mixer = mixer.to(dtype).eval()
    kernel, bias = mixer.mixer.fused_kernel_bias()
    assert kernel.dtype == dtype and bias.dtype == dtype
    x = torch.randn(2, 4, 1, 9).to(dtype)
    with torch.no_grad():
        expected = mixer(x)
        mixer.reparameterize()
        got = mixer(x)
    assert mixer.reparam_conv is not None and mixer.reparam_conv.weight.dtype == dtype
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected.double(), atol=tol, rtol=tol)


def test_fusion_stays_on_the_blocks_device() -> None:
    """Kernels and the fused conv are built on the block's device (``meta`` stands in for an accelerator)."""
    block = MobileOne1d(3, 5, num_conv_branches=1).to("meta")
    kernel, bias = block.fused_kernel_bias()
    assert kernel.device.type == "meta" and bias.device.type == "meta"
    mixer = RepMixer(3, kernel_size=5).to("meta")
    mixer.reparameterize()
    assert mixer.reparam_conv is not None and mixer.reparam_conv.weight.device.type == "meta"


def test_causal_position_sees_itself_but_not_the_next_token() -> None:
    """With the RepMixer blocks off (zero layer scales) only attention mixes positions."""
    torch.manual_seed(3)
    mct = _tiny(causal=True).eval()
    with torch.no_grad():
        for block in (mct.transformer[0], mct.transformer[-1]):
            block.get_parameter("token_mixer.layer_scale").zero_()
            block.get_parameter("layer_scale").zero_()
    text = torch.randint(1, 40, (1, 12))
    base = mct.forward_tokens(text)[0]
    nxt, own = text.clone(), text.clone()
    nxt[0, 4] = 45 if text[0, 4] != 45 else 46
    own[0, 3] = 45 if text[0, 3] != 45 else 46
    assert torch.equal(mct.forward_tokens(nxt)[0, :4], base[:4])
    assert not torch.allclose(mct.forward_tokens(own)[0, 3], base[3])


def _trainable(mct: nn.Module) -> set[str]:
    return {n for n, p in mct.named_parameters() if p.requires_grad}


def test_lock_freezes_the_whole_tower_by_default() -> None:
    mct = _tiny()
    assert _trainable(mct) == {n for n, _ in mct.named_parameters()}
    mct.lock()
    assert _trainable(mct) == set()


def test_lock_keeps_the_last_layers_norm_and_projection_trainable() -> None:
    mct = _tiny()  # transformer = [RepMixerBlock, TransformerEncoder x 2, RepMixerBlock]
    names = {n for n, _ in mct.named_parameters()}
    mct.lock(unlocked_layers=1)
    assert _trainable(mct) == {
        n for n in names if n.startswith(("transformer.3.", "final_layer_norm.", "projection_layer"))
    }
    mct2 = _tiny()
    mct2.lock(unlocked_layers=2)
    assert _trainable(mct2) == {
        n
        for n in names
        if n.startswith(("transformer.2.", "transformer.3.", "final_layer_norm.", "projection_layer"))
    }


def test_lock_with_trainable_layer_norms() -> None:
    mct = _tiny()
    layer_norms = {
        f"{m}.{p}"
        for m, mod in mct.named_modules()
        if isinstance(mod, nn.LayerNorm)
        for p in ("weight", "bias")
    }
    assert len(layer_norms) == 2 * (2 * 2 + 1)  # two per transformer layer and the final one
    mct.lock(freeze_layer_norm=False)
    assert _trainable(mct) == layer_norms
    mct.lock(unlocked_layers=1, freeze_layer_norm=False)
    assert _trainable(mct) == layer_norms | {
        n for n, _ in mct.named_parameters() if n.startswith(("transformer.3.", "projection_layer"))
    }


def test_lock_through_open_clip_lock_text_tower() -> None:
    from siclip.models.presets import build_preset

    model: Any = build_preset("tiny-mct")  # MCt with 2 transformer layers: transformer.3 is the last block
    model.lock_text_tower(1)
    text = {n.removeprefix("text.") for n in _trainable(model) if n.startswith("text.")}
    assert text == {
        n
        for n, _ in model.text.named_parameters()
        if n.startswith(("transformer.3.", "final_layer_norm.", "projection_layer"))
    }
    assert all(p.requires_grad for p in model.visual.parameters())  # the image tower is not touched


def test_convert_apple_keeps_text_and_scalars_and_drops_raw_image_keys() -> None:
    t, s = torch.randn(3), torch.tensor(2.0)
    flat = {
        "image_encoder.model.patch_embed.0.rbr_conv.0.conv.weight": torch.randn(2, 3, 3, 3),
        "image_encoder.model.head.proj": torch.randn(8, 4),
        "text_encoder.final_layer_norm.weight": t,
        "logit_scale": s,
    }
    expected = {
        "visual.trunk.stem.0.conv_kxk.0.conv.weight",
        "visual.trunk.head.fc.weight",
        "visual.trunk.head.fc.bias",
        "text.final_layer_norm.weight",
        "logit_scale",
    }
    for ckpt in (flat, {"state_dict": flat}):
        out = convert_apple_state_dict(ckpt)
        assert set(out) == expected
        assert out["text.final_layer_norm.weight"] is t and out["logit_scale"] is s


def test_convert_apple_unwraps_only_a_dict_state_dict() -> None:
    """A flat checkpoint whose ``state_dict`` entry is a tensor keeps it as an ordinary key."""
    t, odd = torch.randn(3), torch.tensor(1)
    out = convert_apple_state_dict({"state_dict": odd, "text_encoder.x": t})
    assert out == {"state_dict": odd, "text.x": t}


def _interp_reference(pe: torch.Tensor, n: int) -> torch.Tensor:
    """Linear interpolation along the sequence, half-pixel centres, clamped at both ends (bilinear with
    ``align_corners=False`` on an axis whose other dimension keeps its size)."""
    length = pe.shape[0]
    rows = []
    for i in range(n):
        src = max((i + 0.5) * length / n - 0.5, 0.0)
        i0 = min(int(src), length - 1)
        i1 = min(i0 + 1, length - 1)
        w = src - i0
        rows.append((1 - w) * pe[i0] + w * pe[i1])
    return torch.stack(rows)


@pytest.mark.parametrize("n", [8, 5, 3, 11, 16])  # 16: the width, so rows and columns cannot be confused
def test_positions_for_other_lengths_are_interpolated(n: int) -> None:
    """The stored ``(1, 1, 8, D)`` table at its own length, resampled linearly for shorter or longer text."""
    torch.manual_seed(5)
    mct = _tiny(context_length=8).double()
    table = mct.positional_embedding.pos_embed.pos_embed
    got = mct.positional_embedding(n)
    assert got.shape == (1, n, 16)
    if n == 8:
        assert torch.equal(got[0], table[0, 0])
    torch.testing.assert_close(got[0], _interp_reference(table[0, 0].detach(), n), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_layer_norm_runs_in_float32_and_returns_the_input_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    mct = _tiny()
    ln = mct.final_layer_norm
    with torch.no_grad():
        ln.weight.normal_(1, 0.3)
        ln.bias.normal_(0, 0.3)
    x = (3 * torch.randn(2, 5, 16) + 1).to(dtype)
    out = ln(x)
    assert out.dtype == dtype
    ref = F.layer_norm(x.float(), (16,), ln.weight, ln.bias, ln.eps).to(dtype)
    assert torch.equal(out, ref)


def test_dropouts_are_off_in_training_mode() -> None:
    """Training mode changes nothing but BatchNorm: with BatchNorm held in eval, train == eval."""
    torch.manual_seed(7)
    mct = _tiny()
    _randomise_bn(mct, var_low=0.5, var_high=2.0)
    text = torch.randint(0, 50, (2, 12))
    expected = mct.eval()(text)
    mct.train()
    for m in mct.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    assert torch.equal(mct(text), expected)


def _saved_for_backward(mct: MCtTextEncoder, text: torch.Tensor) -> int:
    """Bytes of activations autograd keeps for the backward pass of ``mct(text)``."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mct(text).sum().backward()
    return saved


def test_grad_checkpointing_keeps_fewer_activations_only_when_training() -> None:
    torch.manual_seed(8)
    text = torch.randint(0, 50, (2, 12))
    plain, ckpt = _tiny(), _tiny()
    ckpt.set_grad_checkpointing(True)
    assert _saved_for_backward(ckpt.train(), text) < _saved_for_backward(plain.train(), text) / 2
    # in eval mode nothing is recomputed: it keeps what the plain tower keeps
    assert _saved_for_backward(ckpt.eval(), text) == _saved_for_backward(plain.eval(), text)
    ckpt.set_grad_checkpointing(False)
    assert _saved_for_backward(ckpt.train(), text) == _saved_for_backward(plain.train(), text)


def test_grad_checkpointing_gives_the_same_outputs_and_gradients() -> None:
    """Causal, so the checkpointed layers must get the mask too."""
    torch.manual_seed(9)
    a = _tiny(causal=True)
    b = _tiny(causal=True)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    text = torch.randint(0, 50, (2, 12))
    out_a, out_b = a(text), b(text)
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=1e-5)
    for out in (out_a, out_b):
        out.square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert pa.grad is not None and pb.grad is not None, name
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_no_weight_decay_names_the_position_table() -> None:
    mct = _tiny()
    assert mct.no_weight_decay() == {"positional_embedding.pos_embed.pos_embed"}
    assert mct.no_weight_decay() <= {n for n, _ in mct.named_parameters()}


def test_repmixer_block_is_token_mixing_then_a_layer_scaled_conv_ffn() -> None:
    """``y = RepMixer(x)``, then ``y + layer_scale * fc2(GELU(fc1(BN(dwconv(y)))))``, on ``(B, N, C)`` tokens."""
    torch.manual_seed(10)
    mct = _tiny(repmixer_kernel=5)
    _randomise_bn(mct, var_low=0.5, var_high=2.0)
    block: Any = mct.transformer[0].eval()
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        y = block.token_mixer(x.transpose(1, 2).unsqueeze(2))
        ffn = block.convffn
        h = F.conv2d(y, ffn.conv.conv.weight, padding=(0, 2), groups=16)
        h = F.batch_norm(h, ffn.conv.bn.running_mean, ffn.conv.bn.running_var, ffn.conv.bn.weight,
                         ffn.conv.bn.bias, eps=ffn.conv.bn.eps)  # fmt: skip
        h = F.conv2d(F.gelu(F.conv2d(h, ffn.fc1.weight, ffn.fc1.bias)), ffn.fc2.weight, ffn.fc2.bias)
        expected = (y + block.layer_scale * h).squeeze(2).transpose(1, 2)
        torch.testing.assert_close(block(x), expected, atol=1e-6, rtol=1e-5)


def test_repmixer_kernel_size_reaches_every_depthwise_conv() -> None:
    mct = _tiny(repmixer_kernel=7)
    convs = {n: tuple(p.shape) for n, p in mct.named_parameters() if n.endswith("conv.weight")}
    assert len(convs) == 4  # per RepMixer block: the mixer's conv branch and the ConvFFN's depthwise conv
    assert set(convs.values()) == {(16, 1, 1, 7)}


def test_initialisation_scales() -> None:
    """Apple's init: token embeddings N(0, 0.02), positions and projection ~ dim**-0.5, every Linear / Conv2d
    weight truncated N(0, 0.02) with zero biases (sample standard deviations within sampling error)."""
    torch.manual_seed(11)
    mct = _tiny(dim=64, vocab_size=400, context_length=64, embed_dim=32, num_layers=1)

    def close(t: torch.Tensor, std: float) -> bool:
        return abs(t.detach().std().item() / std - 1) < 0.15 and abs(t.detach().mean().item()) < 0.2 * std

    assert close(mct.embedding_layer.weight, 0.02)
    assert close(mct.positional_embedding.pos_embed.pos_embed, 64**-0.5)
    assert close(mct.projection_layer, 64**-0.5)
    layers = [m for m in mct.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert (
        len(layers) == 2 * 4 + 4
    )  # per RepMixer block: 2 depthwise convs, fc1, fc2; qkv, out, 2 FFN linears
    for m in layers:
        assert close(m.weight, 0.02), m
        assert m.bias is None or torch.equal(m.bias, torch.zeros_like(m.bias)), m


def test_transformer_layer_is_pre_norm_attention_then_pre_norm_ffn() -> None:
    """``x + MHA(LN1(x))``, then ``+ W2 GELU(W1 LN2(.) + b1) + b2``, written with explicit ops (masked)."""
    torch.manual_seed(12)
    layer: Any = TransformerEncoder(12, num_heads=3, ffn_dim=20)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 5, 12)
    mask = torch.zeros(5, 5).masked_fill(torch.rand(5, 5) < 0.3, float("-inf"))
    mask.fill_diagonal_(0.0)

    def ln(t: torch.Tensor, m: nn.LayerNorm) -> torch.Tensor:
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias

    mha = layer.pre_norm_mha[1]
    qkv = ln(x, layer.pre_norm_mha[0]) @ mha.qkv_proj.weight.T + mha.qkv_proj.bias
    heads = []
    for h in range(3):
        q, k, v = (qkv[..., j * 12 + 4 * h : j * 12 + 4 * (h + 1)] for j in range(3))
        heads.append(torch.softmax(q @ k.transpose(1, 2) / 2.0 + mask, -1) @ v)
    x1 = x + torch.cat(heads, -1) @ mha.out_proj.weight.T + mha.out_proj.bias
    fc1, fc2 = layer.pre_norm_ffn[1], layer.pre_norm_ffn[4]
    expected = x1 + F.gelu(ln(x1, layer.pre_norm_ffn[0]) @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x, mask), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("dim", "multiplier", "ffn"), [(32, 4.0, 128), (11, 3.0, 48), (20, 1.5, 32)])
def test_ffn_width_rounds_up_to_a_multiple_of_16(dim: int, multiplier: float, ffn: int) -> None:
    mct = MCtTextEncoder(embed_dim=4, dim=dim, context_length=4, vocab_size=10, num_layers=1, num_heads=1,
                         ffn_multiplier=multiplier)  # fmt: skip
    layer: Any = mct.transformer[1]
    assert layer.pre_norm_ffn[1].weight.shape == (ffn, dim) and layer.pre_norm_ffn[4].weight.shape == (
        dim,
        ffn,
    )


@pytest.mark.parametrize("causal", [False, True])
def test_with_every_residual_branch_closed_the_tower_is_norm_of_token_plus_position(causal: bool) -> None:
    """Zero layer scales and zero output projections make every block the identity: what is left is
    ``LN(E[token] + P[position])``, pooled at the largest token id and projected."""
    torch.manual_seed(13)
    mct = _tiny(causal=causal).eval()
    with torch.no_grad():
        for name, p in mct.named_parameters():
            if name.endswith("layer_scale") or ".out_proj." in name or ".pre_norm_ffn.4." in name:
                p.zero_()
        mct.final_layer_norm.weight.normal_(1, 0.3)
        mct.final_layer_norm.bias.normal_(0, 0.3)
    text = torch.tensor([[3, 7, 49, 0, 0, 0, 0, 0, 0, 0, 0, 0], [5, 1, 2, 4, 8, 9, 48, 0, 0, 0, 0, 0]])
    ln = mct.final_layer_norm
    table = mct.positional_embedding.pos_embed.pos_embed[0, 0]
    expected = F.layer_norm(mct.embedding_layer.weight[text] + table, (16,), ln.weight, ln.bias, ln.eps)
    with torch.no_grad():
        torch.testing.assert_close(mct.forward_tokens(text), expected, atol=1e-5, rtol=1e-5)
        pooled = torch.stack([expected[0, 2], expected[1, 6]])
        torch.testing.assert_close(mct(text), pooled @ mct.projection_layer, atol=1e-5, rtol=1e-5)


def test_a_causal_tower_runs_where_its_weights_are() -> None:
    """The causal mask is built on the tokens' device (``meta`` stands in for an accelerator)."""
    mct = _tiny(causal=True).eval().to("meta")
    out = mct(torch.randint(0, 50, (2, 12)).to("meta"))
    assert out.device.type == "meta" and out.shape == (2, 8)
