"""Gradient shares per loss term on the demo student, with the old and the current recipe (in-process, no Ray).

    PYTHONPATH=. python benchmarks/recipe_grad_shares.py [OUT_DIR [VARIANT ...]]   (docs/RECIPE.md's table)


A quick demo world, a tiny teacher trained in-process on clean + web (CLIP loss), then the student on the
first web shard (web captions only), each variant measured at steps 0, 10 and 20 (term_gradient_norms over
the student's trainable parameters, the same function train.grad_share_every uses)."""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from siclip.data.demo_world import generate_demo_world
from siclip.demo import DEMO_SIZES, demo_config
from siclip.task import build_batches, build_task
from siclip.train.checkpoint import save_student
from siclip.train.grad_share import GradShare, format_shares, term_gradient_norms
from siclip.train.loop import LoopHooks, LoopState, build_optimizer, build_scheduler, run_loop

DEVICE = torch.device("cpu")
VARIANTS = {
    "siclip before": ["loss.fd_reference_dim=0"],
    "siclip after": [],
    # what the shipped 'paper' table ran: the demo's sasp keys won, CRD at the teacher's own scale, FD at D=64
    "paper before": [
        "profile=paper",
        "model.sasp.share=qk",
        "model.sasp.qk_init=inherit",
        "model.sasp.inherit_mlp=false",
        "loss.crd_teacher_scale=teacher",
        "loss.fd_reference_dim=0",
        "optim.beta2=0.98",
        "optim.eps=1e-6",
        "optim.loss_group=by_shape",
        "model.sasp.mlp_init=torch",
    ],
    "paper after": ["profile=paper"],
}


def train_teacher(root: Path, world: Any, teacher_file: Path) -> None:
    """The tiny teacher: 80 steps on clean + web shards (CLIP loss), saved to ``teacher_file``."""
    t0 = time.time()
    tcfg = demo_config(
        "demo_teacher",
        root=str(root),
        overrides=[
            f"data.train_shards=[{','.join(map(str, [*world.clean_shards, *world.web_shards]))}]",
            "data.synthetic=off",
            "data.loader_workers=0",
            "train.max_steps=80",
            "optim.warmup_steps=10",
        ],
    )
    torch.manual_seed(0)
    task, _ = build_task(tcfg)
    opt = build_optimizer(task, tcfg.optim)
    sch = build_scheduler(opt, tcfg.optim, 80)
    batches = iter(build_batches(tcfg, rank=0, world_size=1, epoch_offset=0, with_teacher=False))
    run_loop(
        task,
        batches,
        optimizer=opt,
        scheduler=sch,
        state=LoopState(),
        max_steps=80,
        device=DEVICE,
        grad_clip=1.0,
        log_every=20,
        hooks=LoopHooks(on_log=lambda s, m: print("teacher", s, round(m["loss/total"], 3), flush=True)),
    )
    save_student(task.student, teacher_file.parent)
    print(f"teacher {time.time() - t0:.0f}s", flush=True)


def measure(root: Path, base: list[str], overrides: list[str]) -> dict[int, dict[str, float]]:
    """One variant's shares at steps 0, 10 and 20 of a 20-step student run."""
    cfg = demo_config("demo", root=str(root), overrides=[*base, *overrides])
    torch.manual_seed(0)
    task, _ = build_task(cfg)
    params = [p for p in task.student.parameters() if p.requires_grad]
    opt = build_optimizer(task, cfg.optim)
    sch = build_scheduler(opt, cfg.optim, 20)
    batches = iter(build_batches(cfg, rank=0, world_size=1, epoch_offset=0, with_teacher=True))
    shares: dict[int, dict[str, float]] = {}
    first = next(batches)
    s0 = term_gradient_norms(task, first, params)
    shares[0] = {k.split("/")[1]: v for k, v in s0.items() if k.startswith("grad_share/")}

    def on_log(step: int, m: dict[str, float]) -> None:
        g = {k.split("/")[1]: v for k, v in m.items() if k.startswith("grad_share/")}
        if g:
            shares[step] = g

    run_loop(
        task,
        itertools.chain([first], batches),
        optimizer=opt,
        scheduler=sch,
        state=LoopState(),
        max_steps=20,
        device=DEVICE,
        grad_clip=cfg.optim.grad_clip,
        log_every=10,
        hooks=LoopHooks(on_log=on_log),
        grad_share=GradShare(every=10, model=task, params=params),
    )
    return shares


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    root = Path(argv[0] if argv else "runs/grad_shares")
    world = generate_demo_world(root / "world", **DEMO_SIZES["quick"]["world"])
    teacher_file = root / "teacher" / "final" / "model.safetensors"
    if not teacher_file.is_file():
        train_teacher(root, world, teacher_file)
    base = [
        f"data.train_shards=[{world.web_shards[0]}]",
        "data.synthetic=off",
        "data.loader_workers=0",
        f"model.source={teacher_file}",
        f"teacher.source={teacher_file}",
        "train.max_steps=20",
    ]
    out = {}
    for name in argv[1:] or list(VARIANTS):
        shares = measure(root, base, VARIANTS[name])
        out[name] = shares
        print(name, {s: format_shares(v) for s, v in shares.items()}, flush=True)
    (root / "shares.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
