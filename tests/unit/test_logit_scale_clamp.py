"""Trained logit scales are clamped as parameters after the optimizer step (open_clip's convention), not in
the loss's forward pass: a scale pushed past the cap comes back under it, and at the cap it keeps its gradient."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from siclip.config import LossCfg, from_dict
from siclip.losses.total import build_loss
from siclip.models.presets import build_preset, build_tokenizer
from siclip.task import SiclipTask
from siclip.train.loop import build_optimizer, build_scheduler, train_step

torch.set_num_threads(1)
CAP = math.log(100.0)


def _task() -> tuple[SiclipTask, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    student = build_preset("tiny-student")
    cfg = LossCfg(pm_weight=0.0, fd_weight=0.0, crd_student_scale="own", icl_scale="exp")
    task = SiclipTask(student, build_loss(cfg, student_dim=64, teacher_dim=64))
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(4, 3, 64, 64, generator=g),
        "text": build_tokenizer("tiny-student")(["a red circle", "a blue square", "one star", "two dots"]),
        "teacher_image_emb": F.normalize(torch.randn(4, 64, generator=g), dim=-1),
        "teacher_text_emb": F.normalize(torch.randn(4, 64, generator=g), dim=-1),
    }
    return task, batch


def _scales(task: SiclipTask) -> dict[str, torch.nn.Parameter]:
    loss: Any = task.loss
    student: Any = task.student
    return {
        "clip": student.logit_scale,
        "crd": loss.crd.student_log_scale,
        "icl": loss.icl.log_scale,
    }


def test_scales_pushed_past_the_cap_come_back_under_it_after_a_step() -> None:
    task, batch = _task()
    with torch.no_grad():
        for p in _scales(task).values():
            p.fill_(CAP + 1.0)  # as if the last step had pushed them to 272
    task.train()
    out = task(batch)
    grads = torch.autograd.grad(out["loss"], list(_scales(task).values()))
    assert all(float(g) != 0.0 for g in grads)  # above the cap they still learn (a forward clamp gives 0)
    optim = from_dict({"optim": {"lr": 1e-4, "warmup_steps": 0}}).optim
    opt = build_optimizer(task, optim)
    ok, _ = train_step(
        task,
        batch,
        optimizer=opt,
        scheduler=build_scheduler(opt, optim, 10),
        scaler=None,
        precision="fp32",
        device=torch.device("cpu"),
        grad_clip=1.0,
    )
    assert ok
    for name, p in _scales(task).items():
        assert float(p.detach()) <= CAP + 1e-6, name
        assert float(p.detach().exp()) <= 100.0 + 1e-4, name


def test_a_scale_above_the_cap_at_the_start_is_clamped_when_the_task_is_built() -> None:
    student: Any = build_preset("tiny-student")
    with torch.no_grad():
        student.logit_scale.fill_(CAP + 2.0)
    SiclipTask(student, build_loss(LossCfg(pm_weight=0.0), student_dim=64, teacher_dim=None))
    assert float(student.logit_scale.detach()) == pytest.approx(CAP, abs=1e-6)


@pytest.mark.parametrize("term", ["clip", "crd", "icl"])
def test_gradient_at_the_cap_matches_finite_differences(term: str) -> None:
    weights = {"clip_weight": 0.0, "fd_weight": 0.0, "crd_weight": 0.0, "icl_weight": 0.0, "pm_weight": 0.0}
    weights[f"{term}_weight"] = 1.0
    loss = build_loss(LossCfg(**weights, crd_student_scale="own"), student_dim=8, teacher_dim=8).double()
    g = torch.Generator().manual_seed(0)
    si, st, ti, tt = (
        F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=-1) for _ in range(4)
    )
    own = {"crd": getattr(loss.crd, "student_log_scale", None), "icl": getattr(loss.icl, "log_scale", None)}
    clip_log = torch.tensor(CAP, dtype=torch.float64, requires_grad=True)
    scale = clip_log if term == "clip" else own[term]
    assert scale is not None
    with torch.no_grad():
        scale.fill_(CAP)

    def value() -> float:
        return float(loss(si, st, clip_log, ti, tt)["loss"].detach())

    out = loss(si, st, clip_log, ti, tt)["loss"]
    (grad,) = torch.autograd.grad(out, [scale])
    eps = 1e-3  # the loss runs in fp32
    with torch.no_grad():
        scale.fill_(CAP + eps)
    up = value()
    with torch.no_grad():
        scale.fill_(CAP - eps)
    down = value()
    numeric = (up - down) / (2 * eps)
    assert abs(numeric) > 1e-4  # the loss does depend on the scale here: the check is not vacuous
    assert float(grad) == pytest.approx(numeric, rel=1e-3)
