"""The CLIP contrastive term (symmetric InfoNCE) and the logit-scale convention every temperature follows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def scale_from_log(log_scale: Tensor, max_logit_scale: float) -> Tensor:
    """``exp(log_scale)`` clamped at ``max_logit_scale``: for a scale nobody trains (the teacher's).

    A trained scale is used as ``exp(log_scale)`` and clamped as a parameter after each optimizer step
    (:func:`clamp_log_scale_`, open_clip's convention): a clamp in the forward pass would give it exactly zero
    gradient above the cap, where it could stick.
    """
    return log_scale.exp().clamp(max=max_logit_scale)


@torch.no_grad()
def clamp_log_scale_(log_scale: Tensor, max_logit_scale: float) -> None:
    """In place: ``exp(log_scale) <= max_logit_scale`` (call after the optimizer step)."""
    log_scale.clamp_(max=math.log(max_logit_scale))


def initial_log_scale(temperature: float, max_logit_scale: float) -> Tensor:
    """``log(1 / temperature)``, at most ``log(max_logit_scale)``: a trained scale starts inside the cap."""
    return torch.tensor(min(math.log(1.0 / temperature), math.log(max_logit_scale)))


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
    """Symmetric InfoNCE between image and text embeddings, scaled by ``exp`` of the student's logit scale.

    The scale is not clamped here: the training step clamps the parameter after the optimizer step
    (``SiclipTask.clamp_logit_scales``), so its gradient is never cut off.

    The inputs are the (possibly gathered) global batch: with the full global similarity matrix the labels are
    the global indices, i.e. each rank's local labels offset by ``rank * local_batch``.
    """

    def __init__(self, *, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.max_logit_scale = max_logit_scale

    def forward(self, img: Tensor, txt: Tensor, logit_scale: Tensor, *, rows: slice | None = None) -> Tensor:
        return symmetric_infonce(img, txt, logit_scale.exp(), rows)
