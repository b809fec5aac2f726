"""Captions per second of siclip's cached CoCa decoder vs open_clip's ``generate`` (``siclip bench caption``).

Both paths run on the same model and the same images through :func:`siclip.data.captioner.generate_tokens`,
the call the Captioner makes: open_clip's ``generate`` on the images repeated ``k`` times (bf16 autocast on
a GPU, as the Captioner's ``decoder=open_clip``), and :class:`~siclip.data.coca_decode.CachedCoCaDecoder`
(bf16 weights on a GPU, fp32 on CPU). Equal work: every caption is exactly ``tokens`` long on both paths
(EOS is banned until the forced EOS at the end, and pad never ends a row), and the result records the
lengths each path produced. Random weights (speed does not depend on them). The paths alternate within
every repeat so slow drifts of a shared machine hit both alike.

This module owns :func:`bench_caption` (the measurement), :func:`format_table`, :func:`run_bench_caption`
(``benchmarks/caption.md``) and a ``python -m siclip.bench.caption`` command line (used by
``benchmarks/gpu_check.sh`` for ``coca_ViT-L-14`` on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["bench_caption", "caption_lengths", "format_table", "run_bench_caption"]

DEFAULT_TABLE = "benchmarks/caption.md"
PATHS = ("open_clip", "cached")


def caption_lengths(tokens: torch.Tensor, eos_token_id: int) -> list[int]:
    """Tokens per caption row, start token and EOS included (rows without EOS count in full)."""
    is_eos = tokens == eos_token_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, tokens.shape[1])
    return [int(n) for n in first.tolist()]


def _fixed_length(tokens: int, ids: dict[str, int]) -> dict[str, Any]:
    """``generate`` arguments for captions of exactly ``tokens`` tokens: EOS banned until the forced one at
    the end (``min_seq_len``), and a pad id no token has, so a sampled pad does not end a row either."""
    return {
        "seq_len": tokens,
        "min_seq_len": tokens - 1,
        "generation_type": "top_p",
        "top_p": 0.9,
        "sot_token_id": ids["sot_token_id"],
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": -1,
    }


def bench_caption(
    model: str = "coca_ViT-B-32",
    *,
    images: int = 2,
    captions: int = 5,
    tokens: int = 20,
    repeats: int = 1,
    device: str = "auto",
    threads: int | None = None,
    seed: int = 0,
    flops: bool = False,
) -> dict[str, Any]:
    """Captions/s of both paths on ``images`` random images x ``captions`` top-p captions of ``tokens`` tokens.

    Returns ``{"rows": [{"path", "seconds", "best_seconds", "captions_per_s", "best_captions_per_s",
    "cpu_seconds", "tokens_per_caption", "dtype"}], "ratio": cached / open_clip (median), "best_ratio",
    "cpu_ratio": open_clip / cached process CPU seconds, ...settings}``. On a machine shared with other work
    the CPU-time ratio is the steadier one (wall time also counts waiting for a core).
    One untimed warm-up call per path first (one image, one caption). With ``flops``, also
    ``"gflops_per_caption": {path: GFLOPs}`` from torch's FLOP counter on one more untimed call per path
    (one image, ``captions`` captions): machine-independent, unlike the rates.
    """
    from siclip.data.captioner import build_captioner_model, generate_tokens, special_token_ids
    from siclip.data.coca_decode import CachedCoCaDecoder

    if tokens < 3:
        raise ValueError(f"tokens: got {tokens}; need at least 3 (start, one sampled token, end)")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        built = build_captioner_model(model, "", device=dev)
        net = built.net
        cached_net = net
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            cached_net = copy.deepcopy(net).to(torch.bfloat16)
        decoders: dict[str, Any] = {"open_clip": None, "cached": CachedCoCaDecoder(cached_net)}
        dtypes = {
            "open_clip": "fp32 + bf16 autocast" if cached_net is not net else "fp32",
            "cached": str(cached_net.text.token_embedding.weight.dtype).replace("torch.", ""),
        }
        size = int(net.visual.image_size[0])
        pixels = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dev)
        kwargs = _fixed_length(tokens, special_token_ids(built.vocab))
        eos = kwargs["eos_token_id"]

        def run(path: str, x: torch.Tensor, k: int) -> torch.Tensor:
            torch.manual_seed(seed)
            out = generate_tokens(net, x, num_captions=k, decoder=decoders[path], **kwargs)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return out

        for path in PATHS:
            run(path, pixels[:1], 1)
        times: dict[str, list[float]] = {p: [] for p in PATHS}
        cpu_times: dict[str, list[float]] = {p: [] for p in PATHS}
        lengths: dict[str, list[int]] = {}
        for _ in range(repeats):
            for path in PATHS:
                start, cpu_start = time.perf_counter(), time.process_time()
                out = run(path, pixels, captions)
                times[path].append(time.perf_counter() - start)
                cpu_times[path].append(time.process_time() - cpu_start)
                lengths[path] = caption_lengths(out.cpu(), eos)
        gflops: dict[str, float] = {}
        if flops:
            from torch.utils.flop_counter import FlopCounterMode

            # nn.MultiheadAttention's fused fast path hides its projections from the counter.
            fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
            try:
                for path in PATHS:
                    counter = FlopCounterMode(display=False)
                    with counter:
                        run(path, pixels[:1], captions)
                    gflops[path] = counter.get_total_flops() / 1e9 / captions
            finally:
                torch.backends.mha.set_fastpath_enabled(fastpath)
        n = images * captions
        rows: list[dict[str, Any]] = []
        for path in PATHS:
            sec, best = statistics.median(times[path]), min(times[path])
            rows.append(
                {"path": path, "seconds": sec, "best_seconds": best, "captions_per_s": n / sec,
                 "best_captions_per_s": n / best, "cpu_seconds": statistics.median(cpu_times[path]),
                 "tokens_per_caption": sorted(set(lengths[path])),
                 "captions": len(lengths[path]), "dtype": dtypes[path]}
            )  # fmt: skip
        speed = {r["path"]: r for r in rows}
        return {
            "model": model,
            "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
            "images": images,
            "captions_per_image": captions,
            "tokens": tokens,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
            "rows": rows,
            "ratio": speed["cached"]["captions_per_s"] / speed["open_clip"]["captions_per_s"],
            "best_ratio": speed["cached"]["best_captions_per_s"] / speed["open_clip"]["best_captions_per_s"],
            "cpu_ratio": speed["open_clip"]["cpu_seconds"] / speed["cached"]["cpu_seconds"],
            "gflops_per_caption": gflops,
        }
    finally:
        torch.set_num_threads(previous_threads)


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, one row per measured model/device: both paths' captions/s and their ratio."""
    head = (
        "| model | device | images x captions x tokens | open_clip generate captions/s (best) | "
        "cached decoder captions/s (best) | cached / open_clip median (best) | CPU seconds open_clip / cached |"
    )
    lines = [head, "| --- " * 7 + "|"]
    for r in results:
        s = {row["path"]: row for row in r["rows"]}
        o, c = s["open_clip"], s["cached"]
        lines.append(
            f"| {r['model']} | {r['device']} (cached {c['dtype']}, open_clip {o['dtype']}) | "
            f"{r['images']} x {r['captions_per_image']} x {r['tokens']} | "
            f"{o['captions_per_s']:.2f} ({o['best_captions_per_s']:.2f}) | "
            f"{c['captions_per_s']:.2f} ({c['best_captions_per_s']:.2f}) | "
            f"{r['ratio']:.1f}x ({r['best_ratio']:.1f}x) | "
            f"{o['cpu_seconds']:.1f} / {c['cpu_seconds']:.1f} = {r['cpu_ratio']:.1f}x |"
        )
    r0 = results[0]
    lines += [
        "",
        "Top-p 0.9; every caption has exactly the row's number of tokens on both paths (tokens per caption "
        "measured, open_clip / cached: "
        + "; ".join(" / ".join(str(row["tokens_per_caption"]) for row in r["rows"]) for r in results)
        + f"); median (best) of {r0['repeats']} timed call(s) per path after a warm-up, paths alternating; "
        f"{r0['threads']} threads, torch {r0['torch']}, cpu {r0['cpu']}, load average "
        f"{r0['load_average']:.1f} at the end; random weights.",
    ]
    for r in results:
        g = r.get("gflops_per_caption") or {}
        if g:
            lines += [
                "",
                f"{r['model']}: GFLOPs per caption (torch FLOP counter, 1 image x {r['captions_per_image']} "
                f"captions x {r['tokens']} tokens, image encoding included; torch's counter skips the "
                "attention score/value products of CPU attention kernels, on both paths): open_clip generate "
                f"{g['open_clip']:.1f}, cached decoder {g['cached']:.1f} "
                f"({g['open_clip'] / g['cached']:.1f}x fewer).",
            ]
    return "\n".join(lines) + "\n"


