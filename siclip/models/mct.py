"""MCt: MobileCLIP-S0's text encoder, written here because open_clip does not ship it.

Structure (Apple's ``mobileclip/text_encoder.py``, variant ``mct``): token embedding + learnable positions,
a RepMixer 1-D conv block, ``n_layers`` pre-norm transformer layers (non-causal by default), a second RepMixer
block, a final LayerNorm, EOT (argmax token) pooling and a ``dim x embed_dim`` projection. At dim 512,
context 77, vocab 49408, 4 layers it has 42.4 M parameters.

Module and parameter names follow Apple's released ``mobileclip_s0.pt`` (``text_encoder.*``), so Apple's
text weights load after stripping the prefix; :func:`convert_apple_state_dict` turns a whole Apple
checkpoint (image + text + logit scale) into this project's open_clip ``CustomTextCLIP`` layout.

:class:`MCtTextEncoder` offers what ``open_clip.CustomTextCLIP`` needs from ``.text`` (``context_length``,
``vocab_size``, ``forward(tokens)``, ``lock``, ``set_grad_checkpointing``). RepMixer branches fuse for
inference through ``reparameterize()`` (picked up by ``timm.utils.reparameterize_model``).
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["MCtTextEncoder", "TransformerEncoder", "build_mct", "convert_apple_state_dict"]


class LayerNormFP32(nn.LayerNorm):
    """LayerNorm computed in float32 (Apple's ``layer_norm_fp32``); same parameters as ``nn.LayerNorm``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _conv_bn(dim: int, kernel_size: int) -> nn.Sequential:
    seq = nn.Sequential()
    seq.add_module(
        "conv", nn.Conv2d(dim, dim, (1, kernel_size), padding=(0, kernel_size // 2), groups=dim, bias=False)
    )
    seq.add_module("bn", nn.BatchNorm2d(dim))
    return seq


def _fuse_conv_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    assert bn.running_var is not None and bn.running_mean is not None
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    return weight * t, bn.bias - bn.running_mean * bn.weight / std


class MobileOne1d(nn.Module):
    """Apple's ``MobileOneBlock`` as the text RepMixer uses it: depthwise ``(1, k)`` conv branches plus a
    BatchNorm identity branch, no activation, no scale branch (Apple's check skips it for 1-row kernels)."""

    def __init__(self, dim: int, kernel_size: int, *, num_conv_branches: int) -> None:
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.rbr_skip = nn.BatchNorm2d(dim)
        self.rbr_conv = nn.ModuleList([_conv_bn(dim, kernel_size) for _ in range(num_conv_branches)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rbr_skip(x)
        for branch in self.rbr_conv:
            out = out + branch(x)
        return out

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One depthwise ``(1, k)`` kernel and bias equal to this block in eval mode."""
        ident = torch.zeros(self.dim, 1, 1, self.kernel_size, dtype=self.rbr_skip.weight.dtype)
        ident[:, 0, 0, self.kernel_size // 2] = 1.0
        kernel, bias = _fuse_conv_bn(ident.to(self.rbr_skip.weight.device), self.rbr_skip)
        for branch in self.rbr_conv:
            conv_bn: Any = branch
            k, b = _fuse_conv_bn(conv_bn.conv.weight, conv_bn.bn)
            kernel, bias = kernel + k, bias + b
        return kernel, bias


class RepMixer(nn.Module):
    """``x + layer_scale * (mixer(x) - norm(x))`` on a ``(B, C, 1, N)`` map; fuses to one depthwise conv."""

    def __init__(self, dim: int, kernel_size: int = 11, layer_scale_init_value: float = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.norm = MobileOne1d(dim, kernel_size, num_conv_branches=0)
        self.mixer = MobileOne1d(dim, kernel_size, num_conv_branches=1)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), layer_scale_init_value))
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold identity, mixer and norm branches into one depthwise conv (inference only)."""
        if self.reparam_conv is not None:
            return
        km, bm = self.mixer.fused_kernel_bias()
        kn, bn = self.norm.fused_kernel_bias()
        ident = torch.zeros_like(km)
        ident[:, 0, 0, self.kernel_size // 2] = 1.0
        scale = self.layer_scale.reshape(-1, 1, 1, 1)
        conv = nn.Conv2d(
            self.dim,
            self.dim,
            (1, self.kernel_size),
            padding=(0, self.kernel_size // 2),
            groups=self.dim,
            bias=True,
            device=km.device,
            dtype=km.dtype,  # the block's dtype (a float64 / bfloat16 block), not the default float32
        )
        conv.weight.copy_(ident + scale * (km - kn))
        assert conv.bias is not None
        conv.bias.copy_(self.layer_scale.flatten() * (bm - bn))
        del self.mixer, self.norm, self.layer_scale
        self.reparam_conv = conv


class ConvFFN(nn.Module):
    """Depthwise ``(1, k)`` conv + BN, then a pointwise MLP (Apple's text ``ConvFFN``)."""

    def __init__(self, dim: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = _conv_bn(dim, kernel_size)
        self.fc1 = nn.Conv2d(dim, hidden, kernel_size=1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, kernel_size=1)
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.conv(x))))))


class RepMixerBlock(nn.Module):
    """RepMixer token mixing then a layer-scaled ConvFFN residual, on ``(B, N, C)`` tokens."""

    def __init__(self, dim: int, *, kernel_size: int = 11, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size=kernel_size)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio), kernel_size)
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-5))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x.permute(0, 2, 1).unsqueeze(2)  # (B, C, 1, N): the 1-D sequence as a one-row image
        x = self.token_mixer(x)
        x = x + self.layer_scale * self.convffn(x)
        return x.squeeze(2).permute(0, 2, 1)


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused ``qkv_proj`` and ``out_proj`` (Apple's names); additive float masks."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv_proj = nn.Linear(dim, 3 * dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class TransformerEncoder(nn.Module):
    """Pre-norm transformer layer: ``x + MHA(LN(x))`` then ``x + FFN(LN(x))`` (Apple's Sequential layout)."""

    def __init__(self, dim: int, *, num_heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.pre_norm_mha = nn.Sequential(
            LayerNormFP32(dim), MultiHeadAttention(dim, num_heads), nn.Dropout(0.0)
        )
        self.pre_norm_ffn = nn.Sequential(
            LayerNormFP32(dim),
            nn.Linear(dim, ffn_dim),
            nn.GELU(),
            nn.Dropout(0.0),
            nn.Linear(ffn_dim, dim),
            nn.Dropout(0.0),
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.pre_norm_mha[0](x)
        x = x + self.pre_norm_mha[2](self.pre_norm_mha[1](h, attn_mask))
        return x + self.pre_norm_ffn(x)


class _PosEmbedInner(nn.Module):
    def __init__(self, context_length: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, 1, context_length, dim))
        nn.init.trunc_normal_(self.pos_embed, std=dim**-0.5)


class PositionalEmbedding(nn.Module):
    """Learnable positions stored as ``pos_embed.pos_embed`` of shape ``(1, 1, L, D)`` like Apple's."""

    def __init__(self, context_length: int, dim: int) -> None:
        super().__init__()
        self.pos_embed = _PosEmbedInner(context_length, dim)

    def forward(self, seq_len: int) -> torch.Tensor:
        pe: torch.Tensor = self.pos_embed.pos_embed
        if seq_len != pe.shape[2]:
            pe = F.interpolate(pe, size=(seq_len, pe.shape[3]), mode="bilinear")
        return pe.reshape(1, seq_len, pe.shape[3])


class MCtTextEncoder(nn.Module):
    """MobileCLIP's MCt text tower as an open_clip text tower (``CustomTextCLIP.text``)."""

    def __init__(
        self,
        *,
        embed_dim: int = 512,
        dim: int = 512,
        context_length: int = 77,
        vocab_size: int = 49408,
        num_layers: int = 4,
        num_heads: int = 8,
        ffn_multiplier: float = 4.0,
        repmixer_kernel: int = 11,
        causal: bool = False,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.width = dim
        self.output_dim = embed_dim
        self.causal = causal
        self.grad_checkpointing = False
        ffn_dim = int(math.ceil(dim * ffn_multiplier / 16.0) * 16)
        self.embedding_layer = nn.Embedding(vocab_size, dim)
        self.positional_embedding = PositionalEmbedding(context_length, dim)
        self.embedding_dropout = nn.Dropout(0.0)
        layers: list[nn.Module] = [RepMixerBlock(dim, kernel_size=repmixer_kernel)]
        layers += [TransformerEncoder(dim, num_heads=num_heads, ffn_dim=ffn_dim) for _ in range(num_layers)]
        layers.append(RepMixerBlock(dim, kernel_size=repmixer_kernel))
        self.transformer = nn.ModuleList(layers)
        self.final_layer_norm = LayerNormFP32(dim)
        self.projection_layer = nn.Parameter(torch.empty(dim, embed_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.embedding_layer.weight, std=0.02)
        nn.init.normal_(self.projection_layer, std=self.width**-0.5)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def causal_mask(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Additive ``(N, N)`` mask with ``-inf`` above the diagonal."""
        return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu_(1)

    def forward_tokens(self, text: torch.Tensor) -> torch.Tensor:
        """Every token's final (normalised) feature, ``(B, N, dim)``."""
        n = text.shape[1]
        x = self.embedding_layer(text)
        x = self.embedding_dropout(x + self.positional_embedding(n).to(x.dtype))
        mask = self.causal_mask(n, x.device, x.dtype) if self.causal else None
        for layer in self.transformer:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(layer, x, attn_mask=mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask=mask)
        return self.final_layer_norm(x)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        x = self.forward_tokens(text)
        pooled = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # EOT has the largest id
        return pooled @ self.projection_layer

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the tower except the last ``unlocked_layers`` layers (open_clip's ``lock_text_tower``)."""
        self.requires_grad_(False)
        if unlocked_layers:
            for layer in list(self.transformer)[-unlocked_layers:]:
                layer.requires_grad_(True)
            self.final_layer_norm.requires_grad_(True)
            self.projection_layer.requires_grad_(True)
        if not freeze_layer_norm:
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.requires_grad_(True)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"positional_embedding.pos_embed.pos_embed"}


def build_mct(embed_dim: int, **kwargs: Any) -> MCtTextEncoder:
    """An MCt tower projecting to ``embed_dim``; keyword arguments as :class:`MCtTextEncoder`."""
    return MCtTextEncoder(embed_dim=embed_dim, **kwargs)


APPLE_TEXT_PREFIX = "text_encoder."


def convert_apple_state_dict(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Map an Apple MobileCLIP-S0 checkpoint (``mobileclip_s0.pt``) to this project's open_clip layout.

    ``text_encoder.*`` -> ``text.*`` unchanged below the prefix (MCt keeps Apple's names);
    ``image_encoder.model.*`` -> ``visual.trunk.*`` through timm's FastViT ``checkpoint_filter_fn`` (which
    also turns Apple's ``head.proj`` into ``head.fc``); ``logit_scale`` kept. Keys already in our layout
    pass through, so the function is idempotent.
    """
    inner = state_dict.get("state_dict")
    sd: dict[str, Any] = inner if isinstance(inner, dict) else state_dict
    out: dict[str, torch.Tensor] = {}
    image = {k: v for k, v in sd.items() if k.startswith("image_encoder.")}
    if image:
        from timm.models.fastvit import checkpoint_filter_fn

        # checkpoint_filter_fn only asks whether the model's head has a Linear ``fc``: give it a stand-in.
        stub = types.SimpleNamespace(head=types.SimpleNamespace(fc=nn.Linear(1, 1)))
        for k, v in checkpoint_filter_fn(image, stub).items():
            out["visual.trunk." + k] = v
    for k, v in sd.items():
        if k.startswith(APPLE_TEXT_PREFIX):
            out["text." + k[len(APPLE_TEXT_PREFIX) :]] = v
        elif not k.startswith("image_encoder."):
            out[k] = v
    return out
