"""Image-text retrieval recall@K on WebDataset shards with one or several captions per image.

A sample's captions are ``json["captions"]`` when present (demo world retrieval split, COCO/Flickr
converted to shards), else its ``txt``. open_clip's ``get_clip_metrics`` assumes one caption per image,
so the ranking lives in :func:`siclip.eval.metrics.retrieval_recall`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from siclip.data.shards import image_of, iter_samples
from siclip.eval.metrics import eval_mode, retrieval_recall
from siclip.eval.ranks import Shard

__all__ = ["evaluate_retrieval", "sample_captions"]


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """A decoded sample's captions: ``json["captions"]`` if it is a non-empty list, else ``[txt]``."""
    meta = sample.get("json")
    if isinstance(meta, dict) and isinstance(meta.get("captions"), list) and meta["captions"]:
        return [str(c) for c in meta["captions"]]
    if "txt" not in sample:
        raise KeyError(f"sample {sample.get('__key__')!r} has no caption (txt or json['captions'])")
    return [sample["txt"]]


def _batched(items: Iterable[Any], n: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate_retrieval(
    model: Any,
    *,
    tokenizer: Callable[[list[str]], torch.Tensor],
    transform: Callable[[Any], torch.Tensor],
    urls: str | Sequence[str],
    recall_at: Sequence[int] = (1, 5, 10),
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    shard: Shard | None = None,
) -> dict[str, float]:
    """``i2t_r@K`` and ``t2i_r@K`` (fractions) of ``model`` on the shards ``urls``.

    ``model`` offers ``encode_image(x, normalize=True)`` and ``encode_text(tokens, normalize=True)``; it
    runs under ``torch.no_grad()`` in eval mode, and its train/eval mode is restored afterwards. With a
    ``shard`` of several ranks (a collective) each rank embeds every N-th sample and its captions; the
    embeddings are gathered and every rank ranks the whole set.
    """
    shard = shard or Shard()
    image_embs: list[torch.Tensor] = []
    captions: list[str] = []
    text_to_image: list[int] = []
    with eval_mode(model):
        n_images = 0
        mine = (s for i, s in enumerate(iter_samples(urls)) if shard.owns(i))
        for batch in _batched(mine, batch_size):
            images = torch.stack([transform(image_of(s)) for s in batch]).to(device)
            image_embs.append(model.encode_image(images, normalize=True).float())
            for s in batch:
                caps = sample_captions(s)
                captions.extend(caps)
                text_to_image.extend([n_images] * len(caps))
                n_images += 1
        text_embs = [
            model.encode_text(tokenizer(chunk).to(device), normalize=True).float()
            for chunk in _batched(captions, batch_size)
        ]
    # this rank's caption -> image indices become global ones: the gathered images come in rank order
    n_before = shard.gather_rows(torch.tensor([n_images], device=device))[: shard.rank].sum()
    img = shard.gather_rows(torch.cat(image_embs) if image_embs else torch.empty(0, 0, device=device))
    txt = shard.gather_rows(torch.cat(text_embs) if text_embs else torch.empty(0, 0, device=device))
    owner = shard.gather_rows(torch.tensor(text_to_image, dtype=torch.long, device=device) + n_before)
    if img.shape[0] == 0:
        raise ValueError(f"no samples in retrieval shards {urls!r}")
    return retrieval_recall(img, txt, owner, list(recall_at))
