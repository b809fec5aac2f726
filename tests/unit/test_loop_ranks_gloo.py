"""The loop's collectives on two real gloo ranks (CPU): logged and checkpointed metrics are the means over
ranks, a NaN on one rank skips the step on every rank, a parameter unused on any rank is reported by every
rank, the replicas' drift is measured against rank 0 on every rank, and ``world_size=1`` stays a rank-local
call with no collective.

Each rank runs the Probe fit of tests/loop_fixtures.py on its own data (no DDP: the ranks' trajectories are
independent), so the references are single-process runs of each rank's part, computed here in the parent.
The workers are spawned with torch.multiprocessing and meet through a file:// init method in a temp folder.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from siclip.config import OptimCfg
from siclip.train.loop import (
    LoopHooks,
    LoopState,
    build_scheduler,
    replica_drift,
    run_loop,
    to_host,
    train_step,
    unused_parameters,
)
from tests.loop_fixtures import CPU, B, Probe, data

WORLD = 2
CFG = OptimCfg(lr=0.05, warmup_steps=1, weight_decay=0.0)


class Branchy(nn.Module):
    """``q`` is used on every rank, ``p`` on rank 0 only, ``r`` nowhere."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.q, self.r = (nn.Parameter(torch.ones(2)) for _ in range(3))

    def forward(self, batch: dict[str, Tensor], *, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        loss = (self.q * batch["x"][0, :2]).sum()
        return {"loss": loss + self.p.sum() if rank == 0 else loss}


def _sgd(task: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.SGD(task.parameters(), lr=CFG.lr)
    return optimizer, build_scheduler(optimizer, CFG, 10)


def _results(rank: int, world_size: int) -> dict[str, Any]:
    """What ``rank`` computes; with ``world_size=1`` (in the parent) its rank-local reference."""
    torch.manual_seed(0)
    out: dict[str, Any] = {
        "to_host": to_host({"a": torch.tensor(float(rank + 1)), "b": 7.0 + rank}, world_size=world_size),
        "to_host_local": to_host({"a": torch.tensor(float(rank + 1))}),
    }
    for key, size in (("ok", world_size), ("ok_local", 1)):
        task = Probe(poison={1} if rank == 1 else set())  # rank 1's first step has a NaN loss
        optimizer, scheduler = _sgd(task)
        out[key] = [
            train_step(
                task,
                next(data(rank)),
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=None,
                precision="fp32",
                device=CPU,
                grad_clip=1.0,
                rank=rank,
                world_size=size,
            )[0]
            for _ in range(2)
        ]
    batch = next(data(rank))
    out["unused"] = unused_parameters(Branchy(), batch, device=CPU, rank=rank, world_size=world_size)
    out["unused_local"] = unused_parameters(Branchy(), batch, device=CPU, rank=rank)
    logs: list[tuple[int, dict[str, float]]] = []
    saved: list[tuple[int, dict[str, float]]] = []
    task = Probe()
    optimizer, scheduler = _sgd(task)
    state = run_loop(
        task,
        data(rank),
        optimizer=optimizer,
        scheduler=scheduler,
        state=LoopState(),
        max_steps=4,
        device=CPU,
        log_every=2,
        ckpt_every=2,
        rank=rank,
        world_size=world_size,
        hooks=LoopHooks(
            on_log=lambda s, m: logs.append((s, m)), on_checkpoint=lambda s, m: saved.append((s, m))
        ),
    )
    out.update(logs=logs, saved=saved, samples_seen=state.samples_seen)
    # replicas that drifted apart: rank 1's trainable bias is off by 0.25, its frozen weight by far more
    drifting = nn.Linear(2, 2)
    with torch.no_grad():
        drifting.weight.fill_(1.0 + 5.0 * rank)
        drifting.bias.fill_(1.0)
        drifting.bias[0] += 0.25 * rank
    drifting.weight.requires_grad_(False)
    out["drift"] = replica_drift(drifting, world_size)
    return out


def _worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{root}/init",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        torch.save(_results(rank, WORLD), Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("loop_gloo")
    mp.spawn(_worker, args=(str(root),), nprocs=WORLD, join=True)
    return [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_to_host_averages_device_scalars_over_ranks_and_world_size_1_stays_local(
    ranks: list[dict[str, Any]],
) -> None:
    for rank, got in enumerate(ranks):
        local = _results(rank, 1)
        assert local["to_host"] == {"a": rank + 1.0, "b": 7.0 + rank}
        # tensors are the mean over ranks; plain numbers are this rank's own
        assert got["to_host"] == {"a": 1.5, "b": 7.0 + rank}
        assert got["to_host_local"] == local["to_host_local"] == {"a": rank + 1.0}


def test_a_nan_on_one_rank_skips_the_step_on_every_rank_of_the_world(ranks: list[dict[str, Any]]) -> None:
    assert [_results(r, 1)["ok"] for r in range(WORLD)] == [[True, True], [False, True]]
    assert [got["ok"] for got in ranks] == [[False, True]] * WORLD
    # world_size=1 is this process's own step, even inside a process group
    assert [got["ok_local"] for got in ranks] == [[True, True], [False, True]]


def test_a_parameter_unused_on_any_rank_is_reported_by_every_rank(ranks: list[dict[str, Any]]) -> None:
    local = [_results(r, 1)["unused"] for r in range(WORLD)]
    assert local == [["r"], ["p", "r"]]
    for rank, got in enumerate(ranks):
        assert got["unused"] == ["p", "r"]
        assert got["unused_local"] == local[rank]


def test_replica_drift_is_the_largest_trainable_difference_from_rank_0_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    assert [got["drift"] for got in ranks] == [pytest.approx(0.25)] * WORLD
    assert _results(1, 1)["drift"] == 0.0  # one worker: nothing to drift from


def test_logged_and_checkpointed_metrics_are_means_over_ranks(ranks: list[dict[str, Any]]) -> None:
    refs = [_results(r, 1) for r in range(WORLD)]
    averaged = ("loss/total", "loss/fit", "temp/scale", "optim/grad_norm")
    for got in ranks:
        assert got["samples_seen"] == 4 * B * WORLD
        for kind in ("logs", "saved"):
            assert [s for s, _ in got[kind]] == [2, 4]
            for (_, m), (_, m0), (_, m1) in zip(got[kind], refs[0][kind], refs[1][kind], strict=True):
                for key in averaged:
                    assert m[key] == pytest.approx((m0[key] + m1[key]) / 2, rel=1e-6), (kind, key)
                assert m["optim/lr"] == m0["optim/lr"]
        for _, m in got["logs"]:
            assert m["perf/samples_per_s"] * m["perf/step_time_s"] == pytest.approx(B * WORLD)
    # the ranks' own losses differ, the logged ones agree
    assert refs[0]["logs"][0][1]["loss/total"] != refs[1]["logs"][0][1]["loss/total"]
    assert ranks[0]["logs"][0][1]["loss/total"] == ranks[1]["logs"][0][1]["loss/total"]
