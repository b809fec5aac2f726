"""``gather_features`` / ``broadcast_from_rank0`` in this process, as rank 1 of 2 of torch's ``fake`` process group.

The fake group runs no communication (the other rank's gathered rows are whatever it leaves there), so this
pins only what one rank decides: the checks and their messages, the global shape and rank order (this rank's
live slice at its offset, gradient reaching it once with the detached gather, once per rank with
``with_grad``), and the identity on one worker. The values across real ranks are tested with gloo in
test_gather_gloo (spawned processes, which mutation testing cannot see).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from siclip.losses.gather import broadcast_from_rank0, gather_features

RANK, WS, B, D = 1, 2, 3, 4


@pytest.fixture
def fake_group() -> Iterator[None]:
    assert not dist.is_initialized()
    dist.init_process_group("fake", rank=RANK, world_size=WS, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _x() -> torch.Tensor:
    return torch.arange(B * D, dtype=torch.float32).reshape(B, D).requires_grad_(True)


def test_one_worker_is_the_identity_without_a_process_group() -> None:
    x = _x()
    assert gather_features(x, rank=0, world_size=1) is x
    assert gather_features(x, rank=0, world_size=1, with_grad=True) is x
    idx = torch.arange(4)
    assert broadcast_from_rank0(idx, world_size=1) is idx


def test_several_workers_need_an_initialised_group() -> None:
    x = _x()
    msg = "world_size=2 but torch.distributed is not initialised"
    with pytest.raises(RuntimeError, match=f"^{re.escape(msg)}$"):
        gather_features(x, rank=0, world_size=2)
    with pytest.raises(RuntimeError, match=f"^{re.escape(msg)}$"):
        broadcast_from_rank0(torch.arange(4), world_size=2)


@pytest.mark.usefixtures("fake_group")
def test_rank_and_world_size_must_match_the_group() -> None:
    x = _x()
    for rank, ws in ((0, WS), (RANK, 3)):
        msg = f"rank/world_size ({rank}/{ws}) disagree with the process group ({RANK}/{WS})"
        with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
            gather_features(x, rank=rank, world_size=ws)


@pytest.mark.usefixtures("fake_group")
def test_detached_gather_puts_the_live_slice_at_this_ranks_rows() -> None:
    x = _x()
    out = gather_features(x, rank=RANK, world_size=WS)
    assert out.shape == (WS * B, D)
    assert torch.equal(out[RANK * B :], x)
    (grad,) = torch.autograd.grad((out * 2.0).sum(), x)
    assert torch.equal(grad, torch.full_like(x, 2.0))  # only the local slice carries gradient, once


@pytest.mark.usefixtures("fake_group")
@pytest.mark.filterwarnings("ignore:torch.distributed.nn.functional.all_gather is deprecated:FutureWarning")
def test_gather_with_grad_concatenates_along_the_batch() -> None:
    x = _x()
    out = gather_features(x, rank=RANK, world_size=WS, with_grad=True)
    assert out.shape == (WS * B, D)
    assert torch.equal(out[RANK * B :].detach(), x.detach())
    (grad,) = torch.autograd.grad(out.sum(), x)
    # backward sums the gradient of every rank's copy of x (each rank's loss reads all of them)
    assert torch.equal(grad, torch.full_like(x, float(WS)))


@pytest.mark.usefixtures("fake_group")
def test_broadcast_returns_a_contiguous_tensor_of_the_same_values() -> None:
    idx = torch.arange(12).reshape(3, 4).T  # not contiguous
    out = broadcast_from_rank0(idx, world_size=WS)
    assert out.is_contiguous() and torch.equal(out, idx)
