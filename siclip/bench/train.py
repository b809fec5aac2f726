"""``siclip bench train``: Ray Train's overhead and 2-worker scaling, side by side in one run.

Three runs of the same model, loss, data and global batch: the Ray-free loop in this process (plain
PyTorch), the same loop under a 1-worker ``TorchTrainer``, and under 2 workers (gloo on CPU). Each run
checkpoints at the same steps. Throughput is measured after a warm-up interval from the loop's own step
timer, so the ratio is per-step overhead; the fixed cost of starting ``fit()`` is reported separately.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from siclip.config import SiclipCfg, replace
from siclip.eval.tables import save_table

__all__ = ["format_table", "run_bench_train"]


def _steps_per_s(rows: list[dict[str, float]], *, log_every: int) -> float:
    """Steps/s over every logged interval but the first (warm-up)."""
    timed = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r][1:]
    if not timed:
        return float("nan")
    return len(timed) * log_every / sum(t * log_every for t in timed)


def _plain_loop(cfg: SiclipCfg, max_steps: int) -> tuple[float, float]:
    from siclip.train.checkpoint import save_checkpoint
    from siclip.train.loop import LoopHooks, LoopState, build_optimizer, build_scheduler, run_loop
    from siclip.train.memory_format import place
    from siclip.train.worker import build_batches, build_task

    started = time.perf_counter()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    task, _ = build_task(cfg)
    place(task, "cpu")
    optimizer = build_optimizer(task, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, max_steps)
    batches = build_batches(cfg, rank=0, world_size=1, epoch_offset=0, with_teacher=task.teacher is not None)
    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:

        def on_checkpoint(step: int, metrics: dict[str, float]) -> None:
            counters = {"step": step, "bad_steps": 0, "samples_seen": 0}
            save_checkpoint(
                Path(tmp) / f"ckpt_{step}",
                task=task,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=None,
                counters=counters,
            )

        hooks = LoopHooks(on_log=lambda step, m: rows.append(m), on_checkpoint=on_checkpoint)
        run_loop(
            task,
            batches,
            optimizer=optimizer,
            scheduler=scheduler,
            state=LoopState(),
            max_steps=max_steps,
            device=torch.device("cpu"),
            log_every=cfg.train.log_every,
            ckpt_every=cfg.train.ckpt_every,
            hooks=hooks,
        )
    return _steps_per_s(rows, log_every=cfg.train.log_every), time.perf_counter() - started


def _ray_run(cfg: SiclipCfg) -> tuple[float, float]:
    from siclip.train.launch import launch
    from siclip.train.worker import read_metrics

    started = time.perf_counter()
    result = launch(cfg)
    wall = time.perf_counter() - started
    rows = read_metrics(result.run_dir)
    return _steps_per_s(rows, log_every=cfg.train.log_every), wall


def run_bench_train(
    *,
    root: str = "runs/bench_train",
    steps: int = 60,
    batch: int = 64,
    out: str | None = "benchmarks/train.md",
) -> tuple[dict[str, Any], str]:
    """Plain loop vs 1-worker TorchTrainer vs 2 workers on the tiny demo teacher; returns (result, table)."""
    from siclip.data.demo_world import generate_demo_world
    from siclip.demo import demo_config

    world = generate_demo_world(
        Path(root) / "world", n_web=1000, n_clean=10, n_retrieval=10, n_zeroshot_per_class=1
    )
    shutil.rmtree(Path(root) / "runs", ignore_errors=True)
    base = demo_config(
        "demo_teacher",
        root=root,
        overrides=[
            f"data.train_shards={json.dumps(world.web_shards)}",
            f"data.batch_size={batch}",
            f"train.max_steps={steps}",
            "train.log_every=10",
            f"train.ckpt_every={steps // 2}",
            "train.eval_every=0",
            "train.progress=false",
            f"train.runs_dir={root}/runs",
            "eval.zeroshot_dir=''",
            "eval.retrieval_shards=[]",
        ],
    )
    plain_sps, plain_wall = _plain_loop(base, steps)
    one_sps, one_wall = _ray_run(replace(base, train=replace(base.train, run_name="one-worker")))
    two = replace(base, train=replace(base.train, run_name="two-workers", num_workers=2, cpus_per_worker=1.0))
    two_sps, two_wall = _ray_run(two)
    result = {
        "model": base.model.name,
        "global_batch": batch,
        "steps": steps,
        "rows": {
            "plain PyTorch loop": {"steps_per_s": plain_sps, "wall_s": plain_wall},
            "TorchTrainer, 1 worker": {"steps_per_s": one_sps, "wall_s": one_wall},
            "TorchTrainer, 2 workers (gloo)": {"steps_per_s": two_sps, "wall_s": two_wall},
        },
        "ratio_trainer_over_plain": one_sps / plain_sps,
        "scaling_2_over_1": two_sps / one_sps,
    }
    table = format_table(result)
    save_table(table, out)
    return result, table


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"# Training overhead: {result['model']}, global batch {result['global_batch']}, {result['steps']} steps",
        "",
        "Produced by `siclip bench train` on this machine (2 CPU cores, shared; no GPU). Steps/s after a warm-up "
        "interval, measured by the loop's own timer; each run checkpoints at the same steps. Wall time includes "
        "building the model and, for Ray, starting `fit()`.",
        "",
        "| run | steps/s | wall s |",
        "|---|---:|---:|",
    ]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['steps_per_s']:.3f} | {row['wall_s']:.1f} |")
    lines += [
        "",
        f"TorchTrainer / plain loop steps/s: **{result['ratio_trainer_over_plain']:.3f}**; "
        f"2 workers / 1 worker: **{result['scaling_2_over_1']:.3f}** (same 2 cores, so no speed-up is expected)",
    ]
    return "\n".join(lines)
