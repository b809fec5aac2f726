"""Staged loss weights (``loss.schedule``): the weight of every term as a pure function of the global step.

A run switches terms on and off by step range (the authors ran FD + CRD + ICL, then CRD alone). Because the
weights depend only on the optimizer step, a resumed run picks up the stage its checkpoint was in.
"""

from __future__ import annotations

from siclip.config import LossCfg
from siclip.losses.terms import TERMS

__all__ = ["base_weights", "max_weights", "weights_at"]


def base_weights(cfg: LossCfg) -> dict[str, float]:
    """The ``*_weight`` keys, by term name."""
    return {t.name: getattr(cfg, t.weight_key) for t in TERMS}


def weights_at(cfg: LossCfg, step: int) -> dict[str, float]:
    """The weights for optimizer step ``step`` (0-based): the base weights, overridden by the last stage
    whose ``from_step <= step`` (stages do not accumulate)."""
    weights = base_weights(cfg)
    active = [s for s in cfg.schedule if s.from_step <= step]
    if active:
        stage = max(active, key=lambda s: s.from_step)
        weights.update({name: float(w) for name, w in stage.weights.items()})
    return weights


def max_weights(cfg: LossCfg) -> dict[str, float]:
    """Each term's largest weight over the whole run: a term is built when this is above 0."""
    stages = [base_weights(cfg)] + [weights_at(cfg, s.from_step) for s in cfg.schedule]
    return {name: max(w[name] for w in stages) for name in stages[0]}
