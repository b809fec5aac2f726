"""The WIKD + PM objective: ``clip + fd*FD + crd*CRD + icl*ICL + pm*PM``, every term and temperature returned.

``WIKDLoss`` owns the loss's trainable parameters (ICL temperature, CRD student temperature, PM head, FD/ICL
projector), so the task can put it into DDP and the optimizer beside the student.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from siclip.config import LossCfg
from siclip.losses.clip import ClipLoss, scale_from_log
from siclip.losses.crd import CRDLoss
from siclip.losses.fd import EmbedProjector, FDLoss
from siclip.losses.gather import gather_features, local_rows, scale_grad
from siclip.losses.icl import ICLLoss
from siclip.losses.pm import PMLoss
from siclip.losses.schedule import max_weights, weights_at
from siclip.losses.terms import TERMS

__all__ = ["WIKDLoss", "build_loss"]


class WIKDLoss(nn.Module):
    """Weighted sum of the CLIP, FD, CRD, ICL and PM terms (docs/method.md sections 3-4).

    A term whose weight is 0 for the whole run (every ``loss.schedule`` stage included) is never built; a term
    whose weight is 0 at the current step (:meth:`set_step`) is not computed; both are absent from the output,
    and so are the KD terms (FD, CRD, ICL) when the loss was built without a teacher (``teacher_dim=None``)
    or the call passes no teacher embeddings. Which terms exist, what each needs and how each is built is the
    table in :mod:`siclip.losses.terms`. With ``gather`` and ``world_size > 1``, the gathered terms (CLIP,
    CRD, ICL, PM) see the global batch (every rank computes the same value as one worker would on the
    concatenated batch); FD stays local.

    Gradients under DDP: the loss's own parameters (temperatures, PM head, projector) get the whole
    global-batch gradient on every rank, so DDP's average is the one-worker gradient. The student's
    embeddings get, per rank, exactly their slice of the one-worker gradient with a detached gather
    (``loss.gather_with_grad: false``), so after DDP's average the student's gradient from the gathered terms
    is ``1/world_size`` of the one-worker gradient while FD's is exact; ``gather_with_grad: true`` (the
    config's default, which the loss reads from ``cfg``) sums over ranks in backward instead, which makes every
    term exact after the average.

    ``cfg.local`` computes only this rank's rows of each gathered matrix (their mean over ranks is the global
    value). Its columns must carry gradient back to their ranks (other ranks' rows score this rank's items),
    so the gather is always with gradient; without ``gather_with_grad`` the student's gradient is then scaled
    by ``1/world_size``, which gives each rank exactly the gradient of the detached global form. The loss's own
    parameters get this rank's share, whose DDP average is the global gradient.
    """

    def __init__(
        self,
        cfg: LossCfg,
        *,
        student_dim: int,
        teacher_dim: int | None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.gather_with_grad = cfg.gather_with_grad
        self.weights = weights_at(cfg, 0)
        built = max_weights(cfg)
        self.teacher_dim = teacher_dim
        has_teacher = teacher_dim is not None
        terms = {t.name: t for t in TERMS}

        def build(name: str) -> nn.Module | None:
            # built when its weight is above 0 at some step and, for a KD term, there is a teacher
            t = terms[name]
            on = built[name] > 0 and (has_teacher or not t.needs_teacher)
            return t.build(cfg, student_dim) if on else None

        # this order (clip, fd, crd, icl, projector, pm) is the order of the random initialisation (the same
        # seed gives the same weights) and of the parameters, which optimizer state and checkpoints index by
        self.clip = cast("ClipLoss | None", build("clip"))
        self.fd = cast("FDLoss | None", build("fd"))
        self.crd = cast("CRDLoss | None", build("crd"))
        self.icl = cast("ICLLoss | None", build("icl"))
        needs_proj = (self.fd is not None or self.icl is not None) and teacher_dim != student_dim
        self.projector = EmbedProjector(student_dim, teacher_dim) if needs_proj and teacher_dim else None
        self.pm = cast("PMLoss | None", build("pm"))

    def set_step(self, step: int) -> dict[str, float] | None:
        """Use the ``loss.schedule`` weights of optimizer step ``step``; returns them when they changed."""
        weights = weights_at(self.cfg, step)
        if weights == self.weights:
            return None
        self.weights = weights
        return dict(weights)

    def clamp_scales_(self) -> None:
        """After the optimizer step: the loss's own trained scales (CRD's, ICL's) back under the cap."""
        for term in (self.crd, self.icl):
            if term is not None:
                term.clamp_scales_()

    def _on(self, name: str, module: nn.Module | None) -> bool:
        return module is not None and self.weights[name] > 0

    def _project(self, s_img: Tensor, s_txt: Tensor) -> tuple[Tensor, Tensor]:
        return self.projector(s_img, s_txt) if self.projector is not None else (s_img, s_txt)

    def forward(
        self,
        s_img: Tensor,
        s_txt: Tensor,
        logit_scale: Tensor,
        t_img: Tensor | None = None,
        t_txt: Tensor | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        generator: torch.Generator | None = None,
        keep_terms: bool = False,
        t_logit_scale: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``loss`` (with gradient), each computed term as ``<name>_loss`` (detached) and ``temp/*`` (0-d).

        ``t_logit_scale`` is the teacher's log logit scale, which CRD uses with ``crd_teacher_scale: teacher``.
        ``keep_terms`` adds ``term/<name>``: each weighted term with its graph, for per-term gradients.

        Runs in fp32 even inside an autocast region: bf16 logits at scale 100 would be coarser than the
        differences the contrastive terms learn from, and the loss is cheap next to the encoders.
        """
        with torch.autocast(device_type=s_img.device.type, enabled=False):
            return self._forward(
                s_img.float(),
                s_txt.float(),
                logit_scale.float(),
                None if t_img is None else t_img.float(),
                None if t_txt is None else t_txt.float(),
                rank=rank,
                world_size=world_size,
                generator=generator,
                keep_terms=keep_terms,
                t_logit_scale=None if t_logit_scale is None else t_logit_scale.float(),
            )

    def _forward(
        self,
        s_img: Tensor,
        s_txt: Tensor,
        logit_scale: Tensor,
        t_img: Tensor | None,
        t_txt: Tensor | None,
        *,
        rank: int,
        world_size: int,
        generator: torch.Generator | None,
        keep_terms: bool,
        t_logit_scale: Tensor | None,
    ) -> dict[str, Tensor]:
        if (t_img is None) != (t_txt is None):
            raise ValueError("pass both teacher embeddings or neither")
        if t_img is not None and self.teacher_dim is None:
            raise ValueError("teacher embeddings given, but the loss was built with teacher_dim=None")
        if t_img is not None and t_img.shape[-1] != self.teacher_dim:
            raise ValueError(
                f"teacher dim {t_img.shape[-1]} != teacher_dim {self.teacher_dim} the loss was built for"
            )
        ws = world_size if self.cfg.gather else 1
        local = self.cfg.local and ws > 1
        rows = local_rows(rank, s_img.shape[0]) if local else None

        def glob(x: Tensor) -> Tensor:
            return gather_features(x, rank=rank, world_size=ws, with_grad=self.gather_with_grad or local)

        clip_scale = logit_scale.exp()  # a parameter: clamped after the optimizer step, not here
        out: dict[str, Tensor] = {"temp/clip": (1.0 / clip_scale).detach()}
        terms: dict[str, Tensor] = {}
        crd_on, icl_on = self._on("crd", self.crd), self._on("icl", self.icl)
        needs_global = (
            self._on("clip", self.clip)
            or self._on("pm", self.pm)
            or (t_img is not None and (crd_on or icl_on))
        )
        # FD keeps s_img/s_txt: it is local, and its gradient must not be rescaled
        c_img, c_txt = (
            (s_img, s_txt)
            if not local or self.gather_with_grad
            else (
                scale_grad(s_img, 1.0 / ws),
                scale_grad(s_txt, 1.0 / ws),
            )
        )
        g_img, g_txt = (glob(c_img), glob(c_txt)) if needs_global else (s_img, s_txt)
        if self.clip is not None and self._on("clip", self.clip):
            terms["clip"] = self.clip(g_img, g_txt, logit_scale, rows=rows)
        if self.pm is not None and self._on("pm", self.pm):
            terms["pm"] = self.pm(
                g_img, g_txt, scale=clip_scale.detach(), generator=generator, world_size=ws, rows=rows
            )
        crd_student = clip_scale if self.cfg.crd_student_scale == "clip" else None
        crd_teacher: Tensor | None = None
        if self.cfg.crd_teacher_scale == "teacher" and t_img is not None and crd_on:
            if t_logit_scale is None:
                raise ValueError("loss.crd_teacher_scale is 'teacher' but no teacher logit scale was passed")
            crd_teacher = scale_from_log(t_logit_scale.detach(), self.cfg.max_logit_scale)
        elif self.cfg.crd_teacher_scale == "matched" and self.crd is not None:
            # both sides at one temperature: the student's (CLIP or CRD's own), the teacher's copy detached
            crd_teacher = (self.crd.student_scale() if crd_student is None else crd_student).detach()
        if self.crd is not None:
            shown = self.crd.student_scale() if crd_student is None else crd_student
            out["temp/crd_student"] = (1.0 / shown).detach()
        if self.icl is not None:
            out["temp/icl"] = (1.0 / self.icl.scale()).detach()
        if t_img is not None and t_txt is not None:
            t_img, t_txt = t_img.detach(), t_txt.detach()
            kd_global = crd_on or icl_on
            if self.fd is not None and self._on("fd", self.fd):
                p_img, p_txt = self._project(s_img, s_txt)
                terms["fd"] = self.fd(p_img, p_txt, t_img, t_txt)
            gt_img, gt_txt = (glob(t_img), glob(t_txt)) if kd_global else (t_img, t_txt)
            if self.crd is not None and crd_on:
                terms["crd"] = self.crd(
                    g_img,
                    g_txt,
                    gt_img,
                    gt_txt,
                    student_scale=crd_student,
                    teacher_scale=crd_teacher,
                    rows=rows,
                )
            if self.icl is not None and icl_on:
                # projecting after the gather gives the projector the whole global ICL gradient on every rank,
                # like the loss's other parameters (projecting before would leave each rank only its slice)
                terms["icl"] = self.icl(*self._project(g_img, g_txt), gt_img, gt_txt, rows=rows)
        if not terms:
            raise ValueError(
                "no loss term is active at this step: every weight is 0 (or only KD terms and no teacher)"
            )
        weighted = {name: self.weights[name] * value for name, value in terms.items()}
        out["loss"] = torch.stack(list(weighted.values())).sum()
        out.update({f"{name}_loss": value.detach() for name, value in terms.items()})
        if keep_terms:
            out.update({f"term/{name}": value for name, value in weighted.items()})
        return out


def build_loss(cfg: LossCfg, *, student_dim: int, teacher_dim: int | None) -> WIKDLoss:
    """The configured WIKD + PM loss (``cfg.gather_with_grad`` included); ``teacher_dim=None`` builds no KD
    terms (no teacher)."""
    return WIKDLoss(cfg, student_dim=student_dim, teacher_dim=teacher_dim)
