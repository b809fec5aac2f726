"""Pure metric math for evaluation: top-k accuracy and retrieval recall@K with several captions per image.

Ties count against the model (a caption tied with the right one ranks above it), so a degenerate model
that maps everything to one point scores chance or worse, never a perfect recall.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

__all__ = ["eval_mode", "retrieval_recall", "topk_accuracy"]


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and under ``torch.no_grad()``; restore its train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> dict[int, int]:
    """How many rows have their label among the k highest logits, per k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks}


def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int],
    *,
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways for ``N`` images and ``M >= N`` captions, caption ``j`` belonging to image
    ``text_to_image[j]``; scores are dot products (pass normalised embeddings for cosine similarity).

    Image -> text: an image is right at K if any of its captions ranks in its top K. Text -> image: a
    caption is right at K if its own image ranks in its top K. Returns ``{"i2t_r@K", "t2i_r@K"}``.
    """
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    text_to_image = text_to_image.to(image_emb.device).long()
    if text_to_image.shape != (n_txt,) or int(text_to_image.max()) >= n_img or int(text_to_image.min()) < 0:
        raise ValueError("text_to_image must give each caption's image index in [0, number of images)")
    image_emb, text_emb = image_emb.float(), text_emb.float()

    # i2t: an image's rank is the number of other images' captions scoring at least its best own caption.
    i2t_rank = torch.empty(n_img, dtype=torch.long, device=image_emb.device)
    for start in range(0, n_img, chunk):
        sim = image_emb[start : start + chunk] @ text_emb.T  # [c, M]
        rows = torch.arange(start, start + sim.shape[0], device=sim.device)
        own = text_to_image[None, :] == rows[:, None]
        best_own = sim.masked_fill(~own, float("-inf")).max(dim=1).values
        i2t_rank[start : start + sim.shape[0]] = ((sim >= best_own[:, None]) & ~own).sum(dim=1)

    # t2i: a caption's rank is the number of other images scoring at least its own image.
    t2i_rank = torch.empty(n_txt, dtype=torch.long, device=image_emb.device)
    for start in range(0, n_txt, chunk):
        sim = text_emb[start : start + chunk] @ image_emb.T  # [c, N]
        own_idx = text_to_image[start : start + sim.shape[0]]
        own_score = sim.gather(1, own_idx[:, None])
        others = torch.ones_like(sim, dtype=torch.bool).scatter_(1, own_idx[:, None], False)
        t2i_rank[start : start + sim.shape[0]] = ((sim >= own_score) & others).sum(dim=1)

    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float((i2t_rank < k).float().mean())
        out[f"t2i_r@{k}"] = float((t2i_rank < k).float().mean())
    return out
