"""Simplify any CLIP in place: swap transformer blocks for SAS-P blocks and share their weights.

Which blocks: timm FastViT ``AttentionBlock`` (MCi0's last stage: conv layout, BatchNorm, ConvMlp), open_clip
``ResidualAttentionBlock`` (standard text and ViT towers) and MCt's ``TransformerEncoder`` layers. Which
towers: :class:`~siclip.config.SaspCfg` ``replace`` (``image`` default, ``text``, ``both``, ``none``).

How they share (per tower; the text tower may differ, ``text_share``): ``qk`` one Q/K ``nn.Linear`` module
registered in every replaced block (one tensor, same storage); ``mixer`` one whole
:class:`~siclip.models.sasp.ShapedAttention` (Q/K and the per-head alpha/beta/gamma; norm, MLP and gains stay
per block); ``mixer_pairs`` one such mixer per consecutive pair of replaced blocks (1-2, 3-4: the authors'
text tower); ``block`` one whole SAS-P block registered at every replaced position; ``none``.
With ``qk_init="inherit"`` Q/K come from the replaced block's ``qkv`` weights (under sharing: from the
first replaced block of the tower, **ours**); ``"zero"`` sets ``W_Q = 0``. ``inherit_mlp`` copies the
block's pre-attention norm and MLP into the SAS-P block (else they are re-initialised). Layer scales, the
value/output projections and the second norm of the replaced block are dropped.

Every simplified tower carries ``siclip_sasp = {"cfg": ..., "replaced": [...]}`` so export and weight
inheritance know what was done.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from siclip.config import SaspCfg
from siclip.models.sasp import SASPBlock, is_sasp

__all__ = [
    "REPLACED_TOWERS",
    "find_replaceable",
    "is_sasp",
    "replaced_prefixes",
    "sasp_module_names",
    "shared_tensors",
    "simplify",
    "simplify_tower",
    "tower_sasp",
    "towers",
]

REPLACED_TOWERS: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "text": ("text",),
    "both": ("image", "text"),
    "none": (),
}
"""The towers each :class:`~siclip.config.SaspCfg` ``replace`` value simplifies."""


def towers(model: Any) -> dict[str, nn.Module]:
    """The image and text towers of an open_clip ``CLIP`` / ``CustomTextCLIP`` (or a bare tower)."""
    out: dict[str, nn.Module] = {}
    if hasattr(model, "visual"):
        out["image"] = model.visual
    if hasattr(model, "text"):
        out["text"] = model.text
    elif hasattr(model, "transformer") and hasattr(model, "token_embedding"):
        out["text"] = model.transformer  # plain open_clip CLIP keeps its text tower on the model itself
    return out


def _block_kind(m: nn.Module) -> str | None:
    from open_clip.transformer import ResidualAttentionBlock
    from timm.models.fastvit import AttentionBlock

    from siclip.models.mct import TransformerEncoder

    if isinstance(m, AttentionBlock):
        return "fastvit"
    if isinstance(m, ResidualAttentionBlock) and not hasattr(m, "ln_1_kv"):
        return "openclip"
    if isinstance(m, TransformerEncoder):
        return "mct"
    return None


def find_replaceable(tower: nn.Module) -> list[str]:
    """Names (relative to ``tower``) of the attention blocks a SAS-P block can replace, in order."""
    return [name for name, m in tower.named_modules() if name and _block_kind(m) is not None]


def _reset(module: nn.Module) -> None:
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()


@torch.no_grad()
def _trunc_normal_init(module: nn.Module, std: float = 0.02) -> None:
    """Conv and linear weights ~ truncated normal(0, std), biases 0 (MobileCLIP's ConvFFN init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _parts(block: Any) -> dict[str, Any]:
    """dim, heads, head_dim, Q/K weight and bias, norm, mlp, layout of a replaceable block."""
    kind = _block_kind(block)
    if kind == "fastvit":
        mixer = block.token_mixer
        dim = mixer.qkv.in_features
        qk_rows = 2 * mixer.num_heads * mixer.head_dim
        bias = mixer.qkv.bias[:qk_rows] if mixer.qkv.bias is not None else None
        return dict(
            dim=dim,
            heads=mixer.num_heads,
            head_dim=mixer.head_dim,
            qk_w=mixer.qkv.weight[:qk_rows],
            qk_b=bias,
            norm=block.norm,
            mlp=block.mlp,
            layout="conv",
            batch_first=True,
        )
    if kind == "openclip":
        attn = block.attn
        dim = attn.embed_dim
        return dict(
            dim=dim,
            heads=attn.num_heads,
            head_dim=dim // attn.num_heads,
            qk_w=attn.in_proj_weight[: 2 * dim],
            qk_b=attn.in_proj_bias[: 2 * dim] if attn.in_proj_bias is not None else None,
            norm=block.ln_1,
            mlp=block.mlp,
            layout="seq",
            batch_first=attn.batch_first,
        )
    if kind == "mct":
        mha = block.pre_norm_mha[1]
        dim = mha.qkv_proj.in_features
        return dict(
            dim=dim,
            heads=mha.num_heads,
            head_dim=dim // mha.num_heads,
            qk_w=mha.qkv_proj.weight[: 2 * dim],
            qk_b=mha.qkv_proj.bias[: 2 * dim],
            norm=block.pre_norm_mha[0],
            mlp=nn.Sequential(*list(block.pre_norm_ffn)[1:]),
            layout="seq",
            batch_first=True,
        )
    raise TypeError(f"cannot simplify a {type(block).__name__}")


def _new_qk(parts: dict[str, Any], sasp: SaspCfg) -> nn.Linear:
    qk = nn.Linear(parts["dim"], parts["qk_w"].shape[0], bias=parts["qk_b"] is not None)
    qk.to(device=parts["qk_w"].device, dtype=parts["qk_w"].dtype)
    if sasp.qk_init == "inherit":
        with torch.no_grad():
            qk.weight.copy_(parts["qk_w"])
            if qk.bias is not None:
                qk.bias.copy_(parts["qk_b"])
    return qk


def _build_block(
    parts: dict[str, Any], sasp: SaspCfg, *, qk: nn.Linear, value: bool, attn: Any = None
) -> SASPBlock:
    norm = copy.deepcopy(parts["norm"])
    mlp = copy.deepcopy(parts["mlp"])
    if not sasp.inherit_mlp:
        _reset(norm)
        _reset(mlp)
        if sasp.mlp_init == "trunc_normal":
            _trunc_normal_init(mlp)
    block = SASPBlock(
        parts["dim"],
        num_heads=parts["heads"],
        head_dim=parts["head_dim"],
        norm=norm,
        mlp=mlp,
        layout=parts["layout"],
        qk=qk,
        attn=attn,
        value=value,
        attn_gain=sasp.attn_gain,
        mlp_gain=sasp.mlp_gain,
        layer_scale=sasp.layer_scale,
        batch_first=parts["batch_first"],
    )
    ref = parts["qk_w"]
    block.to(device=ref.device)
    if sasp.qk_init == "zero" and attn is None:
        block.attn.zero_query()
    return block


def tower_sasp(sasp: SaspCfg, kind: str) -> SaspCfg:
    """The settings one tower is simplified with: the text tower takes ``text_share`` and ``text_gains``.

    The result has no text-only settings left, so a tower rebuilt from its marker (export, open_clip's
    builders) is simplified the same way whichever tower it is.
    """
    if kind != "text":
        return dataclasses.replace(sasp, text_share="", text_gains="same")
    changes: dict[str, Any] = {"share": sasp.text_share or sasp.share, "text_share": "", "text_gains": "same"}
    if sasp.text_gains == "unit":
        changes.update(attn_gain=1.0, mlp_gain=1.0, layer_scale=0.0)
    return dataclasses.replace(sasp, **changes)


def simplify_tower(tower: nn.Module, sasp: SaspCfg) -> list[str]:
    """Replace every replaceable block of one tower by SAS-P blocks (in place); returns their names.

    ``sasp`` is used as it is (``share``, gains); :func:`simplify` passes each tower its :func:`tower_sasp`.
    """
    names = find_replaceable(tower)
    if not names:
        return []
    shared_qk: nn.Linear | None = None
    shared_block: SASPBlock | None = None
    for i, name in enumerate(names):
        old = tower.get_submodule(name)
        parts = _parts(old)
        if sasp.share == "block" and shared_block is not None:
            new = shared_block
        else:
            # mixer: every block reuses the first one's token mixer; mixer_pairs: block 2k+1 reuses block 2k's
            reuse = sasp.share == "mixer" or (sasp.share == "mixer_pairs" and i % 2 == 1)
            mixer = shared_block.attn if reuse and shared_block is not None else None
            if mixer is not None:
                qk = mixer.qk
            elif sasp.share in ("qk", "mixer") and shared_qk is not None:
                qk = shared_qk
            else:
                qk = _new_qk(parts, sasp)
            shared_qk = qk
            new = _build_block(parts, sasp, qk=qk, value=sasp.first_value and i == 0, attn=mixer)
            shared_block = new
        new.train(old.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(tower.get_submodule(parent_name), attr, new)  # get_submodule("") is the tower itself
    # A tower may be simplified once; a second pass would find nothing to replace.
    marker = {"cfg": dataclasses.asdict(sasp), "replaced": names}
    tower.siclip_sasp = marker  # type: ignore[assignment]
    return names


def shared_tensors(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one tensor (same storage)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(p.data_ptr(), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def simplify(model: nn.Module, sasp: SaspCfg) -> dict[str, Any]:
    """Swap the configured towers' attention blocks for SAS-P blocks in place.

    Returns ``{"replaced": [module names], "shared": [[parameter names sharing one tensor]],
    "params_before": n, "params_after": n}`` (unique parameters).
    """
    before = sum(p.numel() for p in model.parameters())
    replaced: list[str] = []
    wanted = REPLACED_TOWERS[sasp.replace]
    all_towers = towers(model)
    for kind in wanted:
        tower = all_towers.get(kind)
        if tower is None:
            raise ValueError(f"sasp.replace={sasp.replace!r}: the model has no {kind} tower")
        prefix = next(n for n, m in model.named_modules() if m is tower)
        names = simplify_tower(tower, tower_sasp(sasp, kind))
        if not names:
            raise ValueError(
                f"sasp.replace={sasp.replace!r}: no attention block to replace in the {kind} tower "
                f"({type(tower).__name__})"
            )
        replaced += [f"{prefix}.{n}" for n in names]  # a tower is an attribute of the model: prefix != ""
    return {
        "replaced": replaced,
        "shared": shared_tensors(model),
        "params_before": before,
        "params_after": sum(p.numel() for p in model.parameters()),
    }


def sasp_module_names(model: nn.Module) -> list[str]:
    """Names of the SAS-P blocks in ``model`` (each shared block once per position)."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, SASPBlock)]


def replaced_prefixes(model: nn.Module) -> list[str]:
    """Model-level names of the blocks that simplification replaced (from the towers' markers)."""
    out: list[str] = []
    for name, m in model.named_modules():
        marker = getattr(m, "siclip_sasp", None)
        if marker:
            out += [f"{name}.{n}" if name else n for n in marker["replaced"]]
    return out
