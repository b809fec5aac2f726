"""Per-term gradient norms: against one-term-at-a-time references, free of side effects, and in the loop."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siclip.config import LossCfg
from siclip.losses.terms import TERM_NAMES as TERMS
from siclip.losses.total import build_loss
from siclip.train.grad_share import GradShare, term_gradient_norms
from tests.loop_fixtures import TwoTermTask, run

D_IN, D = 6, 8


class ToyStudent(nn.Module):
    """Two linear towers after a BatchNorm (running statistics a careless extra forward would change)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(D_IN)
        self.img = nn.Linear(D_IN, D)
        self.txt = nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.loss = loss

    def forward(self, batch: dict[str, Tensor], *, keep_terms: bool = False) -> dict[str, Tensor]:
        img = F.normalize(self.img(self.bn(batch["x"])), dim=-1)
        txt = F.normalize(self.txt(batch["y"]), dim=-1)
        return self.loss(img, txt, self.logit_scale, batch["t_img"], batch["t_txt"], keep_terms=keep_terms)


def toy_batch(n: int = 12, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    return {
        "x": x,
        "y": x + 0.3 * torch.randn(n, D_IN, generator=g),
        "t_img": F.normalize(torch.randn(n, D, generator=g), dim=-1),
        "t_txt": F.normalize(torch.randn(n, D, generator=g), dim=-1),
    }


CFG = LossCfg(pm_head="linear", pm_hidden=4)


def towers(model: ToyStudent) -> list[nn.Parameter]:
    return [*model.img.parameters(), *model.txt.parameters(), model.logit_scale]


def test_norms_match_one_term_at_a_time_references() -> None:
    torch.manual_seed(0)
    model = ToyStudent(build_loss(CFG, student_dim=D, teacher_dim=D))
    batch = toy_batch()
    torch.manual_seed(5)  # PM's negatives come from the global RNG; the reference replays the same draw
    got = term_gradient_norms(model, batch, towers(model))
    expected = {}
    for term in TERMS:
        weights = {f"{t}_weight": (getattr(CFG, f"{t}_weight") if t == term else 0.0) for t in TERMS}
        single = ToyStudent(build_loss(replace(CFG, **weights), student_dim=D, teacher_dim=D))
        single.load_state_dict(model.state_dict(), strict=False)  # same towers; the PM head when kept
        torch.manual_seed(5)
        loss = single(batch)["loss"]
        grads = torch.autograd.grad(loss, towers(single), allow_unused=True)
        expected[term] = math.sqrt(sum(float((g**2).sum()) for g in grads if g is not None))
    assert set(got) == {f"grad/{t}" for t in TERMS} | {f"grad_share/{t}" for t in TERMS}
    for term in TERMS:
        assert got[f"grad/{term}"] == pytest.approx(expected[term], rel=1e-5, abs=1e-9)
        assert got[f"grad_share/{term}"] == pytest.approx(expected[term] / sum(expected.values()), rel=1e-5)
    assert sum(got[f"grad_share/{t}"] for t in TERMS) == pytest.approx(1.0)


def test_no_side_effects_on_grads_buffers_or_rng() -> None:
    torch.manual_seed(0)
    model = ToyStudent(build_loss(CFG, student_dim=D, teacher_dim=D))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    term_gradient_norms(model, toy_batch(), towers(model))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # incl. BN running stats
    assert torch.equal(rng, torch.get_rng_state())


def test_a_model_without_terms_is_an_error() -> None:
    lin = nn.Linear(2, 1)

    class Plain(nn.Module):
        def forward(self, batch: dict[str, Tensor], *, keep_terms: bool = False) -> dict[str, Tensor]:
            return {"loss": lin(batch["x"]).sum()}

    with pytest.raises(ValueError, match="term/<name>"):
        term_gradient_norms(Plain(), {"x": torch.ones(3, 2)}, list(lin.parameters()))


def _train(share_every: int) -> tuple[TwoTermTask, list[dict[str, float]]]:
    torch.manual_seed(0)
    task = TwoTermTask()
    share = GradShare(every=share_every, model=task, params=list(task.parameters())) if share_every else None
    _, logs = run(task, 30, grad_share=share)
    return task, [m for _, m in logs]


def test_the_loop_logs_shares_without_changing_the_trajectory() -> None:
    plain, plain_logs = _train(0)
    shared, shared_logs = _train(10)
    for a, b in zip(plain.state_dict().values(), shared.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert all("grad_share/fit" not in m for m in plain_logs)
    assert len(shared_logs) == 3
    for m in shared_logs:
        assert m["grad_share/fit"] + m["grad_share/small"] == pytest.approx(1.0)
        assert m["grad_share/fit"] > m["grad_share/small"] and m["grad/fit"] > 0
