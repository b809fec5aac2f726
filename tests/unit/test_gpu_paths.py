"""CUDA-only paths: fp16 with GradScaler, CUDA autocast around the fp32 loss, PM sampling on CUDA generators.

Marked ``gpu``: tests/conftest.py skips them (with the reason) when torch sees no CUDA device;
benchmarks/gpu_check.sh runs them on the GPU machine before the benchmark.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siclip.config import LossCfg, OptimCfg
from siclip.losses.pm import sample_negatives
from siclip.losses.total import build_loss
from siclip.train.loop import (
    autocast_context,
    build_optimizer,
    build_scheduler,
    resolve_precision,
    train_step,
)

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


class Regression(nn.Module):
    """A linear fit; under fp16 autocast its output (and so the gradient flowing into it) is fp16."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 1)

    def forward(self, batch: dict[str, Tensor], *, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        pred = self.lin(batch["x"]).squeeze(-1)
        loss = ((pred.float() - batch["y"]) ** 2).mean()
        return {"loss": loss, "pred_dtype": torch.tensor(float(pred.dtype == torch.float16))}


def _batch(seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=g)
    return {"x": x, "y": x @ torch.arange(1.0, 9.0)}


def test_fp16_with_grad_scaler_learns_and_skips_overflowing_steps() -> None:
    torch.manual_seed(0)
    task = Regression().to(CUDA)
    cfg = OptimCfg(lr=0.05, warmup_steps=0, weight_decay=0.0, schedule="constant")
    opt = build_optimizer(task, cfg)
    sched = build_scheduler(opt, cfg, 100)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    assert resolve_precision("fp16", CUDA) == "fp16"
    losses = []
    for step in range(60):
        ok, metrics = train_step(
            task,
            _batch(step),
            optimizer=opt,
            scheduler=sched,
            scaler=scaler,
            precision="fp16",
            device=CUDA,
            grad_clip=0.0,
        )
        assert ok and metrics["pred_dtype"] == 1.0  # the forward really ran in fp16
        losses.append(metrics["loss/total"])
    assert sum(losses[-10:]) < 0.1 * sum(losses[:10])
    # a scale of 2**40 overflows the fp16 gradient at the linear's output: a finite loss with an inf gradient,
    # which is the scaler's business (skip the update, lower the scale), not a bad step of ours
    before = [p.detach().clone() for p in task.parameters()]
    huge = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    ok, _ = train_step(
        task,
        _batch(99),
        optimizer=opt,
        scheduler=sched,
        scaler=huge,
        precision="fp16",
        device=CUDA,
        grad_clip=0.0,
    )
    assert ok and huge.get_scale() == 2.0**39
    for b, p in zip(before, task.parameters(), strict=True):
        assert torch.equal(b, p)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_autocast_runs_encoders_low_and_the_loss_in_fp32(precision: str) -> None:
    torch.manual_seed(0)
    proj = nn.Linear(16, 8).to(CUDA)
    loss = build_loss(LossCfg(pm_hidden=0), student_dim=8, teacher_dim=8).to(CUDA)
    x, y = torch.randn(6, 16, device=CUDA), torch.randn(6, 16, device=CUDA)
    t_img, t_txt = (F.normalize(torch.randn(6, 8, device=CUDA), dim=-1) for _ in range(2))
    scale = torch.tensor(math.log(1 / 0.07), device=CUDA)
    with autocast_context(precision, CUDA):
        img, txt = proj(x), proj(y)
        assert img.dtype == (torch.bfloat16 if precision == "bf16" else torch.float16)
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        out = loss(img, txt, scale, t_img, t_txt, generator=torch.Generator(CUDA).manual_seed(0))
    plain = loss(
        img.float(), txt.float(), scale, t_img, t_txt, generator=torch.Generator(CUDA).manual_seed(0)
    )
    for key, value in plain.items():
        assert out[key].dtype == torch.float32, key
        torch.testing.assert_close(out[key].detach(), value.detach(), rtol=1e-5, atol=1e-5, msg=key)
    out["loss"].backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0


def test_pm_sampling_on_cuda_generators() -> None:
    sim = torch.randn(12, 12, device=CUDA)
    sim.fill_diagonal_(5.0)  # the positive is the most similar: it must still never be drawn
    a = sample_negatives(sim, k=4, mode="hard", scale=3.0, generator=torch.Generator(CUDA).manual_seed(1))
    b = sample_negatives(sim, k=4, mode="hard", scale=3.0, generator=torch.Generator(CUDA).manual_seed(1))
    assert a.device.type == "cuda" and torch.equal(a, b)
    for i, row in enumerate(a.tolist()):
        assert i not in row and len(set(row)) == 4
    # a CPU generator with CUDA similarities: drawn on the CPU, returned on CUDA, the same as an all-CPU draw
    c = sample_negatives(sim, k=4, mode="hard", scale=3.0, generator=torch.Generator().manual_seed(1))
    d = sample_negatives(sim.cpu(), k=4, mode="hard", scale=3.0, generator=torch.Generator().manual_seed(1))
    assert c.device.type == "cuda" and torch.equal(c.cpu(), d)
    # hard draws follow the similarity: with a peaked row the hardest wrong column dominates
    peaked = torch.zeros(6, 6, device=CUDA)
    hardest = [(i + 2) % 6 for i in range(6)]
    for i in range(6):
        peaked[i, i], peaked[i, hardest[i]] = 1.0, 0.9
    idx = sample_negatives(
        peaked, k=1, mode="hard", scale=1000.0, generator=torch.Generator(CUDA).manual_seed(0)
    )
    assert idx[:, 0].tolist() == hardest
