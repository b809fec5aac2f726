"""``loss.schedule``: weights as a pure function of the step, each term's largest weight (which terms are
built), validation, resume, and zero-weight terms."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from siclip.config import ConfigError, LossCfg, LossStageCfg, OptimCfg, from_dict, load_config
from siclip.losses.schedule import max_weights, weights_at
from siclip.losses.total import WIKDLoss, build_loss
from siclip.train.loop import LoopHooks, LoopState, build_optimizer, build_scheduler, run_loop

torch.set_num_threads(1)

DS, DT, B = 4, 6, 5
STAGED = LossCfg(
    fd_weight=4000.0,
    crd_weight=1.0,
    icl_weight=1.0,
    pm_weight=0.0,
    schedule=(
        LossStageCfg(from_step=100, weights={"fd": 0.0, "icl": 0.0}),
        LossStageCfg(from_step=200, weights={"crd": 2.0}),
    ),
)


def test_weights_are_a_pure_function_of_the_step() -> None:
    base = {"clip": 1.0, "fd": 4000.0, "crd": 1.0, "icl": 1.0, "pm": 0.0}
    assert weights_at(STAGED, 0) == weights_at(STAGED, 99) == base
    assert weights_at(STAGED, 100) == weights_at(STAGED, 199) == {**base, "fd": 0.0, "icl": 0.0}
    # stages override the base weights, they do not accumulate: fd and icl are back at step 200
    assert weights_at(STAGED, 200) == weights_at(STAGED, 10**9) == {**base, "crd": 2.0}
    stage1 = {**base, "fd": 0.0, "icl": 0.0}
    assert [weights_at(STAGED, s) for s in (150, 50, 150)] == [stage1, base, stage1]  # no hidden state
    plain = LossCfg(clip_weight=0.5, fd_weight=2.0, crd_weight=0.0, icl_weight=3.0, pm_weight=0.25)
    assert weights_at(plain, 10**6) == {
        "clip": 0.5,
        "fd": 2.0,
        "crd": 0.0,
        "icl": 3.0,
        "pm": 0.25,
    }  # no stages


def test_max_weights_takes_every_stage_and_the_base() -> None:
    """What decides which terms the loss builds: a term on in any stage (or before the first) counts."""
    cfg = LossCfg(
        clip_weight=1.0,
        fd_weight=0.0,
        crd_weight=3.0,
        icl_weight=0.5,
        pm_weight=0.0,
        schedule=(
            LossStageCfg(from_step=10, weights={"fd": 2, "crd": 0.0}),
            LossStageCfg(from_step=20, weights={"pm": 0.25, "clip": 0.0}),
        ),
    )
    # fd and pm only come on in a stage, crd and clip only before one: all count
    assert max_weights(cfg) == {"clip": 1.0, "fd": 2.0, "crd": 3.0, "icl": 0.5, "pm": 0.25}
    assert max_weights(STAGED) == {"clip": 1.0, "fd": 4000.0, "crd": 2.0, "icl": 1.0, "pm": 0.0}


def test_schedule_loads_from_yaml_and_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.yaml"
    path.write_text(
        "loss:\n  pm_weight: 0.0\n  schedule:\n    - {from_step: 100, weights: {fd: 0, icl: 0}}\n"
        "    - {from_step: 200, weights: {crd: 2.0}}\n"
    )
    cfg = load_config(path, check_files=False)
    assert cfg.loss.schedule == STAGED.schedule
    assert (
        from_dict({"loss": {"schedule": [{"from_step": 5, "weights": {"pm": 1}}]}}).loss.schedule[0].from_step
        == 5
    )


@pytest.mark.parametrize(
    ("schedule", "needle"),
    [
        (
            "[{from_step: 10, weights: {fd: 0}}, {from_step: 10, weights: {crd: 1}}]",
            "loss.schedule[1].from_step: got 10",
        ),
        (
            "[{from_step: 10, weights: {kd: 0}}]",
            "loss.schedule[0].weights.kd: unknown term; allowed: clip, fd",
        ),
        ("[{from_step: 10, weights: {fd: -1}}]", "loss.schedule[0].weights.fd: got -1"),
        ("[{from_step: 10, weights: {fd: yes}}]", "loss.schedule[0].weights.fd: got True"),
        ("[{from_step: -1, weights: {}}]", "loss.schedule[0].from_step: got -1"),
        ("[{from: 10}]", "loss.schedule[0].from: unknown key"),
        ("{from_step: 10}", "loss.schedule: got {'from_step': 10}; expected a list"),
    ],
)
def test_bad_schedules_fail_at_load_with_one_line(schedule: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"loss.schedule={schedule}"], check_files=False)
    assert needle in str(err.value) and "\n" not in str(err.value)


def _batch(seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(F.normalize(torch.randn(B, d, generator=g), dim=1) for d in (DS, DS, DT, DT))


class EmbeddingTask(nn.Module):
    """Learnable student embeddings against fixed teacher embeddings, through the real WIKD loss."""

    def __init__(self, loss: WIKDLoss) -> None:
        super().__init__()
        self.loss = loss
        s_img, s_txt, self.t_img, self.t_txt = _batch(0)
        self.s_img, self.s_txt = nn.Parameter(s_img.clone()), nn.Parameter(s_txt.clone())
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.seen: list[set[str]] = []

    def forward(self, batch: dict[str, Tensor], *, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        out = self.loss(
            F.normalize(self.s_img, dim=1),
            F.normalize(self.s_txt, dim=1),
            self.logit_scale,
            self.t_img,
            self.t_txt,
        )
        self.seen.append({k[: -len("_loss")] for k in out if k.endswith("_loss")})
        return out


def _batches() -> Iterator[dict[str, Tensor]]:
    while True:
        yield {"x": torch.zeros(B, 1)}


def test_a_resumed_run_uses_the_stage_of_its_step() -> None:
    task = EmbeddingTask(build_loss(STAGED, student_dim=DS, teacher_dim=DT))
    cfg = OptimCfg(lr=0.01, warmup_steps=0)
    opt = build_optimizer(task, cfg)
    used: list[tuple[int, dict[str, float]]] = []

    def before_step(step: int) -> None:
        task.loss.set_step(step)
        used.append((step, dict(task.loss.weights)))

    # as after a resume from a checkpoint at step 190: the constructor's step-0 weights must not leak in
    run_loop(
        task,
        _batches(),
        optimizer=opt,
        scheduler=build_scheduler(opt, cfg, 205),
        state=LoopState(step=190),
        max_steps=205,
        device=torch.device("cpu"),
        hooks=LoopHooks(before_step=before_step),
    )
    assert [s for s, _ in used] == list(range(190, 205))
    assert all(w == weights_at(STAGED, s) for s, w in used)
    assert task.seen[0] == task.seen[9] == {"clip", "crd"}  # fd and icl off in stage 1
    assert task.seen[10] == {"clip", "fd", "crd", "icl"}  # step 200: stage 2
    assert task.loss.set_step(205) is None and task.loss.set_step(0) == weights_at(STAGED, 0)


def test_a_zero_weight_term_contributes_no_gradient() -> None:
    loss = build_loss(STAGED, student_dim=DS, teacher_dim=DT)
    assert (
        loss.fd is not None and loss.icl is not None and loss.projector is not None
    )  # built: on in some stage
    s_img, s_txt, t_img, t_txt = _batch(1)
    s_img.requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07))

    def grads(step: int) -> tuple[Tensor, Tensor | None]:
        loss.zero_grad()
        s_img.grad = None
        loss.set_step(step)
        out = loss(s_img, s_txt, log_scale, t_img, t_txt, keep_terms=True)
        out["loss"].backward()
        assert s_img.grad is not None
        return s_img.grad.clone(), loss.projector.image.weight.grad  # type: ignore[union-attr]

    g_stage1, proj_grad = grads(150)
    assert proj_grad is None  # the projector serves only FD and ICL, both at 0
    crd_only = build_loss(
        LossCfg(fd_weight=0.0, icl_weight=0.0, pm_weight=0.0), student_dim=DS, teacher_dim=DT
    )
    s_ref = s_img.detach().clone().requires_grad_()
    crd_only(s_ref, s_txt, log_scale, t_img, t_txt)["loss"].backward()
    torch.testing.assert_close(g_stage1, s_ref.grad)  # exactly the gradient of the terms that are on
    _, proj_grad = grads(0)
    assert proj_grad is not None and float(proj_grad.abs().sum()) > 0
