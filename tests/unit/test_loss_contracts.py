"""The losses' argument contracts: each error message, and settings passed through untouched.

Written to kill the mutants ``make mutate`` found surviving (benchmarks/mutation.md): a message that names the
wrong thing, or a setting silently dropped on its way into the module, changes no loss value on one worker.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from siclip.config import LossCfg
from siclip.losses.total import build_loss

B, D, DT = 4, 6, 5


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_total_loss_argument_errors_name_the_problem() -> None:
    loss = build_loss(LossCfg(), student_dim=D, teacher_dim=DT)
    s_img, s_txt, t = _unit(B, D, seed=0), _unit(B, D, seed=1), _unit(B, DT, seed=2)
    scale = torch.tensor(math.log(10.0))
    with pytest.raises(ValueError, match=r"^pass both teacher embeddings or neither$"):
        loss(s_img, s_txt, scale, t, None)
    with pytest.raises(ValueError, match=r"^pass both teacher embeddings or neither$"):
        loss(s_img, s_txt, scale, None, t)
    with pytest.raises(ValueError, match=r"^teacher dim 7 != teacher_dim 5 the loss was built for$"):
        loss(s_img, s_txt, scale, _unit(B, 7, seed=3), _unit(B, 7, seed=4))
    no_teacher = build_loss(LossCfg(), student_dim=D, teacher_dim=None)
    with pytest.raises(
        ValueError, match=r"^teacher embeddings given, but the loss was built with teacher_dim=None$"
    ):
        no_teacher(s_img, s_txt, scale, t, t)


@pytest.mark.parametrize("with_grad", [False, True])
def test_build_loss_passes_gather_with_grad_through(with_grad: bool) -> None:
    assert (
        build_loss(LossCfg(), student_dim=D, teacher_dim=None, gather_with_grad=with_grad).gather_with_grad
        is with_grad
    )
    assert build_loss(LossCfg(), student_dim=D, teacher_dim=None).gather_with_grad is False


def test_fd_compares_the_last_dimension_of_any_rank() -> None:
    from siclip.losses.fd import FDLoss

    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)  # per-token embeddings: dim 1 is not the width
    torch.testing.assert_close(FDLoss()(s, s, t, t), 2 * ((s - t) ** 2).mean())
    with pytest.raises(ValueError, match=r"^FD needs equal dims \(student 5, teacher 4\)$"):
        FDLoss()(s, s, torch.randn(2, 3, 4), torch.randn(2, 3, 4))


def test_projector_normalises_the_last_dimension_of_any_rank() -> None:
    from siclip.losses.fd import EmbedProjector

    proj = EmbedProjector(D, DT)
    assert proj.image.bias is None and proj.text.bias is None  # a linear map: zero stays zero
    img, txt = proj(torch.randn(2, 3, D), torch.randn(2, 3, D))
    for out in (img, txt):
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(2, 3))


def test_no_active_term_message() -> None:
    s_img, s_txt = _unit(B, D, seed=0), _unit(B, D, seed=1)
    only_kd = build_loss(LossCfg(clip_weight=0.0, pm_weight=0.0), student_dim=D, teacher_dim=D)
    with pytest.raises(
        ValueError, match=r"^no loss term is active: every weight is 0 \(or only KD terms and no teacher\)$"
    ):
        only_kd(s_img, s_txt, torch.tensor(1.0))
