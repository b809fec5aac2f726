"""``siclip bench caption`` on the tiny CoCa: both paths do equal work and the table is written (no timing)."""

from __future__ import annotations

from pathlib import Path

import torch

from siclip.bench.caption import caption_lengths, run_bench_caption
from siclip.cli import build_parser


def test_caption_lengths_counts_up_to_eos() -> None:
    tokens = torch.tensor([[1, 5, 2, -1], [1, 5, 6, 2], [1, 5, 6, 7]])
    assert caption_lengths(tokens, eos_token_id=2) == [3, 4, 4]


def test_bench_caption_equal_work_and_table(tmp_path: Path) -> None:
    out = tmp_path / "caption.md"
    result, table = run_bench_caption(
        out=str(out),
        runs=[{"images": 2, "tokens": 9}],
        model="siclip-tiny-coca",
        captions=3,
        device="cpu",
        flops=True,
    )
    assert len(result["runs"]) == 1
    result = result["runs"][0]
    assert result["threads"] == 1  # the default: one thread, like a captioner actor
    rows = {r["path"]: r for r in result["rows"]}
    assert set(rows) == {"open_clip", "cached"}
    for r in rows.values():
        # Every caption of both paths is exactly 9 tokens long (EOS banned until the forced one).
        assert r["tokens_per_caption"] == [9] and r["captions"] == 6
        assert r["captions_per_s"] > 0 and r["best_captions_per_s"] >= r["captions_per_s"]
        assert r["cpu_seconds"] > 0
        assert r["dtype"] in ("float32", "fp32")
    assert result["ratio"] == rows["cached"]["captions_per_s"] / rows["open_clip"]["captions_per_s"]
    g = result["gflops_per_caption"]
    assert 0 < g["cached"] < g["open_clip"]  # fewer FLOPs for the same tokens
    text = out.read_text()
    assert text.startswith("# CoCa captioning") and table in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| siclip-tiny-coca"))
    assert line.count("|") == 8 and "2 x 3 x 9" in line
    assert "GFLOPs per caption" in text
    assert build_parser().parse_args(["bench", "caption", "--json"]).what == "caption"
