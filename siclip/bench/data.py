"""Throughput of the data stage: decode+validate+resize on all cores (Ray Data) vs one Python loop, the
tiny CoCa's captions per second, and the whole build end to end. ``siclip bench data`` runs
:func:`run_bench_data`.

This module owns :func:`bench_data` (the read stage and the captioner on given shards),
:func:`bench_pipeline` (``run_pipeline`` end to end), :func:`format_table` (a Markdown table) and
:func:`run_bench_data` (demo-world shards in, ``benchmarks/data.md`` out).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["bench_data", "bench_pipeline", "format_table", "run_bench_data"]

DEFAULT_OUT = "benchmarks/data.md"


def _loop(urls: Sequence[str], image_size: int) -> int:
    from siclip.data.prepare import prepare_shard

    return sum(len(prepare_shard(u, image_size=image_size).keys) for u in urls)


def _ray_prepare(urls: Sequence[str], image_size: int) -> int:
    import ray.data

    from siclip.data.prepare import PREPARE_MEMORY, prepare_row

    ds = ray.data.from_items(
        [{"url": u, "name": os.path.basename(u)} for u in urls], override_num_blocks=len(urls)
    ).map(
        prepare_row,  # type: ignore[arg-type]
        fn_kwargs={
            "image_size": image_size,
            "center_crop": False,
            "min_image_size": 0,
            "max_aspect_ratio": float("inf"),
            "retry_delay_s": 0.0,
        },
        num_cpus=1,
        memory=PREPARE_MEMORY,
    )
    return sum(len(row["keys"]) for row in ds.iter_rows())


def bench_data(
    urls: Sequence[str],
    *,
    image_size: int = 64,
    captioner_source: str = "",
    caption_images: int = 64,
    num_captions: int = 3,
    max_length: int = 20,
    repeats: int = 2,
) -> dict[str, Any]:
    """Measure on ``urls``: the pipeline's read+validate+resize+JPEG stage in Ray Data on every CPU of the
    running (or a new local) Ray cluster vs the same function in a plain single-process loop, each the best of
    ``repeats``; and the tiny CoCa's captions/s on ``caption_images`` images (one process).
    ``captioner_source`` is a trained tiny CoCa (random weights when empty: every caption runs to
    ``max_length``, so that rate is a lower bound)."""
    import ray
    import torch

    from siclip.data.captioner import Captioner
    from siclip.data.shards import image_of, iter_samples

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    cpus = float(ray.cluster_resources().get("CPU", 0))
    _ray_prepare(urls[:1], image_size)  # warm the worker processes so both sides decode, not start up

    def best(fn: Any) -> tuple[float, int]:
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            n = fn(urls, image_size)
            runs.append((time.perf_counter() - start, n))
        return min(runs)

    loop_s, loop_n = best(_loop)
    ray_s, ray_n = best(_ray_prepare)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = [image_of(s) for s, _ in zip(iter_samples(urls[0]), range(caption_images), strict=False)]
        captioner = Captioner(
            "siclip-tiny-coca",
            captioner_source,
            num_captions=num_captions,
            max_length=max_length,
            batch_size=32,
        )
        captioner.caption(images[:4], seed=0)
        start = time.perf_counter()
        captions = captioner.caption(images, seed=0)
        caption_s = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    n_captions = sum(len(c) for c in captions)
    return {
        "shards": len(urls),
        "samples": loop_n,
        "image_size": image_size,
        "ray_cpus": cpus,
        "loop_samples_per_s": loop_n / loop_s,
        "ray_samples_per_s": ray_n / ray_s,
        "ray_over_loop": (ray_n / ray_s) / (loop_n / loop_s),
        "captioner": f"{captioner.model_name}:{os.path.basename(captioner_source)}"
        if captioner_source
        else f"{captioner.model_name} (random weights)",
        "caption_images": len(images),
        "captions_per_image": num_captions,
        "captions_per_s": n_captions / caption_s,
        "images_captioned_per_s": len(images) / caption_s,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
    }


def bench_pipeline(
    urls: Sequence[str],
    out_dir: str,
    *,
    image_size: int = 64,
    captioner_source: str = "",
    num_captions: int = 3,
    max_length: int = 20,
) -> dict[str, Any]:
    """The whole ``siclip data build`` (read, validate, resize, caption, write, manifest) on ``urls`` into
    a fresh ``out_dir``, one captioner actor: images/s from the call to the last manifest write (Ray Data
    start and the actor's model load included, so it is what a small build sustains, a lower bound)."""
    import shutil

    from siclip.config import from_dict
    from siclip.data.pipeline import run_pipeline

    shutil.rmtree(out_dir, ignore_errors=True)
    caption = {
        "input_shards": list(urls),
        "output_dir": out_dir,
        "model": "siclip-tiny-coca",
        "source": captioner_source,
        "num_captions": num_captions,
        "max_length": max_length,
        "batch_size": 64,
        "num_actors": 1,
        "num_cpus_per_actor": 1,
        "image_size": image_size,
    }
    cfg = from_dict({"caption": caption, "ray": {"data_timeout_s": 1800}})
    start = time.perf_counter()
    manifest = run_pipeline(cfg, progress=False)
    seconds = time.perf_counter() - start
    return {
        "pipeline_shards": len(urls),
        "pipeline_images": manifest.samples_out,
        "pipeline_seconds": seconds,
        "pipeline_images_per_s": manifest.samples_out / seconds,
    }


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of :func:`bench_data`'s result."""
    r = result
    rows = [
        ("decode+validate+resize+JPEG, one Python loop", f"{r['loop_samples_per_s']:.0f} samples/s"),
        (
            f"same stage in Ray Data ({r['ray_cpus']:g} CPUs, one task per shard)",
            f"{r['ray_samples_per_s']:.0f} samples/s",
        ),
        ("Ray Data / loop", f"{r['ray_over_loop']:.2f}x"),
        (
            f"tiny CoCa ({r['captioner']}), {r['captions_per_image']} top-p captions/image, 1 thread",
            f"{r['captions_per_s']:.0f} captions/s ({r['images_captioned_per_s']:.0f} images/s)",
        ),
    ]
    if "pipeline_images_per_s" in r:
        rows.append(
            (
                f"`siclip data build` end to end ({r['pipeline_shards']} shards, 1 captioner actor, start-up "
                "included)",
                f"{r['pipeline_images_per_s']:.0f} images/s ({r['pipeline_images']} in {r['pipeline_seconds']:.0f} s)",
            )
        )
    lines = [
        f"{r['shards']} demo web shards, {r['samples']} samples, {r['image_size']} px; {r['machine']}; "
        f"load average {r['load_average']:.1f} at the end",
        "",
        "| stage | throughput |",
        "| --- | --- |",
        *[f"| {a} | {b} |" for a, b in rows],
    ]
    return "\n".join(lines) + "\n"


def run_bench_data(
    *,
    out: str = DEFAULT_OUT,
    world_dir: str = "runs/bench_data/world",
    captioner_source: str = "",
    notes: str = "",
) -> tuple[dict[str, Any], str]:
    """Generate (or reuse) demo-world web shards, measure, write ``out`` (Markdown, with ``notes`` appended);
    returns (result, table)."""
    from siclip.data.demo_world import generate_demo_world

    world = generate_demo_world(world_dir, seed=0)
    if not captioner_source and Path("runs/demo/captioner/model.safetensors").is_file():
        captioner_source = "runs/demo/captioner/model.safetensors"
    result = bench_data(world.web_shards, image_size=64, captioner_source=captioner_source)
    result.update(
        bench_pipeline(
            world.web_shards[:2],
            str(Path(world_dir).parent / "syn"),
            image_size=64,
            captioner_source=captioner_source,
        )
    )
    table = format_table(result)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(
        "# Data stage throughput (`siclip bench data`)\n\n"
        "Measured on a 2-core machine shared with 4 other agents working at the same time, so absolute rates "
        "are noisy and low; the ratio is the point. Ray Data runs one read task per shard on every CPU of "
        "the local Ray cluster (best of 2 runs, workers warmed first); the loop calls the same "
        "`prepare_shard` one shard after another.\n\n"
        + table
        + "\nWith more runnable processes than cores (the load average above), extra Ray workers add only "
        "scheduling and object-transfer cost, so the Ray Data stage need not beat the loop here; it scales "
        "with cores where each read task gets its own. Reading never limits the real pipeline: CoCa "
        "ViT-L/14 captioning costs orders of magnitude more per image (data/README.md).\n"
        + (f"\n{notes.strip()}\n" if notes else "")
    )
    return result, table
