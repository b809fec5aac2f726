"""PM's heads. The cosine head (the default): logits ``scale * cos + bias`` against a naive loop, its bias,
its pull. Each row pair's matching logit (``pair_logits``, what evaluation and the batch-of-one branch read):
the scaled cosine plus the learnt bias, or the linear head's raw output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from siclip.config import LossCfg
from siclip.losses.pm import PMLoss, sample_negatives
from siclip.losses.total import build_loss

B, D = 6, 5
torch.set_num_threads(1)


def _unit(seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)


def _ref_bce(logit: float, y: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _ref_cos(a: Tensor, b: Tensor) -> float:
    return float(sum(a[i] * b[i] for i in range(len(a))) / (a.norm() * b.norm()))


@pytest.mark.parametrize("per_anchor", [1, 2])
def test_cosine_pm_matches_reference(per_anchor: int) -> None:
    img, txt = _unit(0) * 3.0, _unit(1)  # not unit length: the head takes the cosine itself
    pm = PMLoss(D, head="cosine", per_anchor=per_anchor).double()
    assert pm.head is None and not bool(pm.bias_set)
    scale = 12.0
    got = pm(img, txt, scale=scale, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sim = img @ txt.T
    neg_txt = sample_negatives(sim, k=per_anchor, mode="hard", scale=scale, generator=g)
    neg_img = sample_negatives(sim.T, k=per_anchor, mode="hard", scale=scale, generator=g)
    pos = [(i, i) for i in range(B)]
    neg = [(i, int(j)) for i in range(B) for j in neg_txt[i]] + [
        (int(j), i) for i in range(B) for j in neg_img[i]
    ]
    raw_pos = [scale * _ref_cos(img[a], txt[b]) for a, b in pos]
    raw_neg = [scale * _ref_cos(img[a], txt[b]) for a, b in neg]
    bias = -0.5 * (sum(raw_pos) / len(raw_pos) + sum(raw_neg) / len(raw_neg))  # first batch: centred
    terms = [_ref_bce(x + bias, 1.0) for x in raw_pos] + [_ref_bce(x + bias, 0.0) for x in raw_neg]
    assert float(got.detach()) == pytest.approx(sum(terms) / len(terms), rel=1e-9)
    assert float(pm.bias) == pytest.approx(bias, rel=1e-9) and bool(pm.bias_set)
    with torch.no_grad():
        pm.bias.fill_(0.25)  # set once: later batches use the learnt bias as it is
    again = pm(img, txt, scale=scale, generator=torch.Generator().manual_seed(3))
    terms = [_ref_bce(x + 0.25, 1.0) for x in raw_pos] + [_ref_bce(x + 0.25, 0.0) for x in raw_neg]
    assert float(again.detach()) == pytest.approx(sum(terms) / len(terms), rel=1e-9)


def test_bias_survives_a_checkpoint() -> None:
    pm = PMLoss(D, head="cosine")
    pm(_unit(0).float(), _unit(1).float(), scale=10.0)
    fresh = PMLoss(D, head="cosine")
    fresh.load_state_dict(pm.state_dict())
    assert bool(fresh.bias_set) and float(fresh.bias) == float(pm.bias) != 0.0
    fresh(_unit(2).float(), _unit(3).float(), scale=10.0)
    assert float(fresh.bias) == float(pm.bias)  # not re-centred on the resumed run's first batch


def test_cosine_pm_pulls_on_the_embeddings_far_more_than_the_linear_head() -> None:
    torch.manual_seed(0)
    norms = {}
    for head in ("cosine", "linear"):
        img, txt = _unit(0).float().requires_grad_(), _unit(1).float().requires_grad_()
        pm = PMLoss(D, head=head)  # type: ignore[arg-type]
        pm(img, txt, scale=14.3, generator=torch.Generator().manual_seed(0)).backward()
        assert img.grad is not None and txt.grad is not None
        norms[head] = float(torch.cat([img.grad, txt.grad]).norm())
    assert norms["cosine"] > 3 * norms["linear"]


def test_cosine_pm_alone_learns_to_match_pairs() -> None:
    """Embeddings trained by PM alone: matching pairs end up more similar than any non-matching pair."""
    torch.manual_seed(0)
    img = torch.nn.Parameter(torch.randn(B, D))
    txt = torch.nn.Parameter(torch.randn(B, D))
    pm = PMLoss(D, head="cosine", negatives="hard", per_anchor=2)
    opt = torch.optim.Adam([img, txt, *pm.parameters()], lr=0.05)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        loss = pm(F.normalize(img, dim=1), F.normalize(txt, dim=1), scale=10.0, generator=gen)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sim = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    assert float(loss) < 0.3 * first
    assert torch.equal(sim.argmax(dim=1), torch.arange(B)) and torch.equal(sim.argmax(dim=0), torch.arange(B))


def test_config_default_is_cosine_and_linear_stays_available() -> None:
    assert LossCfg().pm_head == "cosine"
    default = build_loss(LossCfg(), student_dim=D, teacher_dim=None)
    linear = build_loss(LossCfg(pm_head="linear"), student_dim=D, teacher_dim=None)
    assert default.pm is not None and default.pm.head is None
    assert linear.pm is not None and isinstance(linear.pm.head, torch.nn.Linear)
    with pytest.raises(ValueError, match="unknown PM head"):
        PMLoss(D, head="bilinear")  # type: ignore[arg-type]


def _pairs(n: int = 4, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(21)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * 3.0, torch.randn(
        n, d, generator=g, dtype=torch.float64
    )


def test_cosine_pair_logits_are_the_scaled_cosine_plus_the_learnt_bias() -> None:
    img, txt = _pairs()
    pm = PMLoss(3, head="cosine").double()
    with torch.no_grad():
        pm.bias.fill_(0.3)
    cos = torch.stack([(a @ b) / (a.norm() * b.norm()) for a, b in zip(img, txt, strict=True)])
    torch.testing.assert_close(pm.pair_logits(img, txt, 7.0), 7.0 * cos + 0.3, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pm.pair_logits(img, txt), cos + 0.3, rtol=1e-12, atol=1e-12)  # scale 1


def test_linear_pair_logits_are_the_head_output() -> None:
    img, txt = _pairs()
    pm = PMLoss(3, head="linear", fusion="concat").double()
    lin = pm.head
    assert isinstance(lin, torch.nn.Linear)
    want = torch.cat([img, txt], dim=-1) @ lin.weight[0] + lin.bias[0]
    torch.testing.assert_close(pm.pair_logits(img, txt, 7.0), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("head", ["cosine", "linear"])
def test_a_batch_of_one_scores_only_its_positive(head: str) -> None:
    img, txt = _pairs(1)
    pm = PMLoss(3, head=head).double()  # type: ignore[arg-type]
    if head == "cosine":
        with torch.no_grad():
            pm.bias.fill_(-0.4)
    logit = pm.pair_logits(img, txt, 5.0)
    got = pm(img, txt, scale=5.0)
    assert float(got.detach()) == pytest.approx(float(F.softplus(-logit).mean().detach()), rel=1e-12)
