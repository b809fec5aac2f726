"""Which terms of ``WIKDLoss`` see the global batch, and ``loss.local``, in one process (no process group).

``gather_features`` is replaced by a stand-in for rank ``RANK`` of 2 whose other rank holds fixed embeddings
(the negated local ones); the real collectives are tested with gloo in test_gather. Then CLIP, CRD, ICL
and PM must equal the one-worker loss on the concatenated batch, FD the one-worker loss on the local batch,
and with ``loss.gather=false`` everything stays local. Each term-weight combination below switches the
gather on through a different term, so a wrong condition for "does this step need the global batch" fails.

``loss.local`` (each rank computes only its rows of the global matrices) uses a second stand-in in which every
rank sees the same fixed global batch, so ranks can be compared: the rank-mean of every local CLIP/CRD/ICL
value is the one-worker value while the ranks' shares differ; the student's gradient through the gathered
terms is the naive local loss's gradient (scaled by ``1/WS`` without ``gather_with_grad``) while FD's is
never rescaled; on one worker it is the plain loss; and PM's local rows (offset draws, anchors, centred
cosine bias) match a naive loop.
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
from siclip.config import ConfigError, LossCfg
from siclip.losses.pm import PMLoss, sample_negatives
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


# ------------------------------------------------------------------------------ loss.local
LOCAL = LossCfg(
    clip_weight=1.0,
    fd_weight=0.0,
    crd_weight=1.0,
    icl_weight=1.0,
    pm_weight=0.0,
    gather=True,
    gather_with_grad=False,
    local=True,
)
_SHARED: dict[str, dict[str, Tensor]] = {}


def _global_batch(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s_img, s_txt = (F.normalize(torch.randn(WS * B, DS, generator=g), dim=-1) for _ in "ab")
    t_img, t_txt = (F.normalize(torch.randn(WS * B, DT, generator=g), dim=-1) for _ in "ab")
    return {"s_img": s_img, "s_txt": s_txt, "t_img": t_img, "t_txt": t_txt}


def _is_slice(full: Tensor, x: Tensor, rank: int) -> bool:
    return torch.equal(full[rank * B : (rank + 1) * B].detach(), x.detach())


@pytest.fixture
def shared_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-in gather for any rank: the global batch of ``_on_local_rank``, with this rank's live slice."""

    def fake_gather(x: Tensor, *, rank: int, world_size: int, with_grad: bool = False) -> Tensor:
        if world_size == 1:
            return x
        full = next(
            v for v in _SHARED["batch"].values() if v.shape[-1] == x.shape[-1] and _is_slice(v, x, rank)
        )
        parts = list(full.detach().split(B))
        parts[rank] = x
        return torch.cat(parts)

    monkeypatch.setattr(total_module, "gather_features", fake_gather)


def _build(cfg: LossCfg, teacher_dim: int) -> WIKDLoss:
    torch.manual_seed(0)  # the same projector weights in every instance
    return WIKDLoss(cfg, student_dim=DS, teacher_dim=teacher_dim)


def _on_local_rank(
    loss: WIKDLoss, batch: dict[str, Tensor], rank: int, *, teacher: bool = True
) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    _SHARED["batch"] = batch
    rows = slice(rank * B, (rank + 1) * B)
    s_img = batch["s_img"][rows].clone().requires_grad_(True)
    s_txt = batch["s_txt"][rows].clone().requires_grad_(True)
    t = (batch["t_img"][rows], batch["t_txt"][rows]) if teacher else (None, None)
    out = loss(
        s_img,
        s_txt,
        torch.tensor(math.log(10.0)),
        *t,
        rank=rank,
        world_size=WS,
        generator=torch.Generator().manual_seed(5),
        keep_terms=True,
    )
    return out, s_img, s_txt


def _naive_local_clip(img: Tensor, txt: Tensor, scale: float, rank: int) -> Tensor:
    """This rank's rows of both directions of the global InfoNCE, one anchor at a time."""
    total = img.new_zeros(())
    for i in range(rank * B, (rank + 1) * B):
        total = total - torch.log_softmax(scale * img[i] @ txt.T, dim=0)[i]
        total = total - torch.log_softmax(scale * txt[i] @ img.T, dim=0)[i]
    return total / (2 * B)


