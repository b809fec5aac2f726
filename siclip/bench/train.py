"""``siclip bench train``: Ray Train's overhead and 2-worker scaling, and the CPU memory formats.

Three runs of the same model, loss, data and global batch: the Ray-free loop in this process (plain
PyTorch), the same loop under a 1-worker ``TorchTrainer``, and under 2 workers (gloo on CPU). Each run
checkpoints at the same steps. Throughput is measured after a warm-up interval from the loop's own step
timer, so the ratio is per-step overhead; the fixed cost of starting ``fit()`` is reported separately.

Then the CPU step time in NCHW vs channels-last, with this CPU's own oneDNN kernels and with the AVX2 ones
(``ONEDNN_MAX_CPU_ISA=AVX2``, as on an AVX2-only machine): each cell is a child process, so a kernel that
crashes is reported by its signal instead of ending the benchmark, and the rounds alternate the cells so a
busy machine slows them alike.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from siclip.config import SiclipCfg, replace
from siclip.eval.markdown_tables import save_table
from siclip.train.memory_format import exit_description

__all__ = ["format_formats_table", "format_table", "run_bench_formats", "run_bench_train"]

KERNELS = {"this CPU's": None, "AVX2 (ONEDNN_MAX_CPU_ISA=AVX2)": "AVX2"}
FORMATS = {"NCHW": "0", "channels-last": "1"}

# One cell: the demo student (SAS-P, inherited backbone frozen) and the tiny teacher trained from scratch
# (every weight, the stem included), random data, the memory format forced; prints {row: step seconds}.
_FORMAT_CELL = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[3]))
from siclip.bench.gpu import run_bench_gpu
result, _ = run_bench_gpu(model="tiny-student", batch=int(sys.argv[1]), steps=int(sys.argv[2]), warmup=2,
                          device="cpu", out=None)
print(json.dumps({("student" if "inheritance" in k else "teacher"): r["step_time_s"]
                  for k, r in result["rows"].items()}))
"""


def _steps_per_s(rows: list[dict[str, float]], *, log_every: int) -> float:
    """Steps/s over every logged interval but the first (warm-up)."""
    timed = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r][1:]
    if not timed:
        return float("nan")
    return len(timed) * log_every / sum(t * log_every for t in timed)


def _plain_loop(cfg: SiclipCfg, max_steps: int) -> tuple[float, float]:
    from siclip.task import build_batches, build_task
    from siclip.train.checkpoint import save_checkpoint
    from siclip.train.loop import LoopHooks, LoopState, build_optimizer, build_scheduler, run_loop
    from siclip.train.memory_format import place

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
    from siclip.train.metrics_table import read_metrics

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
    formats = run_bench_formats()
    result: dict[str, Any] = {
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
    result["formats"] = formats
    table = format_table(result) + "\n\n" + format_formats_table(formats)
    save_table(table, out)
    return result, table


def _format_cell(isa: str | None, force: str, *, batch: int, steps: int, threads: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
    env["SICLIP_CPU_CHANNELS_LAST"] = force
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    cmd = [sys.executable, "-c", _FORMAT_CELL, str(batch), str(steps), str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if done.returncode == 0:
        return {"ok": True, **json.loads(done.stdout.strip().splitlines()[-1])}
    return {"ok": False, "error": f"failed ({exit_description(done.returncode)})"}


def run_bench_formats(
    *, batch: int = 32, steps: int = 10, rounds: int = 2, threads: int | None = None
) -> dict[str, Any]:
    """CPU step time per (kernels, memory format): the fastest of ``rounds`` alternating child runs."""
    threads = threads or max(1, min(os.cpu_count() or 1, 2))
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for kernels, isa in KERNELS.items():
            for fmt, force in FORMATS.items():
                cell = _format_cell(isa, force, batch=batch, steps=steps, threads=threads)
                cells.setdefault((kernels, fmt), []).append(cell)
    rows: dict[str, dict[str, Any]] = {}
    for (kernels, fmt), runs in cells.items():
        good = [r for r in runs if r["ok"]]
        row = rows.setdefault(kernels, {})
        if len(good) < len(runs):
            row[fmt] = {"error": next(r["error"] for r in runs if not r["ok"])}
        else:
            row[fmt] = {m: min(r[m] for r in good) for m in ("student", "teacher")}
    return {"batch": batch, "steps": steps, "rounds": rounds, "threads": threads, "rows": rows}


def format_formats_table(result: dict[str, Any]) -> str:
    lines = [
        f"## CPU memory format: NCHW vs channels-last, batch {result['batch']}, {result['threads']} threads",
        "",
        "Seconds per training step (fastest of "
        f"{result['rounds']} alternating rounds of {result['steps']} timed steps after 2 warm-up steps; each "
        "cell a child process). Student: the demo student (SAS-P, inherited backbone frozen) with WIKD + PM; "
        "teacher: the tiny teacher trained from scratch (its stem's backward is the kernel that crashes). "
        "Training picks channels-last on CPU only when a child-process probe survives it.",
        "",
        "| oneDNN kernels | model | NCHW s/step | channels-last s/step | channels-last / NCHW |",
        "|---|---|---:|---:|---:|",
    ]
    for kernels, row in result["rows"].items():
        for model in ("student", "teacher"):
            nchw, cl = row["NCHW"], row["channels-last"]
            a = f"{nchw[model]:.3f}" if model in nchw else nchw["error"]
            b = f"{cl[model]:.3f}" if model in cl else cl["error"]
            ratio = f"{cl[model] / nchw[model]:.2f}" if model in nchw and model in cl else "-"
            lines.append(f"| {kernels} | {model} | {a} | {b} | {ratio} |")
    return "\n".join(lines)


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
