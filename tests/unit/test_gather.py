"""Gathering across workers: two real gloo workers on CPU compute the same WIKD + PM loss (and input gradients)
as one process does on the concatenated batch; and ``gather_features`` / ``broadcast_from_rank0`` in this
process, as rank 1 of 2 of torch's ``fake`` process group, and ``scale_grad``.

The gloo workers are spawned with torch.multiprocessing and rendezvous through a file:// init method in a temp
folder, so no port is needed. Everything they compare is saved by each rank and checked here in the parent.
The fake group runs no communication (the other rank's gathered rows are whatever it leaves there), so the
in-process tests check only what one rank decides (the checks, the global shape, this rank's live slice at its
offset and the gradient reaching it), which mutation testing can see, unlike the spawned workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.testing._internal.distributed.fake_pg import FakeStore

from siclip.config import LossCfg
from siclip.losses.gather import broadcast_from_rank0, gather_features, scale_grad
from siclip.losses.total import build_loss

WORLD = 2
LOCAL_B, DS, DT = 4, 8, 12
# FD is local by design, so the gathered terms and FD are compared in separate cases.
CASES: dict[str, dict[str, Any]] = {
    "gathered": {"cfg": {"fd_weight": 0.0, "pm_negatives_per_anchor": 2}, "with_grad": False},
    "gathered_with_grad": {"cfg": {"fd_weight": 0.0}, "with_grad": True},
    "fd_only": {
        "cfg": {"clip_weight": 0.0, "crd_weight": 0.0, "icl_weight": 0.0, "pm_weight": 0.0},
        "with_grad": False,
    },
}
# loss.local vs the global form, one gathered term at a time, for both gather modes. PM draws every other
# column as a negative (k = B - 1), so the drawn *set* is fixed and local and global must agree exactly.
GATHERED_TERMS = ("clip", "crd", "icl", "pm")
for _term in GATHERED_TERMS:
    for _with_grad in (False, True):
        for _local in (False, True):
            CASES[f"{_term}/{'local' if _local else 'global'}/{_with_grad}"] = {
                "cfg": {
                    **{f"{t}_weight": 0.0 for t in ("clip", "fd", *GATHERED_TERMS) if t != _term},
                    "pm_negatives_per_anchor": WORLD * LOCAL_B - 1,
                    "local": _local,
                },
                "with_grad": _with_grad,
            }


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = WORLD * LOCAL_B
    return {
        "s_img": F.normalize(torch.randn(n, DS, generator=g), dim=-1),
        "s_txt": F.normalize(torch.randn(n, DS, generator=g), dim=-1),
        "t_img": F.normalize(torch.randn(n, DT, generator=g), dim=-1),
        "t_txt": F.normalize(torch.randn(n, DT, generator=g), dim=-1),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }


def _run(
    case: str, data: dict[str, torch.Tensor], *, rank: int, world_size: int, lo: int, hi: int, seed: int
) -> dict[str, Any]:
    """Loss terms and gradients for the rows ``lo:hi`` of the data, as seen by ``rank``."""
    spec = CASES[case]
    torch.manual_seed(1)  # the same loss parameters on every rank and in the reference
    loss = build_loss(
        LossCfg(**spec["cfg"], gather_with_grad=spec["with_grad"]), student_dim=DS, teacher_dim=DT
    )
    s_img = data["s_img"][lo:hi].clone().requires_grad_()
    s_txt = data["s_txt"][lo:hi].clone().requires_grad_()
    logit_scale = data["logit_scale"].clone().requires_grad_()
    out = loss(
        s_img,
        s_txt,
        logit_scale,
        data["t_img"][lo:hi],
        data["t_txt"][lo:hi],
        rank=rank,
        world_size=world_size,
        generator=torch.Generator().manual_seed(seed),
    )
    out["loss"].backward()
    return {
        "terms": {k: v.detach() for k, v in out.items()},
        "grad_img": s_img.grad,
        "grad_txt": s_txt.grad,
        "param_grads": {n: p.grad for n, p in loss.named_parameters()},
        "logit_scale_grad": logit_scale.grad,
    }


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        data = _data()
        lo, hi = rank * LOCAL_B, (rank + 1) * LOCAL_B
        # ranks seed differently on purpose: PM's negatives must still agree (rank 0's draw is broadcast)
        results = {
            case: _run(case, data, rank=rank, world_size=WORLD, lo=lo, hi=hi, seed=123 + 1000 * rank)
            for case in CASES
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single(case: str) -> dict[str, Any]:
    return _run(case, _data(), rank=0, world_size=1, lo=0, hi=WORLD * LOCAL_B, seed=123)


@pytest.mark.parametrize("case", ["gathered", "gathered_with_grad"])
def test_every_rank_computes_the_one_worker_loss(ranks: list[dict[str, Any]], case: str) -> None:
    ref = _single(case)
    assert set(ref["terms"]) >= {"clip_loss", "crd_loss", "icl_loss", "pm_loss"}
    for r in range(WORLD):
        got = ranks[r][case]
        assert set(got["terms"]) == set(ref["terms"])
        for key, value in ref["terms"].items():
            torch.testing.assert_close(got["terms"][key], value, rtol=1e-5, atol=1e-6, msg=f"rank {r} {key}")
        # the loss's own parameters see the whole global loss on every rank
        for name, grad in ref["param_grads"].items():
            torch.testing.assert_close(got["param_grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_detached_gather_gives_each_rank_its_slice_of_the_one_worker_gradient(
    ranks: list[dict[str, Any]],
) -> None:
    ref = _single("gathered")
    for r in range(WORLD):
        sl = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
        torch.testing.assert_close(
            ranks[r]["gathered"]["grad_img"], ref["grad_img"][sl], rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(
            ranks[r]["gathered"]["grad_txt"], ref["grad_txt"][sl], rtol=1e-4, atol=1e-6
        )


def test_gather_with_grad_sums_over_ranks_so_ddp_averaging_is_exact(ranks: list[dict[str, Any]]) -> None:
    ref = _single("gathered_with_grad")
    for r in range(WORLD):
        sl = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
        got = ranks[r]["gathered_with_grad"]
        torch.testing.assert_close(got["grad_img"], WORLD * ref["grad_img"][sl], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["grad_txt"], WORLD * ref["grad_txt"][sl], rtol=1e-4, atol=1e-6)


def test_fd_is_local_and_its_rank_average_is_the_one_worker_value(ranks: list[dict[str, Any]]) -> None:
    ref = _single("fd_only")
    mean = sum(ranks[r]["fd_only"]["terms"]["fd_loss"] for r in range(WORLD)) / WORLD
    torch.testing.assert_close(mean, ref["terms"]["fd_loss"], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(
        ranks[0]["fd_only"]["terms"]["fd_loss"], ranks[1]["fd_only"]["terms"]["fd_loss"]
    )
    for r in range(WORLD):
        sl = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
        # local mean over B/WORLD rows: WORLD x the one-worker gradient, which DDP's average undoes
        torch.testing.assert_close(
            ranks[r]["fd_only"]["grad_img"], WORLD * ref["grad_img"][sl], rtol=1e-4, atol=1e-7
        )


@pytest.mark.parametrize("with_grad", [False, True])
@pytest.mark.parametrize("term", GATHERED_TERMS)
def test_local_loss_matches_the_global_form(ranks: list[dict[str, Any]], term: str, with_grad: bool) -> None:
    """Each rank's rows only: the rank-mean of the values is the global value, every rank's student gradient
    is the global form's, and the rank-mean of the loss's own (and the logit scale's) gradients is the global
    one, which is what DDP's averaging applies."""
    glob = [ranks[r][f"{term}/global/{with_grad}"] for r in range(WORLD)]
    loc = [ranks[r][f"{term}/local/{with_grad}"] for r in range(WORLD)]
    key = f"{term}_loss"
    assert set(loc[0]["terms"]) == set(glob[0]["terms"]) and key in loc[0]["terms"]
    for name in loc[0]["terms"]:
        mean = sum(loc[r]["terms"][name] for r in range(WORLD)) / WORLD
        torch.testing.assert_close(mean, glob[0]["terms"][name], rtol=1e-5, atol=1e-6, msg=name)
    # the local value really is this rank's share, not a copy of the global value
    assert not torch.allclose(loc[0]["terms"][key], loc[1]["terms"][key])
    for r in range(WORLD):
        for grad in ("grad_img", "grad_txt"):
            torch.testing.assert_close(loc[r][grad], glob[r][grad], rtol=1e-4, atol=1e-6, msg=f"{r} {grad}")

    def rank_mean(grads: list[torch.Tensor | None]) -> torch.Tensor | None:
        return None if all(g is None for g in grads) else sum(g for g in grads if g is not None) / WORLD

    averaged = {name: rank_mean([x["param_grads"][name] for x in loc]) for name in glob[0]["param_grads"]}
    averaged["logit_scale"] = rank_mean([x["logit_scale_grad"] for x in loc])
    expected = {**glob[0]["param_grads"], "logit_scale": glob[0]["logit_scale_grad"]}
    assert set(averaged) == set(expected)
    for name, grad in expected.items():
        if grad is None:  # the logit scale in CRD/ICL: unused by the term in either form
            assert averaged[name] is None, name
            continue
        torch.testing.assert_close(averaged[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------ one rank, in this process
RANK, B, D = 1, 3, 4


@pytest.fixture
def fake_group() -> Iterator[None]:
    assert not dist.is_initialized()
    dist.init_process_group("fake", rank=RANK, world_size=WORLD, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _x() -> torch.Tensor:
    return torch.arange(B * D, dtype=torch.float32).reshape(B, D).requires_grad_(True)


def test_one_worker_is_the_identity_without_a_process_group() -> None:
    x = _x()
    for with_grad in (False, True):
        out = gather_features(x, rank=0, world_size=1, with_grad=with_grad)
        assert torch.equal(out, x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(grad, torch.ones_like(x))
    idx = torch.arange(4)
    assert torch.equal(broadcast_from_rank0(idx, world_size=1), idx)


def test_several_workers_need_an_initialised_group() -> None:
    for call in (
        lambda: gather_features(_x(), rank=0, world_size=2),
        lambda: broadcast_from_rank0(torch.arange(4), world_size=2),
    ):
        with pytest.raises(RuntimeError, match="not initialised") as info:
            call()
        assert "world_size=2" in str(info.value)


@pytest.mark.usefixtures("fake_group")
def test_rank_and_world_size_must_match_the_group() -> None:
    for rank, ws in ((0, WORLD), (RANK, 3)):
        with pytest.raises(ValueError, match="disagree with the process group") as info:
            gather_features(_x(), rank=rank, world_size=ws)
        assert f"({rank}/{ws})" in str(info.value) and f"({RANK}/{WORLD})" in str(info.value)


@pytest.mark.usefixtures("fake_group")
def test_detached_gather_puts_the_live_slice_at_this_ranks_rows() -> None:
    x = _x()
    out = gather_features(x, rank=RANK, world_size=WORLD)
    assert out.shape == (WORLD * B, D)
    assert torch.equal(out[RANK * B :], x)
    (grad,) = torch.autograd.grad((out * 2.0).sum(), x)
    assert torch.equal(grad, torch.full_like(x, 2.0))  # only the local slice carries gradient, once


@pytest.mark.usefixtures("fake_group")
@pytest.mark.filterwarnings("ignore:torch.distributed.nn.functional.all_gather is deprecated:FutureWarning")
def test_gather_with_grad_concatenates_along_the_batch() -> None:
    x = _x()
    out = gather_features(x, rank=RANK, world_size=WORLD, with_grad=True)
    assert out.shape == (WORLD * B, D)
    assert torch.equal(out[RANK * B :].detach(), x.detach())
    (grad,) = torch.autograd.grad(out.sum(), x)
    # backward sums the gradient of every rank's copy of x (each rank's loss reads all of them)
    assert torch.equal(grad, torch.full_like(x, float(WORLD)))


@pytest.mark.usefixtures("fake_group")
def test_broadcast_takes_a_non_contiguous_tensor_and_returns_a_contiguous_one_of_the_same_values() -> None:
    idx = torch.arange(12).reshape(3, 4).T  # not contiguous; the collective needs a contiguous buffer
    out = broadcast_from_rank0(idx, world_size=WORLD)
    assert out.is_contiguous() and torch.equal(out, idx)


def test_scale_grad_scales_only_the_backward() -> None:
    """What ``loss.local`` uses to give each rank its share of a detached gather's gradient."""
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    for factor in (0.25, 1.0, 2.0, 3.0):
        y = scale_grad(x, factor)
        assert torch.equal(y, x) and y.dtype == x.dtype and y.shape == x.shape
        (grad,) = torch.autograd.grad((y * w).sum(), x)
        torch.testing.assert_close(grad, factor * w, rtol=0, atol=0)
