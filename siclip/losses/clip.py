"""The CLIP contrastive term (symmetric InfoNCE) and the logit-scale convention every temperature follows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def scale_from_log(log_scale: Tensor, max_logit_scale: float) -> Tensor:
    """``exp(log_scale)`` clamped at ``max_logit_scale``: open_clip's logit-scale convention (inverse temperature)."""
    return log_scale.exp().clamp(max=max_logit_scale)


def symmetric_infonce(a: Tensor, b: Tensor, scale: Tensor, rows: slice | None = None) -> Tensor:
    """Mean of the cross-entropies ``a -> b`` and ``b -> a``, where row i of ``a`` matches row i of ``b``.

    ``rows`` (the local loss, see :func:`siclip.losses.gather.local_rows`): only those anchors of each
    direction, against every candidate; the mean over ranks of the result is the value over all rows.
    """
    if rows is None:
        logits = scale * a @ b.T
        labels = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    labels = torch.arange(rows.start, rows.stop, device=a.device)
    return 0.5 * (
        F.cross_entropy(scale * a[rows] @ b.T, labels) + F.cross_entropy(scale * b[rows] @ a.T, labels)
    )


class ClipLoss(nn.Module):
    """Symmetric InfoNCE between image and text embeddings, scaled by the student's clamped logit scale.

    The inputs are the (possibly gathered) global batch: with the full global similarity matrix the labels are
    the global indices, i.e. each rank's local labels offset by ``rank * local_batch``.
    """

    def __init__(self, *, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale

    def forward(self, img: Tensor, txt: Tensor, logit_scale: Tensor, *, rows: slice | None = None) -> Tensor:
        return symmetric_infonce(img, txt, scale_from_log(logit_scale, self.max_logit_scale), rows)
