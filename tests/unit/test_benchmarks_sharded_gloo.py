"""The paper suite sharded over two real gloo ranks (as ``eval.benchmarks`` runs during training) gives the
single-process results: the six datasets in their folder layouts (map-style: contiguous slices) and a
CLIP_benchmark WebDataset export (iterable: round robin), classification and retrieval alike.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmark_fixtures as fx

from siclip.config import from_dict
from siclip.eval.ranks import Shard

WORLD = 2
WDS_CLASSES = ["red thing", "green thing", "blue thing", "grey thing", "pink thing", "dark thing"]


BagModel = fx.BagModel


def _eval_cfg(roots: dict[str, str]) -> Any:
    return from_dict(
        {
            "eval": {
                "roots": roots,
                "benchmark_templates": "simple",
                "loader_workers": 0,
                "batch_size": 5,  # 12 images: batches of 5, 1 and 5, 1 on two ranks
                "recall_at": [1, 5],
            }
        }
    ).eval


def _evaluate(root: Path, shard: Shard) -> dict[str, dict[str, Any]]:
    """The six datasets in their folder layouts, then ImageNet-1k as a WebDataset export."""
    import siclip.eval.benchmarks as benchmarks
    from siclip.models.presets import build_tokenizer, build_transform

    one = benchmarks.prompt_templates("simple")[:1]
    benchmarks.prompt_templates = lambda kind: one  # type: ignore[assignment]  # cheap 1000-class classifiers
    kw: dict[str, Any] = {
        "tokenizer": build_tokenizer("tiny-teacher"),
        "transform": build_transform("tiny-teacher", train=False),
        "shard": shard,
        "log": lambda _: None,
    }
    model = BagModel()
    folders = {name: str(root / "suite" / name) for name in benchmarks.PAPER_SUITE}
    out = benchmarks.evaluate_benchmarks(
        model, names=benchmarks.PAPER_SUITE, eval_cfg=_eval_cfg(folders), **kw
    )
    wds = benchmarks.evaluate_benchmarks(
        model, names=["imagenet1k"], eval_cfg=_eval_cfg({"imagenet1k": str(root / "wds")}), **kw
    )
    return {**out, "wds": wds["imagenet1k"]}


def _worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=WORLD)
    try:
        torch.save(_evaluate(Path(root), Shard(rank, WORLD)), Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def test_the_paper_suite_sharded_on_two_ranks_equals_single_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import siclip.eval.benchmarks as benchmarks

    monkeypatch.setattr(benchmarks, "prompt_templates", benchmarks.prompt_templates)  # restored afterwards
    fx.make_paper_suite(tmp_path / "suite")
    fx.make_wds_classification(tmp_path / "wds", WDS_CLASSES, ["a photo of a {c}.", "itap of a {c}."])
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    single = _evaluate(tmp_path, Shard())
    assert [r["status"] for r in single.values()] == ["ok"] * 7, single
    assert single["wds"]["layout"] == "wds"
    # not trivially 0 or 1 everywhere: the comparison means something
    assert 0.0 < single["wds"]["top1"] < 1.0
    assert any(0.0 < single[n][k] < 1.0 for n in ("mscoco", "flickr30k") for k in ("i2t_r@5", "t2i_r@5"))
    for rank in range(WORLD):
        sharded = torch.load(tmp_path / f"rank{rank}.pt")
        assert sharded.keys() == single.keys()
        for name, want in single.items():
            got = sharded[name]
            assert got.keys() == want.keys(), name
            bad = {k: (got[k], v) for k, v in want.items() if not _same(got[k], v)}
            assert not bad, f"rank {rank}, {name}: {bad}"
