"""The CLIP contrastive term (symmetric InfoNCE) and the logit-scale convention every temperature follows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def scale_from_log(log_scale: Tensor, max_logit_scale: float) -> Tensor:
    """``exp(log_scale)`` clamped at ``max_logit_scale``: open_clip's logit-scale convention (inverse temperature)."""
    return log_scale.exp().clamp(max=max_logit_scale)


def symmetric_infonce(a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """Mean of the cross-entropies ``a -> b`` and ``b -> a``, where row i of ``a`` matches row i of ``b``."""
    logits = scale * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class ClipLoss(nn.Module):
    """Symmetric InfoNCE between image and text embeddings, scaled by the student's clamped logit scale.

    The inputs are the (possibly gathered) global batch: with the full global similarity matrix the labels are
    the global indices, i.e. each rank's local labels offset by ``rank * local_batch``.
    """

    def __init__(self, *, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale

    def forward(self, img: Tensor, txt: Tensor, logit_scale: Tensor) -> Tensor:
        return symmetric_infonce(img, txt, scale_from_log(logit_scale, self.max_logit_scale))