@pytest.mark.usefixtures("shared_batch")
def test_local_terms_average_to_the_one_worker_value() -> None:
    batch = _global_batch()
    per_rank = [_terms(_on_local_rank(_build(LOCAL, DT), batch, rank)[0]) for rank in range(WS)]
    one = _build(replace(LOCAL, local=False), DT)
    ref = _terms(
        one(
            batch["s_img"],
            batch["s_txt"],
            torch.tensor(math.log(10.0)),
            batch["t_img"],
            batch["t_txt"],
        )
    )
    assert set(per_rank[0]) == set(ref) == {"clip_loss", "crd_loss", "icl_loss"}
    for name, value in ref.items():
        assert sum(p[name] for p in per_rank) / WS == pytest.approx(value, rel=1e-5), name
        assert per_rank[0][name] != pytest.approx(per_rank[1][name], rel=1e-3), name  # each rank its share
    for rank in range(WS):
        naive = _naive_local_clip(batch["s_img"], batch["s_txt"], 10.0, rank)
        assert per_rank[rank]["clip_loss"] == pytest.approx(float(naive.detach()), rel=1e-5)


@pytest.mark.usefixtures("shared_batch")
@pytest.mark.parametrize("with_grad", [False, True])
def test_local_student_gradient_is_the_naive_local_gradient(with_grad: bool) -> None:
    """CLIP through the gather: ``1/WS`` of the naive rows' gradient without ``gather_with_grad`` (each rank's
    share of the detached global form), all of it with; FD (local, never gathered) keeps its full gradient."""
    batch = _global_batch(1)
    cfg = replace(LOCAL, crd_weight=0.0, icl_weight=0.0, fd_weight=2.0)
    rank = 1
    loss = WIKDLoss(replace(cfg, gather_with_grad=with_grad), student_dim=DS, teacher_dim=DS)
    g = torch.Generator().manual_seed(7)
    batch["t_img"] = F.normalize(torch.randn(WS * B, DS, generator=g), dim=-1)
    batch["t_txt"] = F.normalize(torch.randn(WS * B, DS, generator=g), dim=-1)
    out, s_img, s_txt = _on_local_rank(loss, batch, rank)
    clip_grads = torch.autograd.grad(out["term/clip"], (s_img, s_txt), retain_graph=True)
    fd_grads = torch.autograd.grad(out["term/fd"], (s_img, s_txt))

    img, txt = batch["s_img"].clone(), batch["s_txt"].clone()
    own = slice(rank * B, (rank + 1) * B)
    r_img = img[own].clone().requires_grad_(True)
    r_txt = txt[own].clone().requires_grad_(True)
    full_img = torch.cat([img[: rank * B], r_img, img[(rank + 1) * B :]])
    full_txt = torch.cat([txt[: rank * B], r_txt, txt[(rank + 1) * B :]])
    naive = _naive_local_clip(full_img, full_txt, 10.0, rank)
    assert float(out["clip_loss"]) == pytest.approx(float(naive.detach()), rel=1e-5)
    want = torch.autograd.grad(naive, (r_img, r_txt))
    factor = 1.0 if with_grad else 1.0 / WS
    for got, ref in zip(clip_grads, want, strict=True):
        torch.testing.assert_close(got, factor * ref, rtol=1e-5, atol=1e-7)

    fd_img = r_img.detach().clone().requires_grad_(True)
    fd_txt = r_txt.detach().clone().requires_grad_(True)
    t_img, t_txt = batch["t_img"][own], batch["t_txt"][own]
    fd_naive = 2.0 * ((fd_img - t_img).pow(2).mean() + (fd_txt - t_txt).pow(2).mean())
    fd_ref = torch.autograd.grad(fd_naive, (fd_img, fd_txt))
    for got, ref in zip(fd_grads, fd_ref, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_local_needs_a_gather() -> None:
    """``loss.local`` with ``loss.gather=false`` has nothing to split: the config refuses it, naming both."""
    with pytest.raises(ConfigError) as info:
        replace(LOCAL, gather=False)
    assert str(info.value).startswith("loss.local") and "loss.gather" in str(info.value)


@pytest.mark.usefixtures("shared_batch")
def test_local_on_one_worker_is_the_plain_local_loss() -> None:
    batch = _global_batch(2)
    loss = _build(LOCAL, DT)
    plain = _build(replace(LOCAL, local=False, gather=False), DT)
    own = slice(B, 2 * B)
    args = (
        batch["s_img"][own],
        batch["s_txt"][own],
        torch.tensor(math.log(10.0)),
        batch["t_img"][own],
        batch["t_txt"][own],
    )
    assert _terms(loss(*args, rank=0, world_size=1)) == pytest.approx(_terms(plain(*args)), rel=1e-6)


def _pm_naive_rows(
    pm: PMLoss, img: Tensor, txt: Tensor, own: slice, scale: float, seed: int, k: int
) -> tuple[Tensor, float]:
    """PM's BCE on ``own``'s anchors, one pair at a time; negatives drawn as the docstring says (the rows'
    own similarities with their global offset, image anchors first); the cosine bias centred on these pairs."""
    g = torch.Generator().manual_seed(seed)
    neg_txt = sample_negatives(
        img[own] @ txt.T, k=k, mode=pm.negatives, scale=scale, generator=g, offset=own.start
    )
    neg_img = sample_negatives(
        txt[own] @ img.T, k=k, mode=pm.negatives, scale=scale, generator=g, offset=own.start
    )
    anchors = range(own.start, own.stop)
    pos = [(i, i) for i in anchors]
    neg = [(i, int(j)) for n, i in enumerate(anchors) for j in neg_txt[n]]
    neg += [(int(j), i) for n, i in enumerate(anchors) for j in neg_img[n]]

    def cos(a: int, b: int) -> Tensor:
        return scale * (img[a] @ txt[b]) / (img[a].norm() * txt[b].norm())

    raw_pos = torch.stack([cos(a, b) for a, b in pos])
    raw_neg = torch.stack([cos(a, b) for a, b in neg])
    bias = float(-0.5 * (raw_pos.mean() + raw_neg.mean()))
    logits = torch.cat([raw_pos, raw_neg]) + bias
    labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).to(logits.dtype)
    terms = [
        -torch.log(torch.sigmoid(x)) if y else -torch.log(1 - torch.sigmoid(x))
        for x, y in zip(logits, labels, strict=True)
    ]
    return torch.stack(terms).mean(), bias


