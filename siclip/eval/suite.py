"""The evaluation suite one model gets during training and from ``siclip eval``: zero-shot + retrieval on
the configured folders and shards, and the paper's datasets (``eval.benchmarks``, through CLIP_benchmark)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from siclip.config import ConfigError, SiclipCfg, expand_shards
from siclip.eval.ranks import Shard

__all__ = ["evaluate_benchmarks_cfg", "evaluate_cfg", "evaluate_checkpoint", "evaluate_model"]


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
    ``i2t_r@K``, ``t2i_r@K``; values are fractions in [0, 1]. A zero-shot folder with ``held_out_classes.txt``
    (the held-out demo world) adds ``zeroshot_top{1,5}_seen`` and ``zeroshot_top{1,5}_unseen``.
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


def evaluate_benchmarks_cfg(
    model: nn.Module,
    cfg: SiclipCfg,
    names: tuple[str, ...],
    *,
    device: torch.device | str = "cpu",
    shard: Shard | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`siclip.eval.benchmarks.evaluate_benchmarks` on ``names`` with the config's roots and preset
    (``shard``: this rank's part of an evaluation split across ranks)."""
    from siclip.eval.benchmarks import evaluate_benchmarks
    from siclip.models.presets import build_tokenizer, build_transform

    return evaluate_benchmarks(
        model,
        names=names,
        tokenizer=build_tokenizer(cfg.model.name),
        transform=build_transform(cfg.model.name, train=False, image_size=cfg.model.image_size),
        eval_cfg=cfg.eval,
        device=device,
        shard=shard,
    )


def evaluate_cfg(
    model: nn.Module,
    cfg: SiclipCfg,
    *,
    device: torch.device | str = "cpu",
    recall_at: tuple[int, ...] = (),
    shard: Shard | None = None,
) -> dict[str, float]:
    """:func:`evaluate_model` with everything taken from a config's ``eval`` and ``model`` sections, plus the
    datasets of ``eval.benchmarks`` (``<name>/<metric>``; absent ones are logged and left out)."""
    metrics: dict[str, float] = {}
    if cfg.eval.benchmarks:
        from siclip.eval.benchmarks import flatten

        metrics = flatten(
            evaluate_benchmarks_cfg(model, cfg, cfg.eval.benchmarks, device=device, shard=shard)
        )
    return metrics | _evaluate_configured(model, cfg, device=device, recall_at=recall_at, shard=shard)


def _evaluate_configured(
    model: nn.Module,
    cfg: SiclipCfg,
    *,
    device: torch.device | str = "cpu",
    recall_at: tuple[int, ...] = (),
    shard: Shard | None = None,
) -> dict[str, float]:
    """:func:`evaluate_model` on the config's own zero-shot folder and retrieval shards."""
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


def evaluate_checkpoint(
    cfg: SiclipCfg, checkpoint: str | os.PathLike[str], *, suite: tuple[str, ...] = ()
) -> dict[str, Any]:
    """What ``siclip eval`` prints: the student preset of ``cfg`` with the weights of ``checkpoint`` (a file,
    a checkpoint folder or a run folder) on the configured folders/shards, and on ``suite`` + ``eval.benchmarks``
    (their per-dataset results, absent ones with the reason, under ``"benchmarks"``)."""
    from siclip.models.presets import build_preset
    from siclip.train.checkpoint import load_student_weights

    model = build_preset(cfg.model.name, sasp=cfg.model.sasp)
    try:
        load_student_weights(model, checkpoint)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from exc
    model.eval()
    names = tuple(dict.fromkeys((*suite, *cfg.eval.benchmarks)))
    out: dict[str, Any] = {"model": cfg.model.name, "checkpoint": str(checkpoint)}
    if cfg.eval.zeroshot_dir or cfg.eval.retrieval_shards:
        out.update(_evaluate_configured(model, cfg))
    if names:
        out["benchmarks"] = evaluate_benchmarks_cfg(model, cfg, names)
    return out
