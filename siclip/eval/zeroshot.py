"""Zero-shot classification on an ImageFolder directory with class-name prompts (open_clip's classifier)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from open_clip import build_zero_shot_classifier
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from siclip.eval.metrics import eval_mode, topk_accuracy
from siclip.eval.shard import Shard

__all__ = ["evaluate_zeroshot", "load_classnames"]


def load_classnames(path: str | os.PathLike[str]) -> list[str]:
    """One class name per non-empty line, in sorted folder order."""
    names = [line.strip() for line in Path(path).read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


def evaluate_zeroshot(
    model: Any,
    *,
    tokenizer: Callable[[list[str]], torch.Tensor],
    transform: Callable[[Any], torch.Tensor],
    folder: str | os.PathLike[str],
    classnames: Sequence[str] | None = None,
    templates: Sequence[str | Callable[[str], str]],
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    loader_workers: int = 0,
    shard: Shard | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) of ``model`` on the ImageFolder ``folder``.

    Class ``i`` is the i-th folder in sorted order; its name is ``classnames[i]`` or the folder name with
    underscores as spaces. Each class's text embedding averages the prompts from ``templates``
    (``"a photo of a {}."`` or callables). ``model`` offers ``encode_image(x, normalize=True)`` and
    ``encode_text(tokens, normalize=True)``; its train/eval mode is restored afterwards.

    With a ``shard`` of several ranks (a collective), each rank embeds its slice of the class prompts and
    classifies its slice of the images; the class embeddings are gathered and the hit counts summed.
    """
    shard = shard or Shard()
    dataset = ImageFolder(os.fspath(folder), transform=transform)
    names = list(classnames) if classnames is not None else [c.replace("_", " ") for c in dataset.classes]
    if len(names) != len(dataset.classes):
        raise ValueError(
            f"{folder}: {len(dataset.classes)} class folders but {len(names)} class names; names must follow "
            "sorted folder order"
        )
    if not templates:
        raise ValueError("zero-shot needs at least one prompt template")
    images_of_rank = Subset(dataset, shard.span(len(dataset)))
    loader = DataLoader(images_of_rank, batch_size=batch_size, shuffle=False, num_workers=loader_workers)
    ks = (1, 5)
    hits = dict.fromkeys(ks, 0)
    total = 0
    # fewer classes than ranks: every rank builds the whole (small) classifier instead of an empty slice
    classes = shard.span(len(names)) if len(names) >= shard.world_size else range(len(names))
    with eval_mode(model):
        classifier = build_zero_shot_classifier(
            model,
            tokenizer,
            names[classes.start : classes.stop],
            list(templates),
            num_classes_per_batch=10,
            device=device,
        )
        if len(classes) < len(names):
            classifier = shard.gather_rows(classifier.float().T.contiguous()).T
        for images, labels in loader:
            features = model.encode_image(images.to(device), normalize=True)
            logits = features.float() @ classifier.float()
            for k, n in topk_accuracy(logits, labels.to(device), ks).items():
                hits[k] += n
            total += labels.shape[0]
    hit1, hit5, n_total = shard.sum([hits[1], hits[5], total], device=device)
    if n_total == 0:
        raise ValueError(f"{folder}: no images")
    return {"zeroshot_top1": hit1 / n_total, "zeroshot_top5": hit5 / n_total}
