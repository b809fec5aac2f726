"""Zero-shot classification on an ImageFolder directory with class-name prompts (open_clip's classifier).

When the folder names the classes its model's training data lacked (``held_out_classes.txt`` beside the class
folders, one folder name per line, as the held-out demo world writes it), accuracy is also reported separately
on the images of those classes (``*_unseen``) and of the others (``*_seen``); the classifier always spans
every class.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from open_clip import build_zero_shot_classifier
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from siclip.data.demo_world import HELD_OUT_FILE
from siclip.eval.metrics import eval_mode, topk_accuracy
from siclip.eval.ranks import Shard

__all__ = ["evaluate_zeroshot", "load_classnames", "load_held_out"]


def load_classnames(path: str | os.PathLike[str]) -> list[str]:
    """One class name per non-empty line, in sorted folder order."""
    names = [line.strip() for line in Path(path).read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"{path}: no class names")
    return names


def load_held_out(folder: str | os.PathLike[str]) -> list[str]:
    """The class folders listed in ``folder/held_out_classes.txt`` (empty when there is no such file)."""
    path = Path(folder) / HELD_OUT_FILE
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


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
    unseen_classes: Sequence[str] | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) of ``model`` on the ImageFolder ``folder``.

    ``unseen_classes``: class folders the model's training data lacked (default: those of
    ``folder/held_out_classes.txt``, if any). With some, the keys ``zeroshot_top{1,5}_seen`` and
    ``zeroshot_top{1,5}_unseen`` give the accuracy on the images of the other classes and of those (each
    only when it has images); the classifier still spans every class.

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
    unseen = list(unseen_classes) if unseen_classes is not None else load_held_out(folder)
    missing = [c for c in unseen if c not in dataset.classes]
    if missing:
        raise ValueError(f"{folder}: held-out class {missing[0]!r} is not one of its class folders")
    is_unseen = torch.tensor([c in unseen for c in dataset.classes], dtype=torch.bool)
    images_of_rank = Subset(dataset, shard.span(len(dataset)))
    loader = DataLoader(images_of_rank, batch_size=batch_size, shuffle=False, num_workers=loader_workers)
    ks = (1, 5)
    groups = ("all", "seen", "unseen")
    hits = {g: dict.fromkeys(ks, 0) for g in groups}
    total = dict.fromkeys(groups, 0)
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
            labels = labels.to(device)
            unseen_rows = is_unseen.to(device)[labels]
            for group, rows in (("all", None), ("seen", ~unseen_rows), ("unseen", unseen_rows)):
                if rows is not None and not unseen:
                    continue
                part_logits, part_labels = (logits, labels) if rows is None else (logits[rows], labels[rows])
                if part_labels.shape[0]:
                    for k, n in topk_accuracy(part_logits, part_labels, ks).items():
                        hits[group][k] += n
                total[group] += int(part_labels.shape[0])
    counts = shard.sum([v for g in groups for v in (hits[g][1], hits[g][5], total[g])], device=device)
    summed = {g: counts[3 * i : 3 * i + 3] for i, g in enumerate(groups)}
    if summed["all"][2] == 0:
        raise ValueError(f"{folder}: no images")
    out: dict[str, float] = {}
    for group, (hit1, hit5, n_images) in summed.items():
        if n_images:
            suffix = "" if group == "all" else f"_{group}"
            out[f"zeroshot_top1{suffix}"] = hit1 / n_images
            out[f"zeroshot_top5{suffix}"] = hit5 / n_images
    return out
