"""``siclip.losses.schedule`` on its own: the base weights by term name, the stage that wins at a step, and
each term's largest weight over the run (what decides which terms ``WIKDLoss`` builds)."""

from __future__ import annotations

from siclip.config import LossCfg, LossStageCfg
from siclip.losses.schedule import base_weights, max_weights, weights_at

CFG = LossCfg(
    clip_weight=1.0,
    fd_weight=0.0,
    crd_weight=3.0,
    icl_weight=0.5,
    pm_weight=0.0,
    schedule=(
        LossStageCfg(from_step=10, weights={"fd": 2, "crd": 0.0}),
        LossStageCfg(from_step=20, weights={"pm": 0.25, "clip": 0.0}),
    ),
)


def test_base_weights_are_the_weight_keys_by_term() -> None:
    assert base_weights(CFG) == {"clip": 1.0, "fd": 0.0, "crd": 3.0, "icl": 0.5, "pm": 0.0}


def test_a_stage_starts_at_its_own_step_and_the_latest_one_wins() -> None:
    base = base_weights(CFG)
    assert weights_at(CFG, 9) == base
    first = weights_at(CFG, 10)
    assert first == {**base, "fd": 2.0, "crd": 0.0}
    assert type(first["fd"]) is float  # YAML integers become float weights
    assert weights_at(CFG, 20) == {**base, "pm": 0.25, "clip": 0.0}  # not stage 1's fd/crd
    assert weights_at(LossCfg(), 0) == base_weights(LossCfg())  # no schedule: the base weights


def test_max_weights_takes_every_stage_and_the_base() -> None:
    # fd and pm only come on in a stage, crd and clip only before one: all count
    assert max_weights(CFG) == {"clip": 1.0, "fd": 2.0, "crd": 3.0, "icl": 0.5, "pm": 0.25}
    assert max_weights(LossCfg(fd_weight=0.0, pm_weight=0.0)) == {
        **base_weights(LossCfg(fd_weight=0.0, pm_weight=0.0))
    }
