"""Checkpoint round trips on a real tiny SiclipTask: bit-identical next steps, shared tensors, RNG states.

The task is the tiny student (its last stage's two SAS-P blocks share one Q/K tensor) with every loss term on
(stored teacher embeddings in the batch, so KD runs without a teacher model) and PM drawing its hard negatives
from torch's global RNG, so a checkpoint that forgets the RNG, a loss temperature, the optimizer's moments or
the scheduler's position changes the next steps.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

from siclip.config import LossCfg, ModelCfg, OptimCfg
from siclip.losses.total import build_loss
from siclip.models.build import build_student
from siclip.task import SiclipTask
from siclip.train.checkpoint import MODEL_FILE, load_checkpoint, save_checkpoint
from siclip.train.loop import LoopState, build_optimizer, build_scheduler, run_loop

SHARED = (
    "student.visual.trunk.stages.2.blocks.0.attn.qk.weight",
    "student.visual.trunk.stages.2.blocks.1.attn.qk.weight",
)
OPTIM = OptimCfg(lr=2e-3, weight_decay=0.1, warmup_steps=2, schedule="cosine", grad_clip=1.0)
STEPS = 4  # two before the checkpoint, two after


def make_task() -> tuple[SiclipTask, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    student, _ = build_student(ModelCfg(name="tiny-student"))
    loss = build_loss(
        LossCfg(pm_negatives="hard", pm_negatives_per_anchor=2, learn_temperatures=True),
        student_dim=64,
        teacher_dim=64,
    )
    task = SiclipTask(student, loss)
    opt = build_optimizer(task, OPTIM)
    return task, opt, build_scheduler(opt, OPTIM, STEPS)


def make_batches(n: int, *, size: int = 4) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(n):
        text = torch.randint(1, 100, (size, 32), generator=g)
        text[:, -1] = 1000  # open_clip pools at the argmax token
        out.append(
            {
                "image": torch.rand(size, 3, 32, 32, generator=g),  # the trunk takes any multiple of 32
                "text": text,
                "teacher_image_emb": F.normalize(torch.randn(size, 64, generator=g), dim=-1),
                "teacher_text_emb": F.normalize(torch.randn(size, 64, generator=g), dim=-1),
            }
        )
    return out


def train(task, opt, sched, data, *, start: int, stop: int) -> list[float]:
    losses: list[float] = []
    run_loop(
        task,
        iter(data),
        optimizer=opt,
        scheduler=sched,
        state=LoopState(step=start),
        max_steps=stop,
        device=torch.device("cpu"),
        log_every=1,
        hooks=_hooks(losses),
    )
    return losses


def _hooks(losses: list[float]) -> Any:
    from siclip.train.loop import LoopHooks

    return LoopHooks(on_log=lambda _step, m: losses.append(m["loss/total"]))


def test_a_restored_task_takes_bit_identical_next_steps(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = make_batches(STEPS)
    # straight through
    task_a, opt_a, sched_a = make_task()
    torch.manual_seed(7)
    losses_a = train(task_a, opt_a, sched_a, data, start=0, stop=STEPS)

    # two steps, checkpoint, the RNG moves on (as other work in the process would), restore into fresh objects
    task_b, opt_b, sched_b = make_task()
    torch.manual_seed(7)
    losses_b = train(task_b, opt_b, sched_b, data[:2], start=0, stop=2)
    save_checkpoint(
        tmp_path / "ckpt",
        task=task_b,
        optimizer=opt_b,
        scheduler=sched_b,
        scaler=None,
        counters={"step": 2, "bad_steps": 0, "samples_seen": 8},
    )
    torch.rand(100)
    task_c, opt_c, sched_c = make_task()
    with torch.no_grad():  # the fresh task must not already equal the checkpoint
        assert task_c.loss.crd is not None
        task_c.loss.crd.student_log_scale.add_(0.5)
    counters = load_checkpoint(tmp_path / "ckpt", task=task_c, optimizer=opt_c, scheduler=sched_c)
    assert counters == {"step": 2, "bad_steps": 0, "samples_seen": 8}
    losses_c = train(task_c, opt_c, sched_c, data[2:], start=2, stop=STEPS)

    assert losses_b + losses_c == losses_a  # exact floats, every step
    state_a, state_c = task_a.state_dict(), task_c.state_dict()
    assert state_a.keys() == state_c.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_c[key]), key
    for group_a, group_c in zip(
        opt_a.state_dict()["state"].values(), opt_c.state_dict()["state"].values(), strict=True
    ):
        for key in group_a:
            assert torch.equal(torch.as_tensor(group_a[key]), torch.as_tensor(group_c[key])), key
    assert sched_a.state_dict()["last_epoch"] == sched_c.state_dict()["last_epoch"] == STEPS


def test_shared_qk_is_stored_once_and_shares_storage_after_reload(tmp_path: Path) -> None:
    task, opt, sched = make_task()
    params = dict(task.named_parameters(remove_duplicate=False))
    assert params[SHARED[0]] is params[SHARED[1]]
    save_checkpoint(
        tmp_path / "c", task=task, optimizer=opt, scheduler=sched, scaler=None, counters={"step": 0}
    )
    with safe_open(str(tmp_path / "c" / MODEL_FILE), framework="pt") as f:
        assert sum(k in SHARED for k in f.keys()) == 1  # noqa: SIM118
    fresh, opt2, sched2 = make_task()
    load_checkpoint(tmp_path / "c", task=fresh, optimizer=opt2, scheduler=sched2)
    a, b = (dict(fresh.named_parameters(remove_duplicate=False))[k] for k in SHARED)
    assert a is b and a.data_ptr() == b.data_ptr()
    assert torch.equal(a, params[SHARED[0]])
    # one optimizer entry for the shared tensor, and a step moves both blocks together
    assert sum(p is a for g in opt2.param_groups for p in g["params"]) == 1
    with torch.no_grad():
        a.add_(1.0)
    assert torch.equal(a, b)


def test_every_global_rng_resumes_where_it_was_saved(tmp_path: Path) -> None:
    task, opt, sched = make_task()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    save_checkpoint(
        tmp_path / "c", task=task, optimizer=opt, scheduler=sched, scaler=None, counters={"step": 0}
    )

    def draws() -> tuple[float, float, float, float, float]:
        return (
            random.random(),
            random.gauss(0, 1),
            float(np.random.rand()),
            float(np.random.randn()),
            float(torch.rand(())),
        )

    want = draws()  # saving did not advance any generator
    draws()
    load_checkpoint(tmp_path / "c", task=task)
    assert draws() == want
