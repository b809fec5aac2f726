"""The loss modules' documented defaults (docs/method.md: temperatures 0.07, logit scale clamped at 100, PM's hard
negatives at scale 1 unless the caller passes the CLIP scale), and that a built term whose scheduled weight is 0
is neither computed nor reported."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from siclip.config import LossCfg, LossStageCfg
from siclip.losses.crd import CRDLoss
from siclip.losses.icl import ICLLoss
from siclip.losses.pm import PMLoss, sample_negatives
from siclip.losses.total import WIKDLoss, build_loss

torch.set_num_threads(1)


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_crd_defaults_are_temperature_0_07_and_a_clamp_at_100() -> None:
    crd = CRDLoss()
    assert crd.teacher_scale == pytest.approx(1 / 0.07)
    assert crd.student_scale().item() == pytest.approx(1 / 0.07)
    hot = CRDLoss(student_temperature=1e-3)  # 1000 before the clamp
    assert hot.student_scale().item() == pytest.approx(100.0)


def test_icl_default_clamp_is_100() -> None:
    assert ICLLoss().scale().item() == pytest.approx(1 / 0.07)
    assert ICLLoss(temperature=1e-3).scale().item() == pytest.approx(100.0)


def test_hard_negatives_default_to_scale_1() -> None:
    sim = _unit(6, 4, 0) @ _unit(6, 4, 1).T * 5.0  # spread so that scale 1 and 2 draw differently

    def draw(scale: float | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        if scale is None:  # the default
            return torch.stack([sample_negatives(sim, k=3, mode="hard", generator=g) for _ in range(20)])
        return torch.stack(
            [sample_negatives(sim, k=3, mode="hard", scale=scale, generator=g) for _ in range(20)]
        )

    assert torch.equal(draw(), draw(scale=1.0))
    assert not torch.equal(draw(), draw(scale=2.0))


def test_pm_loss_default_scale_is_1() -> None:
    img, txt = _unit(5, 4, 2), _unit(5, 4, 3)
    pm = PMLoss(4, head="cosine", per_anchor=2)

    def value(**scale: float) -> float:
        return copy.deepcopy(pm)(img, txt, generator=torch.Generator().manual_seed(1), **scale).item()

    assert value() == value(scale=1.0)
    assert value() != pytest.approx(value(scale=2.0))


def test_a_term_scheduled_off_is_not_computed_or_reported() -> None:
    cfg = LossCfg(
        fd_weight=0.0,
        icl_weight=0.0,
        pm_weight=0.0,
        crd_weight=1.0,
        schedule=(LossStageCfg(from_step=10, weights={"crd": 0.0}),),
    )
    loss = build_loss(cfg, student_dim=4, teacher_dim=4)
    assert loss.crd is not None  # built: on before step 10
    args = (_unit(5, 4, 0), _unit(5, 4, 1), torch.tensor(math.log(10.0)), _unit(5, 4, 2), _unit(5, 4, 3))
    assert {"clip_loss", "crd_loss"} <= set(loss(*args))
    loss.set_step(10)
    out = loss(*args, keep_terms=True)
    assert "crd_loss" not in out and "term/crd" not in out
    assert float(out["loss"]) == pytest.approx(float(out["clip_loss"]))


def test_a_new_loss_uses_the_step_0_weights_and_the_configs_gather_mode() -> None:
    cfg = LossCfg(crd_weight=1.0, schedule=(LossStageCfg(from_step=1, weights={"crd": 3.0}),))
    loss = WIKDLoss(cfg, student_dim=4, teacher_dim=4)
    assert loss.weights["crd"] == 1.0 and loss.gather_with_grad is cfg.gather_with_grad
