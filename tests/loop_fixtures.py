"""Toy tasks and data for the Ray-free training loop's tests (test_loop, test_loop_ranks_gloo, test_grad_share).

``Probe`` is a 4-input linear fit that records what the loop handed each forward and can return a NaN loss on
chosen calls; ``TwoTermTask`` is the same fit split into two weighted terms (for gradient shares); ``data``
streams batches of ``B`` samples of one fixed linear target; ``run`` trains a task with the loop and returns
its state and logs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from siclip.config import OptimCfg
from siclip.train.loop import LoopHooks, LoopState, build_optimizer, build_scheduler, run_loop

B = 8
CPU = torch.device("cpu")


class Probe(nn.Module):
    """A linear fit that records what the loop handed each forward; ``poison`` calls return a NaN loss."""

    def __init__(self, poison: set[int] | None = None) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.poison = poison or set()
        self.seen: list[dict[str, Any]] = []

    def forward(self, batch: dict[str, Tensor], *, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        x = batch["x"]
        self.seen.append(
            {
                "rank": rank,
                "world_size": world_size,
                "training": self.training,
                "autocast": torch.is_autocast_enabled("cpu"),
                "dtype": torch.get_autocast_dtype("cpu"),
                "device": x.device.type,
            }
        )
        pred = self.lin(x).squeeze(-1)
        loss = ((pred.float() - batch["y"]) ** 2).mean()
        if len(self.seen) in self.poison:
            loss = loss * float("nan")
        # a scalar that is not a loss keeps its name; a vector is no metric
        return {
            "loss": loss,
            "fit_loss": loss.detach(),
            "temp/scale": torch.tensor(2.0),
            "pred": pred.detach(),
        }


class TwoTermTask(nn.Module):
    """The linear fit split into two weighted terms, after a BatchNorm; draws from the RNG like PM does."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.bn = nn.BatchNorm1d(4)

    def forward(
        self, batch: dict[str, Tensor], *, rank: int = 0, world_size: int = 1, keep_terms: bool = False
    ) -> dict[str, Tensor]:
        pred = self.lin(self.bn(batch["x"])).squeeze(-1)
        noise = 0.01 * torch.randn_like(pred)
        fit = ((pred + noise - batch["y"]) ** 2).mean()
        small = 1e-3 * (self.lin.weight**2).sum()
        out = {"loss": fit + small, "fit_loss": fit.detach(), "small_loss": small.detach()}
        if keep_terms:
            out.update({"term/fit": fit, "term/small": small})
        return out


def data(seed: int = 0) -> Iterator[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    while True:
        x = torch.randn(B, 4, generator=g)
        yield {"x": x, "y": x @ w}


def run(task: nn.Module, steps: int, **kw: Any) -> tuple[LoopState, list[tuple[int, dict[str, float]]]]:
    """``steps`` steps of AdamW (lr 0.05, 5 warm-up steps), logging every 10; returns the state and the logs."""
    cfg = OptimCfg(lr=0.05, warmup_steps=5, weight_decay=0.0)
    opt = build_optimizer(task, cfg)
    logs: list[tuple[int, dict[str, float]]] = []
    state = run_loop(
        task,
        data(),
        optimizer=opt,
        scheduler=build_scheduler(opt, cfg, steps),
        state=LoopState(),
        max_steps=steps,
        device=CPU,
        log_every=10,
        hooks=LoopHooks(on_log=lambda s, m: logs.append((s, m))),
        **kw,
    )
    return state, logs
