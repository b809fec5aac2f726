"""SAS-P shaped attention and block: math against a naive per-head loop, exact identity at init, what the
constructor options shape, the errors a caller sees, and the switch to the inference form."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from siclip.models.sasp import InferenceShapedAttention, SASPBlock, ShapedAttention, is_sasp, to_inference

torch.set_num_threads(1)


def naive_shaped_attention(
    x: torch.Tensor,
    w_qk: torch.Tensor,
    b_qk: torch.Tensor | None,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
    *,
    num_heads: int,
    causal: bool = False,
) -> torch.Tensor:
    """A = alpha*I + beta*softmax(QK^T/sqrt(d)) - gamma*C per head and sample, applied to the raw input."""
    b, n, c = x.shape
    dh = c // num_heads
    out = torch.zeros_like(x)
    for bi in range(b):
        for h in range(num_heads):
            wq = w_qk[h * dh : (h + 1) * dh]
            wk = w_qk[c + h * dh : c + (h + 1) * dh]
            q = x[bi] @ wq.T
            k = x[bi] @ wk.T
            if b_qk is not None:
                q = q + b_qk[h * dh : (h + 1) * dh]
                k = k + b_qk[c + h * dh : c + (h + 1) * dh]
            logits = q @ k.T / math.sqrt(dh)
            if causal:
                allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
                logits = logits.masked_fill(~allowed, float("-inf"))
                centre = allowed.float() / allowed.float().sum(-1, keepdim=True)
            else:
                centre = torch.full((n, n), 1.0 / n)
            probs = torch.softmax(logits, dim=-1)
            a = alpha[h] * torch.eye(n) + beta[h] * probs - gamma[h] * centre
            out[bi, :, h * dh : (h + 1) * dh] = a @ x[bi, :, h * dh : (h + 1) * dh]
    return out


def _randomise(attn: ShapedAttention) -> None:
    with torch.no_grad():
        attn.alpha.uniform_(0.5, 1.5)
        attn.beta.uniform_(0.5, 1.5)
        attn.gamma.uniform_(0.5, 1.5)
        attn.qk.weight.normal_(0, 0.3)
        if attn.qk.bias is not None:
            attn.qk.bias.normal_(0, 0.3)


@pytest.mark.parametrize("bias", [False, True])
def test_shaped_attention_matches_naive_loop(bias: bool) -> None:
    torch.manual_seed(0)
    attn = ShapedAttention(16, num_heads=4, qk_bias=bias)
    _randomise(attn)
    x = torch.randn(2, 5, 16)
    ref = naive_shaped_attention(
        x, attn.qk.weight, attn.qk.bias, attn.alpha, attn.beta, attn.gamma, num_heads=4
    )
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


def test_shaped_attention_causal_mask_centres_on_the_causal_average() -> None:
    torch.manual_seed(1)
    attn = ShapedAttention(8, num_heads=2)
    _randomise(attn)
    x = torch.randn(3, 6, 8)
    causal = torch.full((6, 6), float("-inf")).triu(1)  # open_clip's additive causal mask
    ref = naive_shaped_attention(
        x, attn.qk.weight, None, attn.alpha, attn.beta, attn.gamma, num_heads=2, causal=True
    )
    torch.testing.assert_close(attn(x, causal), ref, atol=1e-5, rtol=1e-5)
    bool_mask = torch.ones(6, 6, dtype=torch.bool).triu(1)  # nn.MultiheadAttention: True = masked
    torch.testing.assert_close(attn(x, bool_mask), ref, atol=1e-5, rtol=1e-5)


def test_shaped_attention_matrix_rows() -> None:
    """Rows of beta*softmax - gamma*C sum to beta - gamma, so with beta == gamma A's rows sum to alpha."""
    torch.manual_seed(2)
    attn = ShapedAttention(8, num_heads=2)
    _randomise(attn)
    with torch.no_grad():
        attn.gamma.copy_(attn.beta)
    a = attn.attention_matrix(torch.randn(2, 7, 8))
    torch.testing.assert_close(a.sum(-1), attn.alpha.view(1, 2, 1).expand(2, 2, 7).detach())


