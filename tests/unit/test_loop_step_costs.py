"""What a step costs beyond its math: device -> host transfers (at most one per non-logging step, one batch
per logging step) and DDP's unused-parameter search (only when a parameter really gets no gradient).

Every ``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()`` and ``float()/int()/bool()`` of a tensor is a host
sync on a GPU (the CPU waits for the queue to drain). On CPU nothing waits, so the test counts the calls
that siclip's own code makes (the caller's module), through the real task, WIKD + PM loss and loop.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siclip.config import LossCfg, OptimCfg
from siclip.losses.total import build_loss
from siclip.task import SiclipTask
from siclip.train.loop import (
    LoopHooks,
    LoopState,
    build_optimizer,
    build_scheduler,
    run_loop,
    unused_parameters,
)

D_IN, D, DT, B = 6, 8, 12, 8
SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


class ToyClip(nn.Module):
    """An open_clip-shaped student: two linear towers and a logit scale."""

    def __init__(self) -> None:
        super().__init__()
        self.img = nn.Linear(D_IN, D)
        self.txt = nn.Linear(D_IN, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: Tensor, normalize: bool = False) -> Tensor:
        return F.normalize(self.img(x), dim=-1)

    def encode_text(self, x: Tensor, normalize: bool = False) -> Tensor:
        return F.normalize(self.txt(x), dim=-1)


def batches() -> Iterator[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(B, D_IN, generator=g)
        yield {
            "image": x,
            "text": x + 0.3 * torch.randn(B, D_IN, generator=g),
            "syn_text": x + 0.5 * torch.randn(B, D_IN, generator=g),
            "teacher_image_emb": torch.randn(B, DT, generator=g),
            "teacher_text_emb": torch.randn(B, DT, generator=g),
            "teacher_syn_emb": torch.randn(B, DT, generator=g),
        }


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the syncing tensor methods siclip code calls, in order."""
    calls: list[str] = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self: Tensor, *args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("siclip."):
                calls.append(f"{caller}.{_name}")
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


def test_at_most_one_host_sync_per_non_logging_step(syncs: list[str]) -> None:
    torch.manual_seed(0)
    task = SiclipTask(ToyClip(), build_loss(LossCfg(pm_hidden=4), student_dim=D, teacher_dim=DT))
    cfg = OptimCfg(lr=1e-3, warmup_steps=2)
    optimizer = build_optimizer(task, cfg)
    per_step: list[list[str]] = []
    per_log: list[list[str]] = []
    logged: list[dict[str, float]] = []

    def on_step(step: int) -> None:  # called after each step, before that step's log
        per_step.append(list(syncs))
        syncs.clear()

    def on_log(step: int, metrics: dict[str, float]) -> None:
        per_log.append(list(syncs))
        syncs.clear()
        logged.append(metrics)

    run_loop(
        task,
        batches(),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, 12),
        state=LoopState(),
        max_steps=12,
        device=torch.device("cpu"),
        log_every=4,
        hooks=LoopHooks(on_log=on_log, on_step=on_step),
    )
    print("host syncs per step:", [len(c) for c in per_step], "per log:", [len(c) for c in per_log])
    # the one left: whether the step's loss/gradient was finite (it decides whether the optimizer steps)
    assert len(per_step) == 12 and all(len(c) <= 1 for c in per_step), per_step
    # the logged means arrive in one transfer on each logging step, and are plain numbers
    assert len(per_log) == 3 and all(len(c) <= 1 for c in per_log), per_log
    assert not syncs, syncs
    assert len(logged) == 3 and all(isinstance(v, float) for m in logged for v in m.values())
    assert {"loss/total", "loss/clip", "loss/pm", "loss/syn", "optim/grad_norm", "temp/icl"} <= set(
        logged[-1]
    )


def _task(**loss: Any) -> SiclipTask:
    torch.manual_seed(0)
    return SiclipTask(ToyClip(), build_loss(LossCfg(pm_hidden=4, **loss), student_dim=D, teacher_dim=DT))


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        ({}, []),
        # PM uses the logit scale detached: without the CLIP term nothing trains it
        ({"clip_weight": 0.0}, ["student.logit_scale"]),
        # no teacher terms: the CRD and ICL temperatures and the projector are never built, so never unused
        ({"fd_weight": 0.0, "crd_weight": 0.0, "icl_weight": 0.0}, []),
    ],
)
def test_unused_parameters_are_found_without_side_effects(
    loss: dict[str, float], expected: list[str]
) -> None:
    task = _task(**loss)
    task.train()
    bn = nn.BatchNorm1d(D_IN)  # a buffer the probe's forward would move
    task.student.img = nn.Sequential(bn, task.student.img)  # type: ignore[assignment]
    batch = next(batches())
    running = bn.running_mean.clone()
    rng = torch.get_rng_state()
    assert unused_parameters(task, batch, device=torch.device("cpu")) == expected
    assert all(p.grad is None for p in task.parameters())
    assert torch.equal(bn.running_mean, running) and torch.equal(torch.get_rng_state(), rng)


def test_an_added_dead_parameter_is_reported() -> None:
    task = _task()
    task.student.dead = nn.Parameter(torch.zeros(3))  # type: ignore[assignment]
    assert unused_parameters(task, next(batches()), device=torch.device("cpu")) == ["student.dead"]
    task.student.dead.requires_grad_(False)  # frozen parameters are DDP's business no more
    assert unused_parameters(task, next(batches()), device=torch.device("cpu")) == []
