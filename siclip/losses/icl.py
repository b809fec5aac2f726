"""Interactive contrastive learning (ICL): student embeddings contrasted against the teacher's other modality."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siclip.losses.clip import clamp_log_scale_, initial_log_scale


class ICLLoss(nn.Module):
    """InfoNCE of student images vs teacher texts and of student texts vs teacher images, averaged.

    The student embedding is the anchor and the teacher's embeddings of the other modality are the candidates
    (CLIP-KD's ICL: each direction is one cross-entropy over rows). The temperature is a log
    inverse temperature, exponentiated, and kept at most ``max_logit_scale`` as a parameter (at init and by
    :meth:`clamp_scales_` after each optimizer step, so its gradient is never cut off); with ``raw=True`` the stored value
    itself multiplies the logits, as CLIP-KD's and the authors' code do (``log(1/0.07) = 2.66`` at init: a much
    softer distribution). Student embeddings must be in the teacher's dimension (see ``EmbedProjector``).
    """

    def __init__(
        self,
        *,
        temperature: float = 0.07,
        learnable: bool = True,
        max_logit_scale: float = 100.0,
        raw: bool = False,
    ) -> None:
        super().__init__()
        log_scale = (
            torch.tensor(math.log(1.0 / temperature))
            if raw
            else initial_log_scale(temperature, max_logit_scale)
        )
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_logit_scale = max_logit_scale
        self.raw = raw

    def scale(self) -> Tensor:
        """The current inverse temperature, or the raw stored value."""
        return self.log_scale if self.raw else self.log_scale.exp()

    @torch.no_grad()
    def clamp_scales_(self) -> None:
        """After the optimizer step: the scale back under ``max_logit_scale`` (the raw value itself, raw)."""
        if self.raw:
            self.log_scale.clamp_(max=self.max_logit_scale)
        else:
            clamp_log_scale_(self.log_scale, self.max_logit_scale)

    def forward(
        self, s_img: Tensor, s_txt: Tensor, t_img: Tensor, t_txt: Tensor, *, rows: slice | None = None
    ) -> Tensor:
        """``rows``: only those student anchors, against every teacher candidate (the local loss)."""
        scale = self.scale()
        rows = rows if rows is not None else slice(0, s_img.shape[0])
        labels = torch.arange(rows.start, rows.stop, device=s_img.device)
        i2t = F.cross_entropy(scale * s_img[rows] @ t_txt.detach().T, labels)
        t2i = F.cross_entropy(scale * s_txt[rows] @ t_img.detach().T, labels)
        return 0.5 * (i2t + t2i)
