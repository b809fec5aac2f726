"""The training task: student + frozen teacher + WIKD/PM loss; a batch goes in, every loss term comes out.

The task is the one module that goes into DDP, so the student *and* the loss's own parameters (ICL
temperature, PM head, FD projector) are synchronised across workers. The teacher is held outside the
module tree (not a submodule) so DDP never sees it, and it runs in eval mode under ``torch.no_grad()``.
:func:`build_task` builds it from a config and :func:`build_batches` the batches it trains on (Ray-free: the
Ray Train worker calls both on every rank).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from siclip.config import SiclipCfg, expand_shards
from siclip.losses.schedule import max_weights
from siclip.losses.terms import SYN_KEY, TERMS, TOTAL_KEY, is_summed_over_caption_sets
from siclip.losses.total import build_loss
from siclip.models.build import build_student, build_teacher
from siclip.models.presets import preset_info

__all__ = ["SiclipTask", "build_batches", "build_task"]


class SiclipTask(nn.Module):
    """Student, loss and (optionally) a frozen teacher.

    ``forward(batch, rank=, world_size=)`` reads ``image`` and ``text`` (student inputs), and, when
    present, ``syn_text`` (a synthetic caption per sample; its loss is added to the real-caption loss),
    ``teacher_image``/``teacher_text``/``teacher_syn_text`` (teacher inputs when its preprocessing or
    tokenizer differ from the student's) and ``teacher_image_emb``/``teacher_text_emb``/``teacher_syn_emb``
    (precomputed teacher embeddings from the shards, used instead of a teacher forward pass).
    ``caption_sets``: the caption sets' losses are summed, or averaged (``"mean"``).
    """

    def __init__(
        self,
        student: nn.Module,
        loss: nn.Module,
        teacher: nn.Module | None = None,
        *,
        caption_sets: str = "sum",
    ) -> None:
        super().__init__()
        if caption_sets not in ("sum", "mean"):
            raise ValueError(f"caption_sets: got {caption_sets!r}; allowed: 'sum', 'mean'")
        self.student = student
        self.loss = loss
        self.caption_sets = caption_sets
        # A plain attribute, not a submodule: DDP, .parameters(), state_dict() and optimizers skip it.
        self.__dict__["teacher"] = teacher
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.clamp_logit_scales()  # an inherited scale above the cap starts at the cap

    @torch.no_grad()
    def clamp_logit_scales(self) -> None:
        """Every trained logit scale (the student's, CRD's and ICL's own) back to at most the loss's
        ``max_logit_scale``, in place; the training step calls it after each optimizer step (open_clip's
        convention), so the losses use ``exp`` unclamped and the scales keep their gradient at the cap."""
        cap = getattr(getattr(self.loss, "cfg", None), "max_logit_scale", None)
        if cap is None:
            return
        scale = getattr(self.student, "logit_scale", None)
        if isinstance(scale, Tensor):
            scale.clamp_(max=math.log(cap))
        clamp = getattr(self.loss, "clamp_scales_", None)
        if callable(clamp):
            clamp()

    @property
    def teacher(self) -> nn.Module | None:
        return self.__dict__["teacher"]

    def to(self, *args: Any, **kwargs: Any) -> SiclipTask:  # type: ignore[override]
        super().to(*args, **kwargs)
        if self.teacher is not None:
            self.teacher.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> SiclipTask:
        from siclip.models.inherit import set_train_mode

        nn.Module.train(self, mode)
        set_train_mode(self.student, mode)  # frozen (inherited) modules stay in eval mode
        return self

    @torch.no_grad()
    def _teacher_embeddings(self, batch: dict[str, Tensor], n_text: int) -> tuple[Tensor, Tensor] | None:
        if "teacher_image_emb" in batch and "teacher_text_emb" in batch:
            texts = [batch["teacher_text_emb"]]
            if n_text == 2:
                if "teacher_syn_emb" not in batch:
                    raise KeyError("batch has syn_text and stored teacher embeddings but no teacher_syn_emb")
                texts.append(batch["teacher_syn_emb"])
            img = nn.functional.normalize(batch["teacher_image_emb"].float(), dim=-1)
            return img, nn.functional.normalize(torch.cat(texts).float(), dim=-1)
        if self.teacher is None:
            return None
        teacher: Any = self.teacher
        teacher.eval()
        image = batch.get("teacher_image", batch["image"])
        texts = [batch.get("teacher_text", batch["text"])]
        if n_text == 2:
            texts.append(batch.get("teacher_syn_text", batch["syn_text"]))
        t_img = teacher.encode_image(image, normalize=True).float()
        t_txt = teacher.encode_text(torch.cat(texts), normalize=True).float()
        return t_img, t_txt

    def forward(
        self, batch: dict[str, Tensor], *, rank: int = 0, world_size: int = 1, keep_terms: bool = False
    ) -> dict[str, Tensor]:
        texts = [batch["text"]]
        if "syn_text" in batch:
            texts.append(batch["syn_text"])
        n = batch["text"].shape[0]
        student: Any = self.student  # an open_clip-style model: encode_image / encode_text / logit_scale
        # One student pass over real + synthetic captions: DDP allows one forward per backward.
        s_img = student.encode_image(batch["image"], normalize=True).float()
        s_txt = student.encode_text(torch.cat(texts), normalize=True).float()
        teacher = self._teacher_embeddings(batch, len(texts))
        logit_scale = student.logit_scale
        t_model: Any = self.teacher
        t_logit_scale = getattr(
            t_model, "logit_scale", None
        )  # a teacher without one: CRD says so if it needs it

        out: dict[str, Tensor] = {}
        for i in range(len(texts)):
            t_img, t_txt = (
                (teacher[0], teacher[1][i * n : (i + 1) * n]) if teacher is not None else (None, None)
            )
            terms = self.loss(
                s_img,
                s_txt[i * n : (i + 1) * n],
                logit_scale,
                t_img,
                t_txt,
                rank=rank,
                world_size=world_size,
                keep_terms=keep_terms,
                t_logit_scale=None if t_logit_scale is None else t_logit_scale.detach(),
            )
            for key, value in terms.items():
                if is_summed_over_caption_sets(key):
                    out[key] = out[key] + value if key in out else value
                else:
                    out.setdefault(key, value)  # temperatures: the same for both caption sets
            if i == 1:
                out[SYN_KEY] = terms[TOTAL_KEY].detach()
        if self.caption_sets == "mean" and len(texts) > 1:
            for key in out:
                if is_summed_over_caption_sets(key):
                    out[key] = out[key] / len(texts)
        return out


def _teacher_needed(cfg: SiclipCfg) -> bool:
    # a KD term that is on in any loss.schedule stage needs the teacher from the start
    weights = max_weights(cfg.loss)
    return cfg.teacher.enabled and any(weights[t.name] > 0 for t in TERMS if t.needs_teacher)


def build_task(cfg: SiclipCfg) -> tuple[SiclipTask, dict[str, Any]]:
    """Student (+ inheritance report), frozen teacher when a KD term is on, and the loss."""
    student, report = build_student(cfg.model)
    if not (cfg.model.inherit and cfg.model.source) or cfg.model.reset_logit_scale:
        with torch.no_grad():
            logit_scale: torch.Tensor = student.logit_scale  # type: ignore[assignment]
            logit_scale.fill_(math.log(1.0 / cfg.loss.init_temperature))
    teacher = build_teacher(cfg.teacher) if _teacher_needed(cfg) else None
    loss = build_loss(
        cfg.loss,
        student_dim=preset_info(cfg.model.name).embed_dim,
        teacher_dim=preset_info(cfg.teacher.name).embed_dim if teacher is not None else None,
    )
    info = {"inherit_report": report.summary() if report is not None else None}
    return SiclipTask(student, loss, teacher, caption_sets=cfg.loss.caption_sets), info


def _same_preprocessing(a: str, b: str) -> bool:
    ia, ib = preset_info(a), preset_info(b)
    return (ia.image_size, ia.mean, ia.std, ia.interpolation, ia.context_length) == (
        ib.image_size,
        ib.mean,
        ib.std,
        ib.interpolation,
        ib.context_length,
    )


def build_batches(
    cfg: SiclipCfg, *, rank: int, world_size: int, epoch_offset: int, with_teacher: bool
) -> Any:
    """The batches the task trains on: this rank's infinite iterator over ``data.train_shards`` (student
    inputs, plus teacher inputs where the teacher's preprocessing differs), resumed at ``epoch_offset``."""
    from siclip.data.loader import build_train_loader, shard_embeddings_usable
    from siclip.models.presets import build_tokenizer, build_transform

    teacher_inputs = with_teacher and not _same_preprocessing(cfg.model.name, cfg.teacher.name)
    urls = expand_shards(cfg.data.train_shards)
    return build_train_loader(
        urls=urls,
        batch_size=cfg.data.batch_size // world_size,
        rank=rank,
        world_size=world_size,
        transform=build_transform(cfg.model.name, train=cfg.data.augment, image_size=cfg.model.image_size),
        tokenizer=build_tokenizer(cfg.model.name),
        teacher_transform=build_transform(cfg.teacher.name, train=False) if teacher_inputs else None,
        teacher_tokenizer=build_tokenizer(cfg.teacher.name) if teacher_inputs else None,
        synthetic=cfg.data.synthetic,
        synthetic_p=cfg.data.synthetic_p,
        loader_workers=cfg.data.loader_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.train.seed,
        epoch_offset=epoch_offset,
        # Stored embeddings stand in for the teacher only when they are this teacher's (logged otherwise).
        shard_embeddings=with_teacher and shard_embeddings_usable(urls, cfg.teacher),
    )