@pytest.mark.parametrize("causal", [False, True])
def test_zero_query_is_exactly_identity(causal: bool) -> None:
    torch.manual_seed(3)
    attn = ShapedAttention(16, num_heads=4, qk_bias=True)
    _randomise(attn)
    with torch.no_grad():
        attn.gamma.copy_(attn.beta)  # at init beta == gamma (== 1): their terms cancel when Q K^T == 0
    attn.zero_query()
    x = torch.randn(2, 9, 16)
    mask = torch.full((9, 9), float("-inf")).triu(1) if causal else None
    out = attn(x, mask)
    alpha = attn.alpha.detach().repeat_interleave(4)  # per head -> per channel
    assert torch.equal(out, alpha * x)
    with torch.no_grad():
        attn.alpha.fill_(1.0)
    assert torch.equal(attn(x, mask), x)


def test_first_value_matrix_starts_as_identity() -> None:
    torch.manual_seed(4)
    plain = ShapedAttention(8, num_heads=2)
    with_v = ShapedAttention(8, num_heads=2, qk=plain.qk, value=True)
    assert with_v.value is not None
    assert torch.equal(with_v.value.weight, torch.eye(8))
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(with_v(x), plain(x))


def _conv_mlp(dim: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.GELU(), nn.Conv2d(2 * dim, dim, 1))


def test_conv_block_is_parallel_sum_without_skip() -> None:
    torch.manual_seed(5)
    dim = 16
    block: Any = SASPBlock(
        dim, num_heads=2, norm=nn.BatchNorm2d(dim), mlp=_conv_mlp(dim), layout="conv", mlp_gain=0.3
    )
    _randomise(block.attn)
    block.eval()
    with torch.no_grad():
        block.norm.running_mean.normal_()
        block.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, dim, 3, 4)
    h = (x - block.norm.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        block.norm.running_var.view(1, -1, 1, 1) + block.norm.eps
    )
    h = h * block.norm.weight.view(1, -1, 1, 1) + block.norm.bias.view(1, -1, 1, 1)
    tokens = h.flatten(2).transpose(1, 2)
    a = naive_shaped_attention(
        tokens, block.attn.qk.weight, None, block.attn.alpha, block.attn.beta, block.attn.gamma, num_heads=2
    )
    a = a.transpose(1, 2).reshape(2, dim, 3, 4)
    ref = 1.0 * a + 0.3 * block.mlp(h)
    out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_seq_block_identity_at_init(batch_first: bool) -> None:
    torch.manual_seed(6)
    dim = 8
    mlp = nn.Sequential(nn.Linear(dim, 16), nn.GELU(), nn.Linear(16, dim))
    block: Any = SASPBlock(
        dim, num_heads=2, norm=nn.LayerNorm(dim), mlp=mlp, layout="seq", batch_first=batch_first, mlp_gain=0.1
    )
    block.attn.zero_query()
    x = torch.randn(3, 5, dim) if batch_first else torch.randn(5, 3, dim)
    h = block.norm(x)
    # alpha = beta = gamma = 1, W_Q = 0: the attention branch is exactly the normalised input.
    tokens = h if batch_first else h.transpose(0, 1)
    assert torch.equal(block.attn(tokens), tokens)
    assert torch.equal(block(x), block.attn_gain * h + block.mlp_gain * block.mlp(h))
    assert block.attn_gain.item() == 1.0
    assert block.mlp_gain.item() == pytest.approx(0.1)


def test_block_trains_and_is_marked() -> None:
    torch.manual_seed(7)
    block: Any = SASPBlock(8, num_heads=2, norm=nn.LayerNorm(8), mlp=nn.Linear(8, 8), layout="seq")
    block(torch.randn(2, 4, 8)).square().sum().backward()
    for name in ("alpha", "beta", "gamma"):
        assert getattr(block.attn, name).grad is not None
    assert block.attn.qk.weight.grad is not None and block.attn_gain.grad is not None
    assert is_sasp(block) and is_sasp(block.attn) and not is_sasp(block.mlp)
    x = torch.randn(2, 4, 8)
    for cross in ({"k_x": x}, {"v_x": x}):  # open_clip's cross-attention arguments
        with pytest.raises(ValueError, match="self-attention"):
            block(x, **cross)


def _seq_block(dim: int = 8, **kwargs: Any) -> Any:
    mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
    return SASPBlock(dim, num_heads=2, norm=nn.LayerNorm(dim), mlp=mlp, layout="seq", **kwargs)


