"""MCt contracts the model-level tests do not pin: exact BatchNorm folding (eps included), fusion keeping
the block's dtype and device, the causal mask's values / dtype / device, ``lock`` (open_clip's
``lock_text_tower``) freezing exactly the documented parameters, and which keys the Apple converter keeps."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from siclip.models.mct import MCtTextEncoder, MobileOne1d, RepMixer, convert_apple_state_dict

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


@pytest.mark.parametrize("n", [1, 2, 5])
def test_causal_mask_values(n: int) -> None:
    mask = _tiny().causal_mask(n, torch.device("cpu"), torch.float64)
    assert mask.shape == (n, n) and mask.dtype == torch.float64
    for i in range(n):
        for j in range(n):
            assert mask[i, j].item() == (float("-inf") if j > i else 0.0), (i, j)


def test_causal_mask_follows_requested_device_and_dtype() -> None:
    mask = _tiny().causal_mask(4, torch.device("meta"), torch.bfloat16)
    assert mask.device.type == "meta" and mask.dtype == torch.bfloat16


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


def _forward_calls(mct: MCtTextEncoder, *, train: bool) -> list[int]:
    calls = [0] * len(mct.transformer)
    for i, layer in enumerate(mct.transformer):
        # a pre-hook: recomputation stops early once backward has what it needs, before forward hooks run
        layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    mct.train(train)
    mct(torch.randint(0, 50, (2, 12))).sum().backward()
    return calls


def test_grad_checkpointing_recomputes_layers_only_when_training() -> None:
    """Checkpointed layers run again in backward (activations not kept); off, or in eval, they run once."""
    torch.manual_seed(8)
    plain = _tiny()
    assert plain.grad_checkpointing is False  # off until open_clip's set_grad_checkpointing asks
    assert _forward_calls(plain, train=True) == [1, 1, 1, 1]
    ckpt = _tiny()
    ckpt.set_grad_checkpointing()
    assert ckpt.grad_checkpointing is True
    assert _forward_calls(ckpt, train=True) == [2, 2, 2, 2]
    evaluated = _tiny()
    evaluated.set_grad_checkpointing(True)
    assert _forward_calls(evaluated, train=False) == [1, 1, 1, 1]
    evaluated.set_grad_checkpointing(False)
    assert evaluated.grad_checkpointing is False


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


def test_layer_scales_start_at_1e_5() -> None:
    """Apple's init: both residual branches of a RepMixer block start almost closed."""
    mct = _tiny()
    scales = {n: p for n, p in mct.named_parameters() if n.endswith("layer_scale")}
    assert len(scales) == 4
    for name, p in scales.items():
        assert p.shape == (16, 1, 1) and torch.equal(p, torch.full_like(p, 1e-5)), name


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
    from siclip.models.mct import TransformerEncoder

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
