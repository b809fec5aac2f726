"""GPU training benchmark: SiCLIP-S0 with weight inheritance vs MobileCLIP-S0 full fine-tuning.

The question it answers is the paper's premise: does freezing the inherited backbone and training only the
SAS-P blocks let batch 1536 fit on one 24 GB GPU, and how fast is it next to fine-tuning every parameter
of MobileCLIP-S0 with the same loss and data? Both runs use the project's own training step
(:func:`siclip.train.loop.train_step` on a :class:`siclip.task.SiclipTask`: WIKD + PM loss, real and
synthetic captions, mixed precision, AdamW, gradient clipping) on random 256 px images and random tokens
made on the device, so the numbers measure the model and the step, not a data pipeline. A run that does
not fit is retried at half the batch until it does; the table says which batch each row used.

Teacher embeddings come "stored" by default (random unit vectors in the batch, like the shards'
``npz`` that ``teacher.use_shard_embeddings`` reads), so no teacher forward runs; ``--teacher forward``
adds a frozen teacher pass, ``--teacher none`` trains without the KD terms.

Run on a GPU machine (``benchmarks/gpu_check.sh`` does the setup)::

    python -m siclip.bench.gpu --batch 1536 --steps 300 --out benchmarks/gpu.md

and on a CPU with the tiny presets (what the unit test runs)::

    python -m siclip.bench.gpu --model tiny-student --batch 8 --steps 3 --warmup 1 --out ''

Random weights throughout: speed and memory do not depend on the values, and no download is needed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from siclip.eval.markdown_tables import save_table

__all__ = ["format_table", "main", "measure_training", "run_bench_gpu", "synthetic_batch"]

MiB = 1024 * 1024
TeacherMode = Literal["stored", "forward", "none"]


def synthetic_batch(
    *,
    batch: int,
    image_size: int,
    context_length: int,
    teacher_dim: int | None,
    synthetic_captions: bool,
    device: torch.device,
    vocab_size: int = 49408,
) -> dict[str, torch.Tensor]:
    """Random images in [0, 1), random token ids ending in the end-of-text id, optional teacher embeddings."""
    images = torch.rand(batch, 3, image_size, image_size, device=device)

    def tokens() -> torch.Tensor:
        t = torch.randint(1, vocab_size - 1, (batch, context_length), device=device)
        t[:, -1] = vocab_size - 1  # open_clip pools at the argmax token: the end-of-text id
        return t

    out = {"image": images, "text": tokens()}
    if synthetic_captions:
        out["syn_text"] = tokens()
    if teacher_dim is not None:
        keys = ["teacher_image_emb", "teacher_text_emb"] + (["teacher_syn_emb"] if synthetic_captions else [])
        for key in keys:
            out[key] = torch.nn.functional.normalize(torch.randn(batch, teacher_dim, device=device), dim=-1)
    return out


def _build_task(model: str, *, frozen: bool, teacher: str, teacher_mode: TeacherMode) -> Any:
    """Student (frozen inherited backbone, or every parameter trainable), loss and optional teacher."""
    from siclip.config import LossCfg, ModelCfg, TeacherCfg
    from siclip.losses.total import build_loss
    from siclip.models.build import build_student, build_teacher
    from siclip.models.inherit import freeze_inherited
    from siclip.models.presets import preset_info
    from siclip.task import SiclipTask

    # No source file: inheritance would only change the values, and freezing is what changes the cost.
    student, _ = build_student(ModelCfg(name=model, source="", inherit=False, freeze_inherited=False))
    if frozen:
        freeze_inherited(student)
    loss_cfg = LossCfg()
    logit_scale = student.logit_scale
    assert isinstance(logit_scale, torch.Tensor)
    with torch.no_grad():
        logit_scale.fill_(math.log(1.0 / loss_cfg.init_temperature))
    teacher_dim = None if teacher_mode == "none" else preset_info(teacher).embed_dim
    loss = build_loss(loss_cfg, student_dim=preset_info(model).embed_dim, teacher_dim=teacher_dim)
    frozen_teacher = build_teacher(TeacherCfg(name=teacher, source="")) if teacher_mode == "forward" else None
    return SiclipTask(student, loss, frozen_teacher)


def measure_training(
    task: Any,
    *,
    batch: int,
    steps: int,
    warmup: int,
    precision: str,
    device: torch.device,
    image_size: int,
    context_length: int,
    teacher_dim: int | None,
    synthetic_captions: bool = True,
) -> dict[str, float]:
    """Train ``task`` for ``warmup + steps`` steps; samples/s over the timed steps and peak device memory."""
    from siclip.config import OptimCfg
    from siclip.train.loop import build_optimizer, build_scheduler, train_step
    from siclip.train.memory_format import place

    place(task, device)
    task.train()
    optim_cfg = OptimCfg(warmup_steps=0, schedule="constant")
    optimizer = build_optimizer(task, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, warmup + steps)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    bad = 0
    started = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        data = synthetic_batch(
            batch=batch,
            image_size=image_size,
            context_length=context_length,
            teacher_dim=teacher_dim,
            synthetic_captions=synthetic_captions,
            device=device,
        )
        ok, _ = train_step(
            task,
            data,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            precision=precision,
            device=device,
            grad_clip=1.0,
        )
        bad += not ok
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    out = {
        "batch": float(batch),
        "samples_per_s": batch * steps / elapsed,
        "step_time_s": elapsed / steps,
        "trainable_params": float(trainable),
        "total_params": float(sum(p.numel() for p in task.student.parameters())),
        "bad_steps": float(bad),
    }
    if cuda:
        out["peak_allocated_mib"] = torch.cuda.max_memory_allocated(device) / MiB
        out["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / MiB
    return out


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_fitting(
    model: str,
    *,
    frozen: bool,
    batch: int,
    teacher: str,
    teacher_mode: TeacherMode,
    **kwargs: Any,
) -> dict[str, Any]:
    """``measure_training`` at ``batch``, halving it after every out-of-memory error."""
    from siclip.models.presets import preset_info

    info = preset_info(model)
    device: torch.device = kwargs["device"]
    tried: list[int] = []
    while batch >= 1:
        tried.append(batch)
        task = None
        try:
            torch.manual_seed(0)
            task = _build_task(model, frozen=frozen, teacher=teacher, teacher_mode=teacher_mode)
            row: dict[str, Any] = measure_training(
                task,
                batch=batch,
                image_size=info.image_size,
                context_length=info.context_length,
                teacher_dim=None if teacher_mode != "stored" else preset_info(teacher).embed_dim,
                **kwargs,
            )
            row["oom_at"] = tried[:-1]
            return row
        except torch.OutOfMemoryError:
            batch //= 2
        finally:
            # Drop the model, optimizer state and cached blocks before the next (smaller or other) run.
            task = None
            _release(device)
    return {"batch": 0.0, "oom_at": tried}


def run_bench_gpu(
    *,
    model: str = "siclip-s0",
    baseline: str | None = None,
    batch: int = 1536,
    baseline_batch: int | None = None,
    steps: int = 300,
    warmup: int = 20,
    precision: str = "auto",
    teacher: str | None = None,
    teacher_mode: TeacherMode = "stored",
    synthetic_captions: bool = True,
    device: str | None = None,
    out: str | None = "benchmarks/gpu.md",
) -> tuple[dict[str, Any], str]:
    """Weight inheritance (``model``, backbone frozen) vs full fine-tuning (``baseline``, all trainable).

    ``baseline`` and ``teacher`` default to ``model``'s base preset (``siclip-s0`` -> ``mobileclip-s0``).
    Returns the result dict and the markdown table, which is also written to ``out`` unless it is empty.
    """
    from siclip.models.presets import preset_info
    from siclip.train.loop import resolve_precision

    base = preset_info(model).base or model
    baseline = baseline or base
    teacher = teacher or base
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolved = resolve_precision(precision, dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    common = {
        "steps": steps,
        "warmup": warmup,
        "precision": resolved,
        "device": dev,
        "synthetic_captions": synthetic_captions,
    }
    rows = {
        f"{model}, weight inheritance (backbone frozen)": _run_fitting(
            model, frozen=True, batch=batch, teacher=teacher, teacher_mode=teacher_mode, **common
        ),
        f"{baseline}, full fine-tuning": _run_fitting(
            baseline,
            frozen=False,
            batch=baseline_batch or batch,
            teacher=teacher,
            teacher_mode=teacher_mode,
            **common,
        ),
    }
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "precision": resolved,
        "steps": steps,
        "warmup": warmup,
        "teacher": f"{teacher} ({teacher_mode})",
        "synthetic_captions": synthetic_captions,
        "rows": rows,
    }
    table = format_table(result)
    save_table(table, out)
    return result, table


def format_table(result: dict[str, Any]) -> str:
    """The markdown table written to ``benchmarks/gpu.md``."""
    lines = [
        f"# Training throughput and memory on {result['device']}",
        "",
        "Produced by `benchmarks/gpu_check.sh` (`python -m siclip.bench.gpu`): random weights, random "
        f"images and tokens made on the device, WIKD + PM loss with teacher embeddings {result['teacher']}, "
        f"{'real + synthetic captions, ' if result['synthetic_captions'] else ''}"
        f"{'fp32' if result['precision'] == 'fp32' else result['precision'] + ' autocast'}, AdamW, "
        f"torch {result['torch']}; {result['warmup']} warm-up steps, "
        f"then {result['steps']} timed steps.",
        "",
        "Trainable parameters include the loss's own (PM head, projector, temperatures); the total is the "
        "student's.",
        "",
        "| run | batch | samples/s | step (s) | trainable params | peak allocated (MiB) | peak reserved (MiB) "
        "| out of memory at batch |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, row in result["rows"].items():
        if not row["batch"]:
            lines.append(f"| {label} | did not fit | | | | | | {row['oom_at']} |")
            continue
        peak = row.get("peak_allocated_mib")
        reserved = row.get("peak_reserved_mib")
        lines.append(
            f"| {label} | {int(row['batch'])} | {row['samples_per_s']:.1f} | {row['step_time_s']:.3f} | "
            f"{row['trainable_params'] / 1e6:.2f} M of {row['total_params'] / 1e6:.2f} M | "
            f"{'n/a' if peak is None else f'{peak:.0f}'} | {'n/a' if reserved is None else f'{reserved:.0f}'} | "
            f"{', '.join(str(b) for b in row['oom_at']) or '-'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m siclip.bench.gpu [--model ...] [--batch ...] ...``."""
    p = argparse.ArgumentParser(prog="python -m siclip.bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="siclip-s0", help="student preset, trained with its backbone frozen")
    p.add_argument("--baseline", default=None, help="fully fine-tuned preset (default: the model's base)")
    p.add_argument("--teacher", default=None, help="teacher preset (default: the model's base)")
    p.add_argument("--teacher-mode", choices=["stored", "forward", "none"], default="stored")
    p.add_argument("--batch", type=int, default=1536)
    p.add_argument("--baseline-batch", type=int, default=None, help="first batch tried for the baseline")
    p.add_argument("--steps", type=int, default=300, help="timed steps")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (cuDNN autotuning, allocator)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--no-synthetic", action="store_true", help="real captions only (no syn_text batch)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--out", default="benchmarks/gpu.md", help="markdown table path; '' writes none")
    p.add_argument("--json", default="", help="also write the raw result as JSON here")
    args = p.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batch and --steps must be >= 1, --warmup >= 0")
    result, table = run_bench_gpu(
        model=args.model,
        baseline=args.baseline,
        batch=args.batch,
        baseline_batch=args.baseline_batch,
        steps=args.steps,
        warmup=args.warmup,
        precision=args.precision,
        teacher=args.teacher,
        teacher_mode=args.teacher_mode,
        synthetic_captions=not args.no_synthetic,
        device=args.device,
        out=args.out or None,
    )
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