def _write(table: str, out: str | Path, note: str = "") -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = (
        "# CoCa captioning: cached decoder vs open_clip's generate (`siclip bench caption`)\n\n"
        "Same model, same images, same number of tokens per caption. open_clip's `generate` encodes each "
        "image once per caption and re-runs both text towers over the whole prefix (re-projecting the "
        "cross-attention keys/values of every image token) at every token; the cached decoder "
        "(`siclip/data/coca_decode.py`) encodes each image once, projects its cross-attention keys/values once "
        "and caches self-attention keys/values.\n\n" + table
    )
    if note:
        body += "\n" + note.strip() + "\n"
    body += (
        "\nRegenerate with `siclip bench caption` (these two runs, one thread) or `python -m siclip.bench.caption "
        "--images 2 4 --tokens 20 30 --threads 1 --flops` (also counts FLOPs).\n"
    )
    path.write_text(body)
    return path


# The brief's small run, then a larger batch at the production caption length (caption.max_length 30).
DEFAULT_RUNS: tuple[dict[str, Any], ...] = ({"images": 2, "tokens": 20}, {"images": 4, "tokens": 30})


def run_bench_caption(
    *,
    out: str = DEFAULT_TABLE,
    note: str = "",
    runs: Sequence[dict[str, Any]] = DEFAULT_RUNS,
    threads: int | None = 1,
    **kwargs: Any,
) -> tuple[dict[str, Any], str]:
    """Measure each of ``runs`` (``bench_caption`` arguments over ``kwargs``; ``coca_ViT-B-32``, 5 captions per
    image unless told otherwise), write one table to ``out``; returns ({"runs": [results]}, table).

    One thread by default, as each captioner actor of the pipeline runs: process CPU time then measures work,
    which stays meaningful on a machine shared with other jobs.
    """
    results = [bench_caption(**{**kwargs, "threads": threads, **run}) for run in runs]
    table = format_table(results)
    _write(table, out, note)
    return {"runs": results}, table


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m siclip.bench.caption [--model ...] [--images ...] ...``."""
    p = argparse.ArgumentParser(prog="python -m siclip.bench.caption", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="coca_ViT-B-32", help="an open_clip CoCa model (random weights)")
    p.add_argument("--images", type=int, nargs="+", default=[2], help="images per run (one run each)")
    p.add_argument("--captions", type=int, default=5, help="captions per image")
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[20],
        help="tokens per caption (start, end included), per run",
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=DEFAULT_TABLE, help="Markdown table to write")
    p.add_argument("--json", default="", help="also write the result as JSON here")
    p.add_argument("--flops", action="store_true", help="also count GFLOPs per caption of both paths")
    args = p.parse_args(argv)
    if len(args.tokens) not in (1, len(args.images)):
        p.error("--tokens: give one value, or one per --images value")
    tokens = args.tokens * len(args.images) if len(args.tokens) == 1 else args.tokens
    result, table = run_bench_caption(
        out=args.out,
        runs=[{"images": i, "tokens": t} for i, t in zip(args.images, tokens, strict=True)],
        model=args.model,
        captions=args.captions,
        repeats=args.repeats,
        device=args.device,
        threads=args.threads or None,
        flops=args.flops,
    )
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
