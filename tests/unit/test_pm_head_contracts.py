"""``PMLoss.pair_logits``: each row pair's matching logit as evaluation and the batch-of-one branch read it:
``scale * cos + bias`` for the cosine head (the learnt bias included, scale 1 by default), the raw head output
for the linear head (no bias parameter there)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from siclip.losses.pm import PMLoss

torch.set_num_threads(1)


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
    assert pm.head is not None and not hasattr(pm, "bias")
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
