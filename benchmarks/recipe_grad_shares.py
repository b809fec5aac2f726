"""Gradient shares per loss term on the demo student, with the old and the current recipe (in-process, no Ray).

    PYTHONPATH=. python benchmarks/recipe_grad_shares.py [OUT_DIR [VARIANT ...]]   (docs/RECIPE.md's table)


A quick demo world, a tiny teacher trained in-process on clean + web (CLIP loss), then the student on the
first web shard (web captions only), each variant measured at steps 0, 10 and 20 (term_gradient_norms over
the student's trainable parameters, the same function train.grad_share_every uses)."""
import json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from siclip.demo import DEMO_SIZES, demo_config
from siclip.data.demo_world import generate_demo_world
from siclip.task import build_batches, build_task
from siclip.train.loop import build_optimizer, build_scheduler, run_loop, LoopState, LoopHooks
from siclip.train.grad_share import term_gradient_norms, format_shares
from siclip.train.checkpoint import save_student

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/grad_shares")
world = generate_demo_world(root / "world", **DEMO_SIZES["quick"]["world"])
teacher_file = root / "teacher" / "final" / "model.safetensors"
dev = torch.device("cpu")
if not teacher_file.is_file():
    t0 = time.time()
    tcfg = demo_config("demo_teacher", root=str(root), overrides=[
        f"data.train_shards=[{','.join(map(str, [*world.clean_shards, *world.web_shards]))}]",
        "data.synthetic=off", "data.loader_workers=0", "train.max_steps=80", "optim.warmup_steps=10"])
    torch.manual_seed(0)
    task, _ = build_task(tcfg)
    opt = build_optimizer(task, tcfg.optim)
    sch = build_scheduler(opt, tcfg.optim, 80)
    batches = iter(build_batches(tcfg, rank=0, world_size=1, epoch_offset=0, with_teacher=False))
    run_loop(task, batches, optimizer=opt, scheduler=sch, state=LoopState(), max_steps=80, device=dev,
             grad_clip=1.0, log_every=20, hooks=LoopHooks(on_log=lambda s, m: print("teacher", s, round(m["loss/total"], 3), flush=True)))
    save_student(task.student, teacher_file.parent)
    print(f"teacher {time.time()-t0:.0f}s", flush=True)

base = [f"data.train_shards=[{world.web_shards[0]}]", "data.synthetic=off", "data.loader_workers=0",
        f"model.source={teacher_file}", f"teacher.source={teacher_file}", "train.max_steps=20"]
VARIANTS = {
    "siclip before": ["loss.fd_reference_dim=0"],
    "siclip after": [],
    # what the shipped 'paper' table ran: the demo's sasp keys won, CRD at the teacher's own scale, FD at D=64
    "paper before": ["profile=paper", "model.sasp.share=qk", "model.sasp.qk_init=inherit", "model.sasp.inherit_mlp=false",
                     "loss.crd_teacher_scale=teacher", "loss.fd_reference_dim=0", "optim.beta2=0.98", "optim.eps=1e-6",
                     "optim.loss_group=by_shape", "model.sasp.mlp_init=torch"],
    "paper after": ["profile=paper"],
}
variants = sys.argv[2:] or list(VARIANTS)
out = {}
for name in variants:
    cfg = demo_config("demo", root=str(root), overrides=[*base, *VARIANTS[name]])
    torch.manual_seed(0)
    task, _ = build_task(cfg)
    params = [p for p in task.student.parameters() if p.requires_grad]
    opt = build_optimizer(task, cfg.optim)
    sch = build_scheduler(opt, cfg.optim, 20)
    batches = iter(build_batches(cfg, rank=0, world_size=1, epoch_offset=0, with_teacher=True))
    from siclip.train.grad_share import GradShare
    shares = {}
    first = next(batches)
    s0 = term_gradient_norms(task, first, params)
    shares[0] = {k.split("/")[1]: v for k, v in s0.items() if k.startswith("grad_share/")}
    def on_log(step, m):
        g = {k.split("/")[1]: v for k, v in m.items() if k.startswith("grad_share/")}
        if g:
            shares[step] = g
    import itertools
    run_loop(task, itertools.chain([first], batches), optimizer=opt, scheduler=sch, state=LoopState(), max_steps=20,
             device=dev, grad_clip=cfg.optim.grad_clip, log_every=10, hooks=LoopHooks(on_log=on_log),
             grad_share=GradShare(every=10, model=task, params=params))
    out[name] = shares
    print(name, {s: format_shares(v) for s, v in shares.items()}, flush=True)
(root / "shares.json").write_text(json.dumps(out, indent=1))
