"""The losses' argument contracts: each error message, and settings passed through untouched.

Written to kill the mutants ``make mutate`` found surviving (benchmarks/mutation.md): a message that names the
wrong thing, or a setting silently dropped on its way into the module, changes no loss value on one worker.
"""

from __future__ import annotations

import math
import re

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
def test_build_loss_gathers_as_the_config_says(with_grad: bool) -> None:
    cfg = LossCfg(gather_with_grad=with_grad)
    assert build_loss(cfg, student_dim=D, teacher_dim=None).gather_with_grad is with_grad


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
        ValueError,
        match=r"^no loss term is active at this step: every weight is 0 \(or only KD terms and no teacher\)$",
    ):
        only_kd(s_img, s_txt, torch.tensor(1.0))


# ---- PM: messages, the k clamp, the batch of one, the underflow floor -----------------------------------


def test_pm_and_sampling_errors_name_the_problem() -> None:
    from siclip.losses.pm import PMLoss, fuse_pairs, sample_negatives

    with pytest.raises(
        ValueError, match=r"^sim must be \[n, m\] with offset \+ n <= m, got \(3, 4\), offset 2$"
    ):
        sample_negatives(torch.zeros(3, 4), k=1, mode="hard", offset=2)
    for shape in ((4,), (2, 4, 4)):  # not a matrix: the same one-line error, not an IndexError
        with pytest.raises(
            ValueError, match=rf"^sim must be \[n, m\] .*, got {re.escape(str(shape))}, offset 0$"
        ):
            sample_negatives(torch.zeros(shape), k=1, mode="hard")
    for k in (0, 4):
        with pytest.raises(ValueError, match=rf"^need 1 <= k <= m - 1 negatives per anchor \(k={k}, m=4\)$"):
            sample_negatives(torch.zeros(4, 4), k=k, mode="hard")
    with pytest.raises(ValueError, match=r"^unknown PM negatives 'soft'; allowed: hard, random$"):
        sample_negatives(torch.zeros(4, 4), k=1, mode="soft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^unknown PM negatives 'soft'; allowed: hard, random$"):
        PMLoss(4, negatives="soft")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^unknown PM fusion 'sum'; allowed: prod_absdiff, concat, prod$"):
        fuse_pairs(torch.zeros(1, 2), torch.zeros(1, 2), "sum")  # type: ignore[arg-type]


def test_all_but_the_positive_can_be_drawn_even_when_the_softmax_underflows() -> None:
    from siclip.losses.pm import sample_negatives

    n = 6
    peaked = torch.eye(n) + 0.9 * torch.roll(torch.eye(n), 2, dims=1)  # one hard negative per row
    idx = sample_negatives(
        peaked, k=n - 1, mode="hard", scale=1000.0, generator=torch.Generator().manual_seed(0)
    )
    for i, row in enumerate(idx.tolist()):
        assert row[0] == (i + 2) % n and sorted(row) == [j for j in range(n) if j != i]


def test_pm_clamps_negatives_to_the_batch_and_scores_a_batch_of_one() -> None:
    from siclip.losses.pm import PMLoss

    torch.manual_seed(0)
    big = PMLoss(D, negatives="random", per_anchor=5, hidden=0)
    small = PMLoss(D, negatives="random", per_anchor=2, hidden=0)
    small.load_state_dict(big.state_dict())
    img, txt = _unit(3, D, seed=0), _unit(3, D, seed=1)
    # a batch of 3 has 2 negatives per anchor: asking for 5 is the same as asking for 2
    got = big(img, txt, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, small(img, txt, generator=torch.Generator().manual_seed(1)))
    one = big(img[:1], txt[:1])  # no negatives: BCE of the positive pair alone, -log sigmoid(logit)
    torch.testing.assert_close(one, F.softplus(-big.pair_logits(img[:1], txt[:1]))[0])


def test_pm_draws_n_minus_1_negatives_when_asked_for_more(monkeypatch: pytest.MonkeyPatch) -> None:
    import siclip.losses.pm as pm

    seen: list[int] = []
    real = pm.sample_negatives
    monkeypatch.setattr(
        pm, "sample_negatives", lambda sim, *, k, **kw: seen.append(k) or real(sim, k=k, **kw)
    )
    pm.PMLoss(D, negatives="random", per_anchor=5)(_unit(3, D, seed=0), _unit(3, D, seed=1))
    assert seen == [2, 2]


def test_the_total_builds_what_the_config_says() -> None:
    cfg = LossCfg(
        fd_weight=0.0,
        max_logit_scale=50.0,
        pm_fusion="concat",
        pm_negatives="random",
        pm_negatives_per_anchor=3,
    )
    loss = build_loss(cfg, student_dim=D, teacher_dim=DT)
    assert loss.fd is None and loss.gather_with_grad is cfg.gather_with_grad
    assert loss.clip is not None and loss.crd is not None and loss.icl is not None and loss.pm is not None
    assert loss.clip.max_logit_scale == loss.crd.max_logit_scale == loss.icl.max_logit_scale == 50.0
    assert (loss.pm.fusion, loss.pm.negatives, loss.pm.per_anchor) == ("concat", "random", 3)
    assert loss.projector is not None  # ICL alone needs the student in the teacher's dimension
    only_fd = build_loss(LossCfg(icl_weight=0.0), student_dim=D, teacher_dim=DT)
    assert only_fd.icl is None and only_fd.projector is not None
    neither = build_loss(LossCfg(icl_weight=0.0, fd_weight=0.0), student_dim=D, teacher_dim=DT)
    assert neither.projector is None and neither.fd is None and neither.icl is None
    assert build_loss(LossCfg(fd_weight=0.5), student_dim=D, teacher_dim=DT).fd is not None  # any weight > 0
