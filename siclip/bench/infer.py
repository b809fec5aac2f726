"""Inference throughput of image encoders, side by side in one process (``siclip bench infer``).

Each model is built from its preset (random weights: speed does not depend on them), reparameterised
(RepMixer/MobileOne branches fused), put in eval mode and run under ``torch.no_grad()`` with the same
thread count; for every batch size we time ``repeats`` forward passes per model (alternating models)
after one warm-up and keep the median. The paper's comparison is SiCLIP 39.5 vs MobileCLIP-S0 38.2 img/s (+3.4 %) on a Xeon Silver 4314
at batch 1000; on a small shared machine only the ratio between the two models means anything.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["bench_infer", "format_table", "write_table"]

DEFAULT_TABLE = Path("benchmarks/inference.md")


def _time_interleaved(
    encoders: dict[str, torch.nn.Module], *, batch: int, image_size: int, repeats: int, channels_last: bool
) -> dict[str, list[float]]:
    """Seconds per forward pass for each encoder, alternating encoders within every repeat."""
    x = torch.randn(batch, 3, image_size, image_size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {name: [] for name in encoders}
    with torch.no_grad():
        for enc in encoders.values():
            enc(x)  # warm-up: allocator, kernel selection
        for _ in range(repeats):
            for name, enc in encoders.items():
                start = time.perf_counter()
                enc(x)
                times[name].append(time.perf_counter() - start)
    return times


def image_gflops(encoder: torch.nn.Module, *, image_size: int) -> float:
    """Forward GFLOPs for one image (torch's FLOP counter: matmuls and convolutions), machine independent."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        encoder(torch.randn(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def bench_infer(
    models: tuple[str, ...] = ("siclip-s0", "mobileclip-s0"),
    *,
    image_size: int = 256,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    repeats: int = 5,
    threads: int | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Image-encoder images/s per model and batch size, and the ratio ``models[0] / models[1]``.

    Returns ``{"rows": [{"model", "batch", "seconds", "img_per_s", "best_img_per_s"}], "ratio": {batch: r},
    "best_ratio": {batch: r}, "gflops": {model: per-image forward GFLOPs}, ...settings}``.
    The models alternate within every repeat so slow drifts of a shared machine hit both alike; each row
    also keeps the best (minimum-time) rate, the least noisy estimate on a loaded machine.
    """
    from siclip.models.export import reparameterize
    from siclip.models.presets import build_preset

    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        encoders: dict[str, torch.nn.Module] = {}
        for name in models:
            tower: Any = build_preset(name).visual
            visual = reparameterize(tower, inplace=True)
            if channels_last:
                visual = visual.to(memory_format=torch.channels_last)
            encoders[name] = visual
        gflops = {name: image_gflops(enc, image_size=image_size) for name, enc in encoders.items()}
        rows: list[dict[str, Any]] = []
        for batch in batch_sizes:
            times = _time_interleaved(
                encoders, batch=batch, image_size=image_size, repeats=repeats, channels_last=channels_last
            )
            for name, secs in times.items():
                sec = statistics.median(secs)
                rows.append(
                    {"model": name, "batch": batch, "seconds": sec, "img_per_s": batch / sec,
                     "best_img_per_s": batch / min(secs)}
                )  # fmt: skip
        ratio: dict[int, float] = {}
        best_ratio: dict[int, float] = {}
        if len(models) >= 2:
            speed = {(r["model"], r["batch"]): r["img_per_s"] for r in rows}
            best = {(r["model"], r["batch"]): r["best_img_per_s"] for r in rows}
            ratio = {b: speed[(models[0], b)] / speed[(models[1], b)] for b in batch_sizes}
            best_ratio = {b: best[(models[0], b)] / best[(models[1], b)] for b in batch_sizes}
        return {
            "models": list(models),
            "image_size": image_size,
            "batch_sizes": list(batch_sizes),
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "channels_last": channels_last,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "rows": rows,
            "ratio": ratio,
            "best_ratio": best_ratio,
            "gflops": gflops,
        }
    finally:
        torch.set_num_threads(previous_threads)


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per batch size, median (and best) images/s per model and their ratio."""
    models = result["models"]
    pair = len(models) >= 2
    speed = {(r["model"], r["batch"]): (r["img_per_s"], r["best_img_per_s"]) for r in result["rows"]}
    head = "| batch | " + " | ".join(f"{m} img/s (best)" for m in models)
    head += f" | {models[0]} / {models[1]} median (best) |" if pair else " |"
    sep = "| --- " * (len(models) + 1 + pair) + "|"
    lines = [head, sep]
    for b in result["batch_sizes"]:
        cells = " | ".join(f"{speed[(m, b)][0]:.1f} ({speed[(m, b)][1]:.1f})" for m in models)
        ratio = f" | {result['ratio'][b]:.3f} ({result['best_ratio'][b]:.3f}) |" if pair else " |"
        lines.append(f"| {b} | {cells}{ratio}")
    setting = (
        f"Image encoders only, reparameterised, eval, no_grad, {result['image_size']} px, "
        f"{result['threads']} threads, median (best) of {result['repeats']} timed passes per model after a "
        f"warm-up, models alternating, {'channels_last' if result['channels_last'] else 'NCHW'}, "
        f"torch {result['torch']}, cpu {result['cpu']}, random weights."
    )
    flops = ""
    if result.get("gflops"):
        flops = "\n\nForward GFLOPs per image (torch FLOP counter): " + ", ".join(
            f"{m} {result['gflops'][m]:.3f}" for m in models
        )
        if pair:
            flops += f" (ratio {result['gflops'][models[0]] / result['gflops'][models[1]]:.4f})"
        flops += "."
    return "\n".join(lines) + "\n\n" + setting + flops + "\n"


def write_table(table: str, path: str | Path = DEFAULT_TABLE, *, note: str = "") -> Path:
    """Write ``benchmarks/inference.md``: a title, the table and an optional note about the machine."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = "# Inference throughput: SiCLIP-S0 vs MobileCLIP-S0 image encoders\n\n" + table
    if note:
        body += "\n" + note.strip() + "\n"
    body += (
        "\nPaper (Xeon Silver 4314, batch 1000): SiCLIP 39.5 img/s vs MobileCLIP-S0 38.2 img/s (ratio 1.034).\n"
        "Regenerate with `siclip bench infer`.\n"
    )
    out.write_text(body)
    return out
