"""The one table of loss terms: what each term is called, how it is built, what it needs, how it is logged.

Every place that enumerates the terms reads :data:`TERMS`: the schedule (:mod:`siclip.losses.schedule`, the
base weights by ``weight_key``), the total (:class:`~siclip.losses.total.WIKDLoss`, which builds each term
with ``build``), the task (which output keys are summed over the caption sets), the loop (metric names) and
the worker (whether a teacher is loaded). The config schema has one ``<name>_weight`` field per term in
:class:`~siclip.config.LossCfg` and checks ``loss.schedule``'s term names against those fields (it stays
free of torch, so it does not import this module); a test holds the two together.

Output keys of the loss (:meth:`WIKDLoss.forward`): ``loss`` (the weighted total), ``<name>_loss`` per
computed term, ``term/<name>`` (weighted, with its graph, on request) and ``temp/*``; the task adds
``syn_loss`` (the synthetic-caption set's total). :func:`metric_name` maps them to logged metric names.

Ray-free: nothing here or in the loss modules imports Ray.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from siclip.config import LossCfg
from siclip.losses.clip import ClipLoss
from siclip.losses.crd import CRDLoss
from siclip.losses.fd import FDLoss
from siclip.losses.icl import ICLLoss
from siclip.losses.pm import PMLoss

__all__ = [
    "LOSS_SUFFIX",
    "SYN_KEY",
    "TERMS",
    "TERM_NAMES",
    "TOTAL_KEY",
    "WEIGHTED_PREFIX",
    "LossTerm",
    "is_summed_over_caption_sets",
    "metric_name",
    "term",
]

TOTAL_KEY = "loss"
"""The loss output holding the weighted total (the one with gradient)."""
SYN_KEY = "syn_loss"
"""The task's output: the synthetic-caption set's total, detached (logged, never summed or averaged)."""
LOSS_SUFFIX = "_loss"
"""A computed term ``<name>`` is output as ``<name>_loss`` (detached)."""
WEIGHTED_PREFIX = "term/"
"""``term/<name>``: the weighted term with its graph (``keep_terms=True``, for per-term gradients)."""


@dataclass(frozen=True)
class LossTerm:
    """One loss term: its name, its module factory and what it needs."""

    name: str
    build: Callable[[LossCfg, int], nn.Module]
    """``build(cfg, student_dim)``: the term's module (called only when its weight is above 0 at some step)."""
    needs_teacher: bool
    """A knowledge-distillation term: computed only with teacher embeddings (built only with a teacher)."""
    gathered: bool
    """Sees the global batch (all ranks' embeddings) with ``loss.gather``; otherwise stays local."""

    @property
    def weight_key(self) -> str:
        """The :class:`~siclip.config.LossCfg` field holding its base weight."""
        return f"{self.name}_weight"

    @property
    def output_key(self) -> str:
        """Its key in the loss's output (the detached value)."""
        return f"{self.name}{LOSS_SUFFIX}"

    @property
    def metric(self) -> str:
        """Its logged metric name."""
        return metric_name(self.output_key)


def _clip(cfg: LossCfg, student_dim: int) -> nn.Module:
    return ClipLoss(max_logit_scale=cfg.max_logit_scale)


def _fd(cfg: LossCfg, student_dim: int) -> nn.Module:
    return FDLoss(cfg.fd_reference_dim)


def _crd(cfg: LossCfg, student_dim: int) -> nn.Module:
    return CRDLoss(
        student_temperature=cfg.crd_student_temperature,
        teacher_temperature=cfg.crd_teacher_temperature,
        # with the CLIP logit scale as the student's, CRD's own temperature would be an unused parameter
        learnable=cfg.learn_temperatures and cfg.crd_student_scale == "own",
        max_logit_scale=cfg.max_logit_scale,
    )


def _icl(cfg: LossCfg, student_dim: int) -> nn.Module:
    return ICLLoss(
        temperature=cfg.icl_temperature,
        learnable=cfg.learn_temperatures,
        max_logit_scale=cfg.max_logit_scale,
        raw=cfg.icl_scale == "raw",
    )


def _pm(cfg: LossCfg, student_dim: int) -> nn.Module:
    return PMLoss(
        student_dim,
        head=cfg.pm_head,
        fusion=cfg.pm_fusion,
        negatives=cfg.pm_negatives,
        per_anchor=cfg.pm_negatives_per_anchor,
        hidden=cfg.pm_hidden,
    )


TERMS: tuple[LossTerm, ...] = (
    LossTerm("clip", _clip, needs_teacher=False, gathered=True),
    LossTerm("fd", _fd, needs_teacher=True, gathered=False),
    LossTerm("crd", _crd, needs_teacher=True, gathered=True),
    LossTerm("icl", _icl, needs_teacher=True, gathered=True),
    LossTerm("pm", _pm, needs_teacher=False, gathered=True),
)
"""Every loss term, in the order the config lists their weights."""

TERM_NAMES: tuple[str, ...] = tuple(t.name for t in TERMS)
_BY_NAME = {t.name: t for t in TERMS}
_OUTPUT_KEYS = frozenset(t.output_key for t in TERMS)


def term(name: str) -> LossTerm:
    """The term called ``name``; a KeyError naming the allowed names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown loss term {name!r}; allowed: {', '.join(TERM_NAMES)}") from None


def is_summed_over_caption_sets(key: str) -> bool:
    """Whether a loss output adds up over the real and synthetic caption sets: the total, each term's value
    and each weighted term (temperatures are the same for both sets and are not)."""
    return key == TOTAL_KEY or key in _OUTPUT_KEYS or key.startswith(WEIGHTED_PREFIX)


def metric_name(key: str) -> str:
    """The logged name of a task output: ``loss`` -> ``loss/total``, ``<x>_loss`` -> ``loss/<x>`` (every term,
    and the task's ``syn_loss`` -> ``loss/syn``), anything else unchanged."""
    if key == TOTAL_KEY:
        return "loss/total"
    if key.endswith(LOSS_SUFFIX):
        return "loss/" + key.removesuffix(LOSS_SUFFIX)
    return key