def test_constructor_errors_name_the_bad_values() -> None:
    with pytest.raises(ValueError) as err:
        ShapedAttention(10, num_heads=4)
    assert "10" in str(err.value) and "4" in str(err.value)
    for qk, head_dim, got, want in (
        (nn.Linear(8, 8), None, "(8, 8)", "(16, 8)"),
        (nn.Linear(6, 16), None, "(16, 6)", "(16, 8)"),  # right rows, wrong input width
        (nn.Linear(8, 16), 3, "(16, 8)", "(12, 8)"),
    ):
        with pytest.raises(ValueError) as err:
            ShapedAttention(8, num_heads=2, head_dim=head_dim, qk=qk)
        assert got in str(err.value) and want in str(err.value)
    with pytest.raises(ValueError) as err:
        SASPBlock(8, num_heads=2, norm=nn.LayerNorm(8), mlp=nn.Identity(), layout="tokens")  # type: ignore[arg-type]
    assert "layout" in str(err.value) and "tokens" in str(err.value)


def test_options_shape_the_projections() -> None:
    x = torch.randn(2, 5, 8)
    plain = ShapedAttention(8, num_heads=2)
    assert plain.qk.bias is None and plain.value is None
    with_bias = ShapedAttention(8, num_heads=2, qk_bias=True)
    assert with_bias.qk.bias is not None and with_bias.qk.bias.shape == (16,)
    narrow = ShapedAttention(8, num_heads=2, head_dim=3)  # head_dim sizes Q/K, the output keeps the width
    assert narrow.qk.weight.shape == (12, 8) and narrow(x).shape == (2, 5, 8)


def test_zero_query_zeroes_only_query_rows() -> None:
    torch.manual_seed(0)
    attn = ShapedAttention(8, num_heads=2, qk_bias=True, head_dim=3)
    with torch.no_grad():
        attn.qk.weight.normal_()
        assert attn.qk.bias is not None
        attn.qk.bias.normal_()
    keys_w, keys_b = attn.qk.weight[6:].clone(), attn.qk.bias[6:].clone()
    attn.zero_query()
    assert torch.count_nonzero(attn.qk.weight[:6]) == 0 and torch.count_nonzero(attn.qk.bias[:6]) == 0
    assert torch.equal(attn.qk.weight[6:], keys_w) and torch.equal(attn.qk.bias[6:], keys_b)


@pytest.mark.parametrize("layout", ["conv", "seq"])
def test_block_gains_or_per_channel_layer_scales(layout: str) -> None:
    dim = 8
    norm: nn.Module = nn.BatchNorm2d(dim) if layout == "conv" else nn.LayerNorm(dim)

    def block(**kwargs: Any) -> Any:
        return SASPBlock(dim, num_heads=2, norm=norm, mlp=nn.Identity(), layout=layout, **kwargs)  # type: ignore[arg-type]

    given = block(attn_gain=0.25, mlp_gain=0.5)
    assert given.attn_gain.shape == () and given.mlp_gain.shape == ()
    assert (given.attn_gain.item(), given.mlp_gain.item()) == (0.25, 0.5)
    scaled = block(layer_scale=1e-3, attn_gain=0.25, mlp_gain=0.5)  # layer scales replace the gains
    shape = (dim, 1, 1) if layout == "conv" else (dim,)  # one per channel, broadcast over the layout
    for gain in (scaled.attn_gain, scaled.mlp_gain):
        assert isinstance(gain, nn.Parameter) and gain.shape == shape
        assert torch.equal(gain.detach(), torch.full(shape, 1e-3))


def test_block_uses_a_passed_token_mixer_and_reports_its_dtype() -> None:
    shared = ShapedAttention(8, num_heads=2, qk_bias=True)
    a, b = _seq_block(attn=shared), _seq_block(attn=shared, value=True, head_dim=3)
    assert a.attn is shared and b.attn is shared and shared.value is None
    plain = _seq_block(value=True)
    assert plain.attn is not shared and plain.attn.value is not None and plain.attn.qk.bias is None
    assert _seq_block(head_dim=3).attn.qk.weight.shape == (12, 8)  # head_dim sizes a fresh Q/K
    assert plain.get_weight_dtype() == torch.float32
    assert plain.double().get_weight_dtype() == torch.float64


def test_to_inference_counts_each_shared_attention_once() -> None:
    shared = ShapedAttention(8, num_heads=2)
    model = nn.ModuleList([ShapedAttention(8, num_heads=2), shared, ShapedAttention(8, num_heads=2), shared])
    assert to_inference(model) == 3
    assert all(type(m) is InferenceShapedAttention for m in model)
    assert to_inference(model) == 0  # already switched
