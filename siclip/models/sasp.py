"""SAS-P blocks (He & Hofmann, "Simplifying Transformer Blocks", ICLR 2024): shaped attention, no skip.

This module owns the two building blocks SiCLIP swaps in for MobileCLIP's attention blocks:

- :class:`ShapedAttention`: per head ``A = alpha*I + beta*softmax(QK^T/sqrt(d) + mask) - gamma*C`` with
  ``C = softmax(0 + mask)`` (uniform ``1/N`` without a mask, the causal average under a causal mask), no
  output projection and, by default, no value projection (values are the normalised input itself).
- :class:`SASPBlock`: ``x_out = attn_gain * ShapedAttn(Norm(x)) + mlp_gain * MLP(Norm(x))``, parallel
  branches, **no skip connection**. The gains are two scalars, or (``layer_scale > 0``) per-channel layer
  scales initialised to ``layer_scale`` as in the authors' ``ParallelAttentionBlock``. It works on a conv feature map ``(B, C, H, W)`` (MCi0's last stage:
  BatchNorm pre-norm, ConvMlp) and on a token sequence ``(B, N, C)`` / ``(N, B, C)`` (text towers: LayerNorm,
  Linear MLP).

With ``W_Q = 0`` (and a zero query bias) the logits are exactly zero, so ``softmax == C`` and the attention
branch is exactly ``alpha * Norm(x)``: the block starts as (a scaled) identity on the normalised input.
Freezing code tells SAS-P modules apart with :func:`is_sasp`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["InferenceShapedAttention", "SASPBlock", "ShapedAttention", "is_sasp", "to_inference"]


class ShapedAttention(nn.Module):
    """Shaped multi-head self-attention on a ``(B, N, C)`` sequence; values are the input (or ``value(x)``).

    ``qk`` is an ``nn.Linear(dim, 2 * num_heads * head_dim)`` producing ``[Q; K]``; pass the same module
    to several blocks to share it (one tensor, same storage).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        qk: nn.Linear | None = None,
        head_dim: int | None = None,
        qk_bias: bool = False,
        value: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qk = qk if qk is not None else nn.Linear(dim, 2 * num_heads * self.head_dim, bias=qk_bias)
        if self.qk.out_features != 2 * num_heads * self.head_dim or self.qk.in_features != dim:
            raise ValueError(
                f"qk projection has shape {tuple(self.qk.weight.shape)}; expected "
                f"({2 * num_heads * self.head_dim}, {dim})"
            )
        # He & Hofmann keep a trainable value matrix only in the first block; identity at init.
        self.value: nn.Linear | None = None
        if value:
            self.value = nn.Linear(dim, dim, bias=False)
            with torch.no_grad():
                self.value.weight.copy_(torch.eye(dim))
        self.alpha = nn.Parameter(torch.ones(num_heads))
        self.beta = nn.Parameter(torch.ones(num_heads))
        self.gamma = nn.Parameter(torch.ones(num_heads))

    def zero_query(self) -> None:
        """Set ``W_Q = 0`` (and the query bias): uniform attention, so the block is identity at init."""
        q_rows = self.num_heads * self.head_dim
        with torch.no_grad():
            self.qk.weight[:q_rows].zero_()
            if self.qk.bias is not None:
                self.qk.bias[:q_rows].zero_()

    def attention_matrix(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The shaped matrix ``A`` per head, ``(B, H, N, N)``, for inspection and tests."""
        shaped, alpha = self._shaped_part(x, attn_mask)
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        return alpha * eye + shaped

    def _shaped_part(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        q, k = self.qk(x).view(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        zeros = torch.zeros(1, 1, n, n, dtype=logits.dtype, device=logits.device)
        if attn_mask is not None:
            mask = _as_additive(attn_mask, b=b, n=n, dtype=logits.dtype)
            logits = logits + mask
            zeros = zeros + mask
        # C is the same softmax at zero logits, so with W_Q = 0 the two terms cancel bit for bit.
        centre = torch.softmax(zeros, dim=-1)
        probs = torch.softmax(logits, dim=-1)
        beta = self.beta.view(1, -1, 1, 1).to(x.dtype)
        gamma = self.gamma.view(1, -1, 1, 1).to(x.dtype)
        alpha = self.alpha.view(1, -1, 1, 1).to(x.dtype)
        return beta * probs - gamma * centre, alpha

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        shaped, alpha = self._shaped_part(x, attn_mask)
        v = self.value(x) if self.value is not None else x
        v = v.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        # alpha*I @ v is alpha*v; the rest is one (B, H, N, N) @ (B, H, N, d) product.
        out = alpha * v + shaped @ v
        return out.transpose(1, 2).reshape(b, n, c)


class InferenceShapedAttention(ShapedAttention):
    """:class:`ShapedAttention` with the same parameters and outputs, computed without ``N x N`` shape terms.

    Without a mask ``alpha*I @ v = alpha*v`` and ``C @ v`` is the token mean of ``v``, so per head
    ``out = alpha*v + beta*softmax(QK^T/sqrt(d)) @ v - gamma*mean_tokens(v)``: only the softmax product is
    left, and it runs as one fused ``scaled_dot_product_attention``. With a mask (text towers) the training
    form is used. :func:`to_inference` switches a model's shaped attention to this class in place, keeping
    parameter names and sharing (it is the same object with another ``forward``).
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attn_mask is not None:
            return super().forward(x, attn_mask)
        b, n, c = x.shape
        q, k = self.qk(x).view(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.value(x) if self.value is not None else x
        v = v.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        attended = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        shape = (1, -1, 1, 1)
        alpha, beta, gamma = (p.view(shape).to(x.dtype) for p in (self.alpha, self.beta, self.gamma))
        out = alpha * v + beta * attended - gamma * v.mean(dim=2, keepdim=True)
        return out.transpose(1, 2).reshape(b, n, c)


def to_inference(model: nn.Module) -> int:
    """Switch every :class:`ShapedAttention` in ``model`` to :class:`InferenceShapedAttention` in place;
    returns how many modules were switched (a shared module counts once)."""
    switched = 0
    for m in model.modules():
        if type(m) is ShapedAttention:
            m.__class__ = InferenceShapedAttention
            switched += 1
    return switched


def _as_additive(mask: torch.Tensor, *, b: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """An additive float mask in ``dtype``, broadcastable to ``(B, H, N, N)``.

    Boolean masks follow ``nn.MultiheadAttention`` (True = not allowed), since SAS-P blocks replace it.
    ``(B*H, N, N)`` masks (open_clip's padding masks) are reshaped to ``(B, H, N, N)``; ``(N, N)`` and
    ``(B, H, N, N)`` masks broadcast as they are.
    """
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    else:
        mask = mask.to(dtype)
    if mask.dim() == 3:
        return mask.view(b, -1, n, n)
    return mask


class SASPBlock(nn.Module):
    """A SAS-P block: ``attn_gain * ShapedAttn(Norm(x)) + mlp_gain * MLP(Norm(x))``, no skip connection.

    ``layout="conv"``: ``x`` is ``(B, C, H, W)``, ``norm`` a BatchNorm2d and ``mlp`` a conv MLP on the
    feature map (MCi0). ``layout="seq"``: ``x`` is ``(B, N, C)`` (or ``(N, B, C)`` with
    ``batch_first=False``), ``norm`` a LayerNorm and ``mlp`` a token-wise MLP (text towers).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        norm: nn.Module,
        mlp: nn.Module,
        layout: Literal["conv", "seq"],
        qk: nn.Linear | None = None,
        attn: ShapedAttention | None = None,
        head_dim: int | None = None,
        value: bool = False,
        attn_gain: float = 1.0,
        mlp_gain: float = 0.1,
        layer_scale: float = 0.0,
        batch_first: bool = True,
    ) -> None:
        """``attn`` passes a whole shared token mixer (then ``qk``, ``head_dim`` and ``value`` are unused)."""
        super().__init__()
        if layout not in ("conv", "seq"):
            raise ValueError(f"layout: got {layout!r}; allowed: 'conv', 'seq'")
        self.layout = layout
        self.batch_first = batch_first
        self.norm = norm
        self.attn = attn or ShapedAttention(dim, num_heads=num_heads, qk=qk, head_dim=head_dim, value=value)
        self.mlp = mlp
        if layer_scale > 0:
            # per channel, shaped to broadcast over the block's output: (C, 1, 1) on a feature map, (C,) on tokens
            shape = (dim, 1, 1) if layout == "conv" else (dim,)
            self.attn_gain = nn.Parameter(torch.full(shape, float(layer_scale)))
            self.mlp_gain = nn.Parameter(torch.full(shape, float(layer_scale)))
        else:
            self.attn_gain = nn.Parameter(torch.tensor(float(attn_gain)))
            self.mlp_gain = nn.Parameter(torch.tensor(float(mlp_gain)))

    def get_weight_dtype(self) -> torch.dtype:
        """open_clip's ``Transformer.get_cast_dtype`` asks its first block for this."""
        return self.attn.qk.weight.dtype

    def forward(
        self,
        x: torch.Tensor,
        k_x: torch.Tensor | None = None,
        v_x: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # (x, k_x, v_x, attn_mask) is open_clip's ResidualAttentionBlock call signature (its gradient
        # checkpointing passes them positionally); SAS-P is self-attention only.
        if k_x is not None or v_x is not None:
            raise ValueError("SASPBlock is self-attention only; k_x / v_x are not supported")
        h = self.norm(x)
        if self.layout == "conv":
            b, c, hh, ww = h.shape
            tokens = h.flatten(2).transpose(1, 2)
            a = self.attn(tokens, attn_mask).transpose(1, 2).reshape(b, c, hh, ww)
        elif self.batch_first:
            a = self.attn(h, attn_mask)
        else:
            a = self.attn(h.transpose(0, 1), attn_mask).transpose(0, 1)
        return self.attn_gain * a + self.mlp_gain * self.mlp(h)


def is_sasp(module: nn.Module) -> bool:
    """True for modules SiCLIP added (SAS-P blocks and their shaped attention): these stay trainable."""
    return isinstance(module, SASPBlock | ShapedAttention)
