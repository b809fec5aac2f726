"""Contrastive relational distillation (CRD): the student copies the teacher's image-text similarity rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siclip.losses.clip import clamp_log_scale_, initial_log_scale


def _kl_rows(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(teacher || student) of the row softmaxes, summed over columns, averaged over rows."""
    return F.kl_div(
        F.log_softmax(student_logits, dim=1),
        F.log_softmax(teacher_logits, dim=1),
        reduction="batchmean",
        log_target=True,
    )


class CRDLoss(nn.Module):
    """Mean of KL(teacher || student) for image->text and text->image similarity rows.

    Each model has its own temperature. The teacher's is fixed (``1 / teacher_temperature``) unless the call
    passes ``teacher_scale`` (the teacher's own ``logit_scale.exp()``, as CLIP-KD's and the authors' code do).
    The student's is a log inverse temperature (exponentiated like the CLIP logit scale, and like it clamped
    at ``max_logit_scale`` as a parameter: at init and by :meth:`clamp_scales_` after each optimizer step),
    learnable when ``learnable``, unless the call passes ``student_scale`` (the student's CLIP logit scale,
    as in that code). The teacher is detached.
    """

    def __init__(
        self,
        *,
        student_temperature: float = 0.07,
        teacher_temperature: float = 0.07,
        learnable: bool = True,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        log_scale = initial_log_scale(student_temperature, max_logit_scale)
        if learnable:
            self.student_log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("student_log_scale", log_scale)
        self.teacher_scale = 1.0 / teacher_temperature
        self.max_logit_scale = max_logit_scale

    def student_scale(self) -> Tensor:
        """The student's current inverse temperature."""
        return self.student_log_scale.exp()

    def clamp_scales_(self) -> None:
        """After the optimizer step: the student's scale back under ``max_logit_scale``."""
        clamp_log_scale_(self.student_log_scale, self.max_logit_scale)

    def forward(
        self,
        s_img: Tensor,
        s_txt: Tensor,
        t_img: Tensor,
        t_txt: Tensor,
        *,
        student_scale: Tensor | None = None,
        teacher_scale: Tensor | float | None = None,
        rows: slice | None = None,
    ) -> Tensor:
        """``rows``: only those rows of each direction's similarity matrix (the local loss)."""
        s_scale = self.student_scale() if student_scale is None else student_scale
        t_scale = self.teacher_scale if teacher_scale is None else teacher_scale
        if rows is None:
            s_logits = s_scale * s_img @ s_txt.T
            with torch.no_grad():
                t_logits = t_scale * t_img @ t_txt.T
            return 0.5 * (_kl_rows(s_logits, t_logits) + _kl_rows(s_logits.T, t_logits.T))
        with torch.no_grad():
            t_i2t = t_scale * t_img[rows] @ t_txt.T
            t_t2i = t_scale * t_txt[rows] @ t_img.T
        return 0.5 * (
            _kl_rows(s_scale * s_img[rows] @ s_txt.T, t_i2t)
            + _kl_rows(s_scale * s_txt[rows] @ s_img.T, t_t2i)
        )
