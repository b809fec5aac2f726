"""The Ray-free loop on a toy task: learning, NaN/inf skipping, schedule, and checkpoint round trips."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from siclip.config import OptimCfg
from siclip.train.checkpoint import load_checkpoint, save_checkpoint
from siclip.train.loop import (
    LoopHooks,
    LoopState,
    TooManyBadStepsError,
    build_optimizer,
    build_scheduler,
    lr_factor,
    run_loop,
)


class ToyTask(nn.Module):
    """Linear regression; ``poison`` makes chosen calls return a NaN loss."""

    def __init__(self, poison: set[int] | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.gain = nn.Parameter(torch.ones(()))
        self.poison = poison or set()
        self.calls = 0

    def forward(self, batch: dict[str, Tensor], *, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        self.calls += 1
        loss = ((self.gain * self.lin(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        if self.calls in self.poison:
            loss = loss * float("nan")
        return {"loss": loss, "mse_loss": loss.detach()}


def batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    while True:
        x = torch.randn(16, 4, generator=g)
        yield {"x": x, "y": x @ w}


def optim_cfg(**kw) -> OptimCfg:
    return OptimCfg(**{"lr": 0.05, "warmup_steps": 5, "weight_decay": 0.0, **kw})


def run(task: nn.Module, steps: int, **kw) -> tuple[LoopState, list[tuple[int, dict[str, float]]]]:
    cfg = optim_cfg()
    opt = build_optimizer(task, cfg)
    sched = build_scheduler(opt, cfg, steps)
    logs: list[tuple[int, dict[str, float]]] = []
    state = run_loop(
        task,
        batches(),
        optimizer=opt,
        scheduler=sched,
        state=LoopState(),
        max_steps=steps,
        device=torch.device("cpu"),
        log_every=10,
        hooks=LoopHooks(on_log=lambda s, m: logs.append((s, m))),
        **kw,
    )
    return state, logs


def test_loop_learns_and_logs_every_term() -> None:
    torch.manual_seed(0)
    state, logs = run(ToyTask(), 200)
    assert state.step == 200 and state.samples_seen == 200 * 16
    first, last = logs[0][1]["loss/total"], logs[-1][1]["loss/total"]
    assert last < 0.05 * first
    assert {"loss/total", "loss/mse", "optim/lr", "optim/grad_norm", "perf/samples_per_s"} <= set(logs[-1][1])


def test_nan_steps_are_skipped_counted_and_do_not_update() -> None:
    torch.manual_seed(0)
    task = ToyTask(poison={3, 4, 5})
    state, _ = run(task, 20)
    assert state.step == 20 and state.bad_steps == 3
    assert all(torch.isfinite(p).all() for p in task.parameters())
    with pytest.raises(TooManyBadStepsError, match=r"train.max_bad_steps = 2"):
        run(ToyTask(poison={2, 3, 4}), 20, max_bad_steps=2)


def test_schedule_matches_warmup_then_cosine() -> None:
    cfg = optim_cfg(warmup_steps=10, min_lr_ratio=0.1)
    for step in [0, 4, 9, 10, 55, 100, 150]:
        if step < 10:
            expected = (step + 1) / 10
        else:
            t = min((step - 10) / 90, 1.0)
            expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
        assert lr_factor(step, cfg, 100) == pytest.approx(expected)
    assert lr_factor(50, optim_cfg(schedule="constant"), 100) == 1.0


def test_no_weight_decay_on_vectors_and_scalars() -> None:
    task = ToyTask()
    groups = build_optimizer(task, optim_cfg(weight_decay=0.1)).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(task.lin.weight)}


def test_checkpoint_round_trip_continues_identically(tmp_path: Path) -> None:
    def make() -> tuple[ToyTask, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        torch.manual_seed(0)
        task = ToyTask()
        opt = build_optimizer(task, optim_cfg())
        return task, opt, build_scheduler(opt, optim_cfg(), 40)

    # straight through: 40 steps
    task_a, opt_a, sched_a = make()
    data = batches()
    run_loop(
        task_a,
        data,
        optimizer=opt_a,
        scheduler=sched_a,
        state=LoopState(),
        max_steps=40,
        device=torch.device("cpu"),
    )

    # 20 steps, checkpoint, fresh objects, restore, 20 more on the same data stream
    task_b, opt_b, sched_b = make()
    data = batches()
    run_loop(
        task_b,
        data,
        optimizer=opt_b,
        scheduler=sched_b,
        state=LoopState(),
        max_steps=20,
        device=torch.device("cpu"),
    )
    save_checkpoint(
        tmp_path / "c",
        task=task_b,
        optimizer=opt_b,
        scheduler=sched_b,
        scaler=None,
        counters={"step": 20, "bad_steps": 0, "samples_seen": 320},
    )
    assert not (tmp_path / "c.tmp").exists()
    task_c, opt_c, sched_c = make()
    counters = load_checkpoint(tmp_path / "c", task=task_c, optimizer=opt_c, scheduler=sched_c)
    assert counters["step"] == 20
    run_loop(
        task_c,
        data,
        optimizer=opt_c,
        scheduler=sched_c,
        state=LoopState(step=20),
        max_steps=40,
        device=torch.device("cpu"),
    )
    for pa, pc in zip(task_a.parameters(), task_c.parameters(), strict=True):
        torch.testing.assert_close(pa, pc)
    state = torch.load(tmp_path / "c" / "train_state.pt", weights_only=True)
    assert state["counters"]["samples_seen"] == 320
