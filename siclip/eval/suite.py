"""The evaluation suite one model gets during training and from ``siclip eval``: zero-shot + retrieval."""

from __future__ import annotations

import torch
from torch import nn

from siclip.config import SiclipCfg, expand_shards
from siclip.eval.shard import Shard

__all__ = ["evaluate_cfg", "evaluate_model"]


def evaluate_model(
    model: nn.Module,
    *,
    preset: str,
    zeroshot_dir: str = "",
    classnames_file: str = "",
    retrieval_shards: tuple[str, ...] = (),
    templates: tuple[str, ...] = ("a photo of a {}.",),
    batch_size: int = 128,
    recall_at: tuple[int, ...] = (1, 5, 10),
    image_size: int = 0,
    device: torch.device | str = "cpu",
    shard: Shard | None = None,
) -> dict[str, float]:
    """Zero-shot top-1/top-5 on an ImageFolder directory and recall@K on retrieval shards.

    Either part is skipped when its data is not configured. ``shard``: this rank's part of an evaluation
    split across ranks (every rank must call; all get the same metrics). Keys: ``zeroshot_top1``, ``zeroshot_top5``,
    ``i2t_r@K``, ``t2i_r@K``; values are fractions in [0, 1].
    """
    from siclip.eval.retrieval import evaluate_retrieval
    from siclip.eval.zeroshot import evaluate_zeroshot, load_classnames
    from siclip.models.presets import build_tokenizer, build_transform

    tokenizer = build_tokenizer(preset)
    transform = build_transform(preset, train=False, image_size=image_size)
    metrics: dict[str, float] = {}
    if zeroshot_dir:
        classnames = load_classnames(classnames_file) if classnames_file else None
        metrics.update(
            evaluate_zeroshot(
                model,
                tokenizer=tokenizer,
                transform=transform,
                folder=zeroshot_dir,
                classnames=classnames,
                templates=list(templates),
                batch_size=batch_size,
                device=device,
                shard=shard,
            )
        )
    if retrieval_shards:
        metrics.update(
            evaluate_retrieval(
                model,
                tokenizer=tokenizer,
                transform=transform,
                urls=expand_shards(retrieval_shards),
                recall_at=tuple(recall_at),
                batch_size=batch_size,
                device=device,
                shard=shard,
            )
        )
    return {k: float(v) for k, v in metrics.items()}


def evaluate_cfg(
    model: nn.Module,
    cfg: SiclipCfg,
    *,
    device: torch.device | str = "cpu",
    recall_at: tuple[int, ...] = (),
    shard: Shard | None = None,
) -> dict[str, float]:
    """:func:`evaluate_model` with everything taken from a config's ``eval`` and ``model`` sections."""
    return evaluate_model(
        model,
        preset=cfg.model.name,
        zeroshot_dir=cfg.eval.zeroshot_dir,
        classnames_file=cfg.eval.classnames_file,
        retrieval_shards=cfg.eval.retrieval_shards,
        templates=cfg.eval.templates,
        batch_size=cfg.eval.batch_size,
        recall_at=recall_at or cfg.eval.recall_at,
        image_size=cfg.model.image_size,
        device=device,
        shard=shard,
    )
