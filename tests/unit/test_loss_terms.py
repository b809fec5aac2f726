"""The table of loss terms (``siclip.losses.terms``) agrees with what the config accepts and what the loss
computes and logs: one weight key per term, KD terms only with a teacher, a metric name per term."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from siclip.config import ConfigError, LossCfg, LossStageCfg
from siclip.losses.terms import TERM_NAMES, TERMS, metric_name, term
from siclip.losses.total import build_loss

D = 6


def _unit(n: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_every_weight_key_of_the_config_is_one_term() -> None:
    weight_fields = [f.name for f in dataclasses.fields(LossCfg) if f.name.endswith("_weight")]
    assert [t.weight_key for t in TERMS] == weight_fields
    assert len(set(TERM_NAMES)) == len(TERMS)


def test_a_schedule_accepts_every_term_and_names_them_when_it_rejects_one() -> None:
    LossCfg(schedule=(LossStageCfg(from_step=0, weights={name: 0.5 for name in TERM_NAMES}),))
    with pytest.raises(ConfigError) as info:
        LossCfg(schedule=(LossStageCfg(from_step=0, weights={"kd": 1.0}),))
    assert "kd" in str(info.value) and all(name in str(info.value) for name in TERM_NAMES)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_the_loss_computes_each_term_the_table_allows_and_logs_it_under_its_metric(
    with_teacher: bool,
) -> None:
    loss = build_loss(LossCfg(), student_dim=D, teacher_dim=D if with_teacher else None)
    teacher = (_unit(4, 2), _unit(4, 3)) if with_teacher else ()
    out = loss(_unit(4, 0), _unit(4, 1), torch.tensor(math.log(10.0)), *teacher)
    expected = {t.output_key for t in TERMS if with_teacher or not t.needs_teacher}
    assert {k for k in out if k.endswith("_loss")} == expected
    assert {metric_name(k) for k in expected} == {t.metric for t in TERMS if t.output_key in expected}
    assert metric_name("loss") == "loss/total" and metric_name("syn_loss") == "loss/syn"
    assert metric_name("temp/clip") == "temp/clip"


def test_each_terms_factory_builds_the_module_the_loss_holds() -> None:
    loss = build_loss(LossCfg(), student_dim=D, teacher_dim=D)
    for t in TERMS:
        assert type(t.build(LossCfg(), D)) is type(getattr(loss, t.name))


def test_an_unknown_term_is_named() -> None:
    assert term("crd").needs_teacher and not term("clip").needs_teacher
    with pytest.raises(KeyError, match="nope"):
        term("nope")
