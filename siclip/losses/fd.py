"""Feature distillation (FD): the student's embeddings regress onto the teacher's, per sample."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FDLoss(nn.Module):
    """``MSE(v_S, v_T) + MSE(s_S, s_T)``, each a mean over batch x dimension, times ``D / reference_dim``
    when ``reference_dim > 0`` (``loss.fd_reference_dim``: the weight then means the same pull per sample at
    any width D; see :class:`~siclip.config.LossCfg`).

    The student embeddings must already be in the teacher's dimension: ``WIKDLoss`` runs them through its
    ``EmbedProjector`` first when the dimensions differ (shared with ICL). FD is local to each worker.
    """

    def __init__(self, reference_dim: int = 0) -> None:
        super().__init__()
        self.reference_dim = reference_dim

    def forward(self, s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor) -> Tensor:
        if s_img.shape[-1] != t_img.shape[-1]:
            raise ValueError(f"FD needs equal dims (student {s_img.shape[-1]}, teacher {t_img.shape[-1]})")
        fd = F.mse_loss(s_img, t_img.detach()) + F.mse_loss(s_txt, t_txt.detach())
        return fd * (t_img.shape[-1] / self.reference_dim) if self.reference_dim else fd


class EmbedProjector(nn.Module):
    """Student -> teacher dimension: one bias-free linear map per modality, then L2 re-normalisation.

    Separate maps for image and text because the two towers' embedding spaces are only aligned by training;
    re-normalising keeps FD and ICL on the unit sphere like the teacher's embeddings.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.image = nn.Linear(student_dim, teacher_dim, bias=False)
        self.text = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, s_img: Tensor, s_txt: Tensor) -> tuple[Tensor, Tensor]:
        return F.normalize(self.image(s_img), dim=-1), F.normalize(self.text(s_txt), dim=-1)
