"""Shaped attention under masks and low precision: every mask form means what nn.MultiheadAttention means.

Pins: a ``(B*H, N, N)`` mask is batch-major (row ``b*H + h`` masks sample ``b``, head ``h``) and gives the same
result as the ``(B, H, N, N)`` mask it reshapes to, boolean or additive; ``C`` is the softmax of the mask
alone, per sample and head; a float mask of another dtype is cast to the input's (it does not promote the
output); ``attention_matrix`` honours the mask; outputs and ``A`` keep the input's dtype under bfloat16,
in the training and in the inference form (and ``A`` too under autocast); SAS-P blocks of every layout
hand their ``attn_mask`` to the attention.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from siclip.models.sasp import InferenceShapedAttention, ShapedAttention, to_inference

torch.set_num_threads(1)

B, H, N, DIM = 2, 2, 5, 8


def _attn(*, bias: bool = False, dtype: torch.dtype = torch.float64) -> ShapedAttention:
    torch.manual_seed(0)
    attn = ShapedAttention(DIM, num_heads=H, qk_bias=bias).to(dtype)
    with torch.no_grad():
        attn.alpha.uniform_(0.5, 1.5)
        attn.beta.uniform_(0.5, 1.5)
        attn.gamma.uniform_(0.5, 1.5)
        attn.qk.weight.normal_(0, 0.5)
        if attn.qk.bias is not None:
            attn.qk.bias.normal_(0, 0.5)
    return attn


def naive_matrix(x: torch.Tensor, attn: ShapedAttention, mask: torch.Tensor) -> torch.Tensor:
    """``A[b, h] = alpha*I + beta*softmax(QK^T/sqrt(d) + M[b, h]) - gamma*softmax(M[b, h])``, looped."""
    b, n, c = x.shape
    dh = c // attn.num_heads
    w, bias = attn.qk.weight, attn.qk.bias
    out = torch.empty(b, attn.num_heads, n, n, dtype=x.dtype)
    for bi in range(b):
        for h in range(attn.num_heads):
            q = x[bi] @ w[h * dh : (h + 1) * dh].T
            k = x[bi] @ w[c + h * dh : c + (h + 1) * dh].T
            if bias is not None:
                q = q + bias[h * dh : (h + 1) * dh]
                k = k + bias[c + h * dh : c + (h + 1) * dh]
            m = mask[bi, h].to(x.dtype)
            probs = torch.softmax(q @ k.T / math.sqrt(dh) + m, dim=-1)
            centre = torch.softmax(m, dim=-1)
            eye = torch.eye(n, dtype=x.dtype)
            out[bi, h] = attn.alpha[h] * eye + attn.beta[h] * probs - attn.gamma[h] * centre
    return out.detach()


def naive_output(x: torch.Tensor, attn: ShapedAttention, mask: torch.Tensor) -> torch.Tensor:
    a = naive_matrix(x, attn, mask)
    b, n, c = x.shape
    v = x.view(b, n, attn.num_heads, c // attn.num_heads).transpose(1, 2)
    return (a @ v).transpose(1, 2).reshape(b, n, c)


def _per_sample_head_masks() -> torch.Tensor:
    """A different boolean pattern (True = masked) for every (sample, head); the diagonal is never masked."""
    g = torch.Generator().manual_seed(5)
    masked = torch.rand(B, H, N, N, generator=g) < 0.4
    masked &= ~torch.eye(N, dtype=torch.bool)
    assert len({tuple(masked[b, h].flatten().tolist()) for b in range(B) for h in range(H)}) == B * H
    return masked


@pytest.mark.parametrize("bias", [False, True])
def test_three_dim_mask_is_batch_major_like_multihead_attention(bias: bool) -> None:
    attn = _attn(bias=bias)
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    masked = _per_sample_head_masks()
    additive = torch.zeros(B, H, N, N, dtype=torch.float64).masked_fill(masked, float("-inf"))
    ref = naive_output(x, attn, additive)
    with torch.no_grad():
        # nn.MultiheadAttention's (B*num_heads, L, S) layout: row b*H + h.
        flat_bool = torch.stack([masked[b, h] for b in range(B) for h in range(H)])
        flat_add = torch.stack([additive[b, h] for b in range(B) for h in range(H)])
        for mask in (flat_bool, flat_add, masked, additive):
            torch.testing.assert_close(attn(x, mask), ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(attn.attention_matrix(x, flat_bool), naive_matrix(x, attn, additive))


def test_three_dim_mask_with_one_head_per_row_group() -> None:
    """A (B*H, N, N) mask that differs only between samples: each sample gets its own centring term C."""
    attn = _attn()
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    lengths = (N, 3)  # sample 1 has two padded keys
    padded = torch.zeros(B, H, N, N, dtype=torch.bool)
    for b, length in enumerate(lengths):
        padded[b, :, :, length:] = True
    with torch.no_grad():
        a = attn.attention_matrix(x, padded.reshape(B * H, N, N))
        shaped = a - attn.alpha.view(1, H, 1, 1) * torch.eye(N, dtype=x.dtype)
    # Padded keys get no softmax mass and no C mass, so A has exactly zero weight on them.
    assert torch.equal(shaped[1, :, :, 3:], torch.zeros(H, N, 2, dtype=x.dtype))
    torch.testing.assert_close(
        a, naive_matrix(x, attn, torch.zeros(B, H, N, N).masked_fill(padded, -math.inf))
    )


def test_attention_matrix_honours_a_causal_mask() -> None:
    attn = _attn()
    x = torch.randn(B, N, DIM, dtype=torch.float64)
    causal = torch.full((N, N), float("-inf"), dtype=torch.float64).triu(1)
    with torch.no_grad():
        a = attn.attention_matrix(x, causal)
    torch.testing.assert_close(a, naive_matrix(x, attn, causal.expand(B, H, N, N)))
    upper = torch.ones(N, N, dtype=torch.bool).triu(1)
    assert torch.equal(a[..., upper], torch.zeros_like(a[..., upper]))  # nothing attends to the future


def test_wider_float_mask_is_cast_to_the_input_dtype() -> None:
    """open_clip keeps its causal mask as a float buffer; a float64 mask must not promote a float32 model."""
    attn = _attn(dtype=torch.float32)
    x = torch.randn(B, N, DIM)
    causal64 = torch.full((N, N), float("-inf"), dtype=torch.float64).triu(1)
    with torch.no_grad():
        out = attn(x, causal64)
        a = attn.attention_matrix(x, causal64)
    assert out.dtype == torch.float32 and a.dtype == torch.float32
    torch.testing.assert_close(out, naive_output(x, attn, causal64.expand(B, H, N, N)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_bfloat16_model_keeps_bfloat16_attention_matrix(masked: bool) -> None:
    attn = _attn(dtype=torch.bfloat16)
    x = torch.randn(B, N, DIM).to(torch.bfloat16)
    causal = torch.ones(N, N, dtype=torch.bool).triu(1)  # boolean: True = masked
    mask = causal if masked else None
    with torch.no_grad():
        a = attn.attention_matrix(x, mask)
        out = attn(x, mask)
    assert a.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    additive = torch.zeros(N, N).masked_fill(causal, -math.inf) if masked else torch.zeros(N, N)
    ref = naive_matrix(x.double(), _attn(dtype=torch.bfloat16).double(), additive.expand(B, H, N, N))
    torch.testing.assert_close(a.double(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("masked", [False, True])
def test_autocast_bfloat16_keeps_the_input_dtype_in_both_forms(masked: bool) -> None:
    """Under autocast a float32 module sees bfloat16 tokens (e.g. after a conv); its output stays bfloat16,
    and the inference form (fused attention) matches the training form in dtype and value."""
    train = _attn(dtype=torch.float32)
    fast = _attn(dtype=torch.float32)
    assert to_inference(fast) == 1 and type(fast) is InferenceShapedAttention
    x = torch.randn(B, N, DIM).to(torch.bfloat16)
    mask = torch.full((N, N), float("-inf")).triu(1) if masked else None
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_train = train(x, mask)
        out_fast = fast(x, mask)
        a = train.attention_matrix(x, mask)
    assert (
        out_train.dtype == torch.bfloat16 and out_fast.dtype == torch.bfloat16 and a.dtype == torch.bfloat16
    )
    torch.testing.assert_close(out_fast.float(), out_train.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("layout", ["conv", "seq", "seq-not-batch-first"])
def test_blocks_hand_the_mask_to_their_attention(layout: str) -> None:
    """Every layout applies ``attn_mask`` (random Q/K, so a dropped mask changes the output)."""
    from siclip.models.sasp import SASPBlock

    torch.manual_seed(3)
    conv = layout == "conv"
    norm: nn.Module = nn.BatchNorm2d(DIM) if conv else nn.LayerNorm(DIM, dtype=torch.float64)
    mlp: nn.Module = nn.Conv2d(DIM, DIM, 1) if conv else nn.Linear(DIM, DIM)
    block: Any = SASPBlock(
        DIM, num_heads=H, norm=norm, mlp=mlp, layout="conv" if conv else "seq", batch_first=layout == "seq"
    )
    block.attn = _attn()
    block.double().eval()
    n = 6
    x = torch.randn(B, DIM, 2, 3) if conv else torch.randn(B, n, DIM)
    x = x.double() if layout != "seq-not-batch-first" else x.double().transpose(0, 1)
    mask = torch.ones(n, n, dtype=torch.bool).triu(1)
    additive = torch.zeros(n, n, dtype=torch.float64).masked_fill(mask, float("-inf")).expand(B, H, n, n)
    with torch.no_grad():
        h = block.norm(x)
        if conv:
            tokens = h.flatten(2).transpose(1, 2)
            a = naive_output(tokens, block.attn, additive).transpose(1, 2).reshape(h.shape)
        elif layout == "seq":
            a = naive_output(h, block.attn, additive)
        else:
            a = naive_output(h.transpose(0, 1), block.attn, additive).transpose(0, 1)
        ref = block.attn_gain * a + block.mlp_gain * block.mlp(h)
        torch.testing.assert_close(block(x, attn_mask=mask), ref)
        assert not torch.allclose(block(x), ref)  # the mask matters here