@pytest.mark.parametrize("negatives", ["hard", "random"])
def test_pm_local_rows_match_a_naive_loop(negatives: str) -> None:
    g = torch.Generator().manual_seed(11)
    n, d, k, scale = 6, 4, 2, 7.0
    img = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0
    txt = torch.randn(n, d, generator=g, dtype=torch.float64)
    own = slice(3, 6)  # rank 1's rows of two ranks of three
    pm = PMLoss(d, head="cosine", negatives=negatives, per_anchor=k).double()  # type: ignore[arg-type]
    got = pm(img, txt, scale=scale, generator=torch.Generator().manual_seed(4), world_size=WS, rows=own)
    want, bias = _pm_naive_rows(pm, img, txt, own, scale, 4, k)
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-9)
    assert float(pm.bias.detach()) == pytest.approx(bias, rel=1e-9) and bool(pm.bias_set)


def test_pm_local_bias_is_the_rank_mean_of_the_centres(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a process group every rank's rows give another centre: the bias is their mean (all-reduce / WS)."""
    other_centre = 0.75

    class _Dist:
        @staticmethod
        def is_available() -> bool:
            return True

        @staticmethod
        def is_initialized() -> bool:
            return True

        @staticmethod
        def all_reduce(t: Tensor) -> None:
            t.add_(other_centre)  # the sum over the two ranks

    monkeypatch.setattr(pm_module, "dist", _Dist)
    g = torch.Generator().manual_seed(12)
    img, txt = (
        torch.randn(6, 4, generator=g, dtype=torch.float64),
        torch.randn(6, 4, generator=g, dtype=torch.float64),
    )
    pm = PMLoss(4, head="cosine", negatives="random", per_anchor=1).double()
    own = slice(0, 3)
    pm(img, txt, scale=5.0, generator=torch.Generator().manual_seed(4), world_size=WS, rows=own)
    _, centre = _pm_naive_rows(pm, img, txt, own, 5.0, 4, 1)
    assert float(pm.bias.detach()) == pytest.approx((centre + other_centre) / WS, rel=1e-9)


@pytest.mark.usefixtures("shared_batch")
def test_local_pm_term_is_its_rows_of_the_global_batch() -> None:
    batch = _global_batch(3)
    cfg = replace(LOCAL, clip_weight=0.0, crd_weight=0.0, icl_weight=0.0, pm_weight=1.0, pm_head="cosine")
    rank = 1
    out, _, _ = _on_local_rank(_build(cfg, DT), batch, rank, teacher=False)
    pm = PMLoss(DS, head="cosine", negatives=cfg.pm_negatives, per_anchor=cfg.pm_negatives_per_anchor)
    k = min(cfg.pm_negatives_per_anchor, WS * B - 1)
    own = slice(rank * B, (rank + 1) * B)
    want, _ = _pm_naive_rows(pm, batch["s_img"], batch["s_txt"], own, 10.0, 5, k)
    assert float(out["pm_loss"]) == pytest.approx(float(want), rel=1e-5)
