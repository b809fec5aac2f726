"""SAS-P constructors and call contracts: exact error messages, defaults, shapes and dtypes of parameters.

Pins: a bad head count, a mis-shaped shared Q/K, an unknown layout and cross-attention inputs are rejected
with one message naming the values; a fresh shaped attention starts with alpha = beta = gamma = 1, no Q/K
bias unless asked, an identity value matrix only when asked, ``head_dim`` sizing Q/K; a block's gains are
0-dim scalars (defaults 1.0 and 0.1) or per-channel layer scales shaped for its layout; a passed ``attn``
is used as is; ``get_weight_dtype`` follows the Q/K weight.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

from siclip.models.sasp import SASPBlock, ShapedAttention

torch.set_num_threads(1)


def _fullmatch(message: str) -> str:
    return "^" + re.escape(message) + "$"


def _seq_block(dim: int = 8, **kwargs: Any) -> Any:
    mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
    return SASPBlock(dim, num_heads=2, norm=nn.LayerNorm(dim), mlp=mlp, layout="seq", **kwargs)


def test_constructor_errors_name_the_bad_values() -> None:
    with pytest.raises(ValueError, match=_fullmatch("dim 10 is not divisible by num_heads 4")):
        ShapedAttention(10, num_heads=4)
    with pytest.raises(ValueError, match=_fullmatch("qk projection has shape (8, 8); expected (16, 8)")):
        ShapedAttention(8, num_heads=2, qk=nn.Linear(8, 8))
    with pytest.raises(ValueError, match=_fullmatch("qk projection has shape (16, 6); expected (16, 8)")):
        ShapedAttention(8, num_heads=2, qk=nn.Linear(6, 16))  # right rows, wrong input width
    with pytest.raises(ValueError, match=_fullmatch("qk projection has shape (16, 8); expected (12, 8)")):
        ShapedAttention(8, num_heads=2, head_dim=3, qk=nn.Linear(8, 16))
    with pytest.raises(ValueError, match=_fullmatch("layout: got 'tokens'; allowed: 'conv', 'seq'")):
        SASPBlock(8, num_heads=2, norm=nn.LayerNorm(8), mlp=nn.Identity(), layout="tokens")  # type: ignore[arg-type]


@pytest.mark.parametrize("which", ["k_x", "v_x"])
def test_block_rejects_cross_attention_inputs(which: str) -> None:
    block = _seq_block()
    x = torch.randn(2, 3, 8)
    message = "SASPBlock is self-attention only; k_x / v_x are not supported"
    with pytest.raises(ValueError, match=_fullmatch(message)):
        block(x, **{which: x})


def test_fresh_shaped_attention_parameters() -> None:
    attn = ShapedAttention(8, num_heads=2)
    for p in (attn.alpha, attn.beta, attn.gamma):
        assert isinstance(p, nn.Parameter) and torch.equal(p.detach(), torch.ones(2))
    assert attn.qk.weight.shape == (16, 8) and attn.qk.bias is None and attn.value is None
    assert sorted(n for n, _ in attn.named_parameters()) == ["alpha", "beta", "gamma", "qk.weight"]
    with_bias = ShapedAttention(8, num_heads=2, qk_bias=True, value=True)
    assert with_bias.qk.bias is not None and with_bias.qk.bias.shape == (16,)
    assert with_bias.value is not None and with_bias.value.bias is None
    assert torch.equal(with_bias.value.weight.detach(), torch.eye(8))
    narrow = ShapedAttention(8, num_heads=2, head_dim=3)
    assert narrow.qk.weight.shape == (12, 8) and narrow(torch.randn(2, 5, 8)).shape == (2, 5, 8)


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
def test_block_gains(layout: str) -> None:
    dim = 8
    norm: nn.Module = nn.BatchNorm2d(dim) if layout == "conv" else nn.LayerNorm(dim)

    def block(**kwargs: Any) -> Any:
        return SASPBlock(dim, num_heads=2, norm=norm, mlp=nn.Identity(), layout=layout, **kwargs)  # type: ignore[arg-type]

    default = block()
    assert default.attn_gain.shape == () and default.mlp_gain.shape == ()
    assert default.attn_gain.item() == 1.0 and default.mlp_gain.item() == pytest.approx(0.1)
    given = block(attn_gain=0.25, mlp_gain=0.5)
    assert (given.attn_gain.item(), given.mlp_gain.item()) == (0.25, 0.5)
    scaled = block(layer_scale=1e-3, attn_gain=0.25, mlp_gain=0.5)  # layer scales replace the gains
    shape = (dim, 1, 1) if layout == "conv" else (dim,)
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


def test_default_seq_block_is_batch_first_without_value_matrix() -> None:
    torch.manual_seed(1)
    block = _seq_block()
    assert block.attn.value is None and block.layout == "seq"
    with torch.no_grad():
        block.attn.qk.weight.normal_(0, 0.5)  # content-dependent attention: token order matters
    x = torch.randn(3, 5, 8)  # (B, N, C)
    with torch.no_grad():
        h = block.norm(x)
        ref = block.attn_gain * block.attn(h) + block.mlp_gain * block.mlp(h)
        torch.testing.assert_close(block(x), ref)
