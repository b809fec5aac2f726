"""Inference throughput of two image encoders, as a ratio with an interval (``siclip bench infer``).

Both models are built from their presets (random weights: speed does not depend on them), reparameterised
(RepMixer/MobileOne branches fused, SAS-P shaped attention without its N x N shape matrices), put in eval
mode and run under ``torch.no_grad()`` with the same thread count. For every batch size the two models are
timed in ``pairs`` back-to-back pairs (one forward pass each, the order alternating from pair to pair), so
that the load of a shared machine, which drifts over seconds, hits both passes of a pair alike. The claim is
the ratio ``models[0] / models[1]`` of images/s: the median of the per-pair ratios, with a percentile
bootstrap 95 % interval of that median. The paper's comparison is SiCLIP 39.5 vs MobileCLIP-S0 38.2 img/s
(x1.034) on a Xeon Silver 4314 at batch 1000; on a small shared machine only the ratio means anything.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "bench_infer",
    "bootstrap_median_interval",
    "format_table",
    "paired_ratios",
    "time_pairs",
    "write_table",
]

DEFAULT_TABLE = Path("benchmarks/inference.md")


def time_pairs(
    encoders: tuple[torch.nn.Module, torch.nn.Module],
    *,
    batch: int,
    image_size: int,
    pairs: int,
    channels_last: bool,
) -> list[tuple[float, float]]:
    """``pairs`` x (seconds of model 0, seconds of model 1), one forward pass each, back to back; model 0
    runs first in even pairs and second in odd ones, so neither always gets the warmer caches."""
    x = torch.randn(batch, 3, image_size, image_size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out: list[tuple[float, float]] = []
    with torch.no_grad():
        for enc in encoders:
            enc(x)  # warm-up: allocator, kernel selection
        for i in range(pairs):
            secs = [0.0, 0.0]
            for j in (0, 1) if i % 2 == 0 else (1, 0):
                start = time.perf_counter()
                encoders[j](x)
                secs[j] = time.perf_counter() - start
            out.append((secs[0], secs[1]))
    return out


def paired_ratios(times: list[tuple[float, float]]) -> list[float]:
    """Per pair, images/s of model 0 over images/s of model 1 (= seconds of model 1 / seconds of model 0)."""
    return [t1 / t0 for t0, t1 in times]


def bootstrap_median_interval(
    values: list[float], *, level: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median: resample ``values`` with replacement, take the median
    of each resample, return the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (seeded)."""
    if not values:
        raise ValueError("bootstrap_median_interval needs at least one value")
    arr = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    medians = np.median(arr[rng.integers(0, len(arr), size=(resamples, len(arr)))], axis=1)
    lo, hi = np.quantile(medians, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def image_gflops(encoder: torch.nn.Module, *, image_size: int) -> float:
    """Forward GFLOPs for one image (torch's FLOP counter: matmuls and convolutions), machine independent."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        encoder(torch.randn(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def bench_infer(
    models: tuple[str, str] = ("siclip-s0", "mobileclip-s0"),
    *,
    image_size: int = 256,
    batch_sizes: tuple[int, ...] = (1, 8, 32),
    pairs: int = 7,
    threads: int | None = None,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Images/s of two image encoders and their ratio per batch size, from ``pairs`` interleaved pairs.

    Returns ``{"rows": [{"model", "batch", "seconds", "img_per_s"}] (medians over the pairs),
    "ratio": {batch: {"median", "low", "high", "pairs"}} (model 0 / model 1, 95 % bootstrap interval),
    "times": {batch: [[s0, s1], ...]}, "gflops": {model: per-image forward GFLOPs}, "wall_s", ...settings}``.
    """
    from siclip.models.export import reparameterize
    from siclip.models.presets import build_preset

    if len(models) != 2:
        raise ValueError(f"bench_infer compares two models; got {len(models)}: {models}")
    if pairs < 2:
        raise ValueError(f"pairs: got {pairs}; allowed: >= 2")
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        built: list[torch.nn.Module] = []
        for name in models:
            tower: Any = build_preset(name).visual
            visual = reparameterize(tower, inplace=True)
            if channels_last:
                visual = visual.to(memory_format=torch.channels_last)
            built.append(visual)
        encoders = (built[0], built[1])
        gflops = {
            name: image_gflops(enc, image_size=image_size) for name, enc in zip(models, encoders, strict=True)
        }
        rows: list[dict[str, Any]] = []
        ratio: dict[int, dict[str, float]] = {}
        times: dict[int, list[list[float]]] = {}
        for batch in batch_sizes:
            pair_times = time_pairs(
                encoders, batch=batch, image_size=image_size, pairs=pairs, channels_last=channels_last
            )
            times[batch] = [list(t) for t in pair_times]
            for i, name in enumerate(models):
                sec = statistics.median(t[i] for t in pair_times)
                rows.append({"model": name, "batch": batch, "seconds": sec, "img_per_s": batch / sec})
            ratios = paired_ratios(pair_times)
            low, high = bootstrap_median_interval(ratios)
            ratio[batch] = {"median": statistics.median(ratios), "low": low, "high": high, "pairs": pairs}
        return {
            "models": list(models),
            "image_size": image_size,
            "batch_sizes": list(batch_sizes),
            "pairs": pairs,
            "threads": torch.get_num_threads(),
            "channels_last": channels_last,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "rows": rows,
            "ratio": ratio,
            "times": times,
            "gflops": gflops,
            "wall_s": time.perf_counter() - started,
            "load_average": os.getloadavg()[0],
        }
    finally:
        torch.set_num_threads(previous_threads)


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table: per batch size, median images/s per model and the paired ratio with its interval."""
    a, b = result["models"]
    speed = {(r["model"], r["batch"]): r["img_per_s"] for r in result["rows"]}
    lines = [
        f"| batch | {a} img/s | {b} img/s | {a} / {b}, median of pairs | 95 % bootstrap interval | pairs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for batch in result["batch_sizes"]:
        r = result["ratio"][batch]
        lines.append(
            f"| {batch} | {speed[(a, batch)]:.1f} | {speed[(b, batch)]:.1f} | {r['median']:.3f} | "
            f"{r['low']:.3f} - {r['high']:.3f} | {r['pairs']} |"
        )
    setting = (
        f"Image encoders only, reparameterised, eval, no_grad, {result['image_size']} px, "
        f"{result['threads']} threads, {result['pairs']} back-to-back pairs of forward passes per batch size "
        f"after a warm-up (order alternating), images/s = median over the pairs, "
        f"{'channels_last' if result['channels_last'] else 'NCHW'}, torch {result['torch']}, "
        f"cpu {result['cpu']}, random weights; took {result['wall_s']:.0f} s"
        + (f", load average {result['load_average']:.1f} at the end." if "load_average" in result else ".")
    )
    flops = ""
    if result.get("gflops"):
        g = result["gflops"]
        flops = (
            f"\n\nForward GFLOPs per image (torch FLOP counter): {a} {g[a]:.3f}, {b} {g[b]:.3f} "
            f"(ratio {g[a] / g[b]:.4f})."
        )
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
