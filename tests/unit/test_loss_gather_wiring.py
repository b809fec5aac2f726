"""Which terms of ``WIKDLoss`` see the global batch, in one process (no process group).

``gather_features`` is replaced by a stand-in for rank ``RANK`` of 2 whose other rank holds fixed embeddings
(the negated local ones); the real collectives are tested with gloo in test_gather. Then CLIP, CRD, ICL
and PM must equal the one-worker loss on the concatenated batch, FD the one-worker loss on the local batch,
and with ``loss.gather=false`` everything stays local. Each term-weight combination below switches the
gather on through a different term, so a wrong condition for "does this step need the global batch" fails.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import siclip.losses.pm as pm_module
import siclip.losses.total as total_module
from siclip.config import LossCfg
from siclip.losses.total import WIKDLoss

B, DS, DT, RANK, WS = 4, 6, 5, 1, 2
BASE = LossCfg(
    clip_weight=1.0,
    fd_weight=3.0,
    crd_weight=1.0,
    icl_weight=1.0,
    pm_weight=0.5,
    pm_negatives="hard",
    pm_negatives_per_anchor=2,
    gather=True,
    gather_with_grad=False,
)


def _other(x: Tensor) -> Tensor:
    return -x.detach()  # the other rank's rows: pairs stay aligned, every row differs from the local ones


def _global(x: Tensor) -> Tensor:
    parts = [_other(x)] * WS
    parts[RANK] = x
    return torch.cat(parts)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, bool]]:
    seen: list[tuple[int, int, bool]] = []

    def fake_gather(x: Tensor, *, rank: int, world_size: int, with_grad: bool = False) -> Tensor:
        if world_size == 1:
            return x
        assert (rank, world_size) == (RANK, WS)
        seen.append((rank, world_size, with_grad))
        return _global(x)

    def fake_broadcast(x: Tensor, *, world_size: int) -> Tensor:
        assert world_size in (1, WS)
        if world_size == WS:
            seen.append((-1, world_size, False))  # PM's draw is shared across ranks
        return x

    monkeypatch.setattr(total_module, "gather_features", fake_gather)
    monkeypatch.setattr(pm_module, "broadcast_from_rank0", fake_broadcast)
    return seen


def _inputs(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s_img, s_txt = (F.normalize(torch.randn(B, DS, generator=g), dim=-1) for _ in range(2))
    t_img, t_txt = (F.normalize(torch.randn(B, DT, generator=g), dim=-1) for _ in range(2))
    return s_img, s_txt, torch.tensor(math.log(12.0)), t_img, t_txt


def _terms(out: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in out.items() if k.endswith("_loss")}


CASES = {
    "all terms": {},
    "KD only, through CRD": {"clip_weight": 0.0, "pm_weight": 0.0, "icl_weight": 0.0},
    "KD only, through ICL": {"clip_weight": 0.0, "pm_weight": 0.0, "crd_weight": 0.0},
    "PM only of the contrastive pair": {"clip_weight": 0.0},
    "with gather_with_grad": {"gather_with_grad": True},
}


def _on_rank(loss: WIKDLoss, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The loss as rank ``RANK`` of ``WS`` computes it (the gather is patched by the ``calls`` fixture)."""
    return loss(*inputs, rank=RANK, world_size=WS, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("case", CASES)
def test_global_terms_see_the_concatenated_batch_and_fd_the_local_one(case: str, calls: list) -> None:
    cfg = replace(BASE, **CASES[case])
    torch.manual_seed(0)
    loss = WIKDLoss(cfg, student_dim=DS, teacher_dim=DT)
    s_img, s_txt, scale, t_img, t_txt = _inputs()
    got = _terms(_on_rank(loss, s_img, s_txt, scale, t_img, t_txt))
    assert calls and all(c[2] == cfg.gather_with_grad for c in calls if c[0] >= 0)
    if cfg.pm_weight > 0:
        assert any(c[0] == -1 for c in calls)
    on_global = _terms(
        loss(
            *(_global(x) for x in (s_img, s_txt)),
            scale,
            *(_global(x) for x in (t_img, t_txt)),
            generator=torch.Generator().manual_seed(3),
        )
    )
    on_local = _terms(loss(s_img, s_txt, scale, t_img, t_txt, generator=torch.Generator().manual_seed(3)))
    assert got.keys() == on_global.keys()
    for name, value in got.items():
        want = on_local[name] if name == "fd_loss" else on_global[name]
        assert value == pytest.approx(want, rel=1e-6), name
        if name != "fd_loss":
            assert value != pytest.approx(on_local[name], rel=1e-3), (
                f"{name}: the global batch made no difference"
            )


def test_without_a_teacher_clip_and_pm_still_gather(calls: list) -> None:
    torch.manual_seed(0)
    loss = WIKDLoss(BASE, student_dim=DS, teacher_dim=DT)
    s_img, s_txt, scale, _, _ = _inputs()
    got = _terms(
        loss(s_img, s_txt, scale, rank=RANK, world_size=WS, generator=torch.Generator().manual_seed(3))
    )
    want = _terms(loss(_global(s_img), _global(s_txt), scale, generator=torch.Generator().manual_seed(3)))
    assert got.keys() == {"clip_loss", "pm_loss"} and got == pytest.approx(want, rel=1e-6)


def test_gather_off_keeps_every_term_local(calls: list) -> None:
    cfg = replace(BASE, gather=False)
    torch.manual_seed(0)
    loss = WIKDLoss(cfg, student_dim=DS, teacher_dim=DT)
    s_img, s_txt, scale, t_img, t_txt = _inputs()
    got = _terms(_on_rank(loss, s_img, s_txt, scale, t_img, t_txt))
    want = _terms(loss(s_img, s_txt, scale, t_img, t_txt, generator=torch.Generator().manual_seed(3)))
    assert calls == [] and got == pytest.approx(want, rel=1e-6)
