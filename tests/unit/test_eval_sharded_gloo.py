"""Evaluation sharded over two real gloo ranks gives exactly the single-process metrics.

Uneven on purpose: 37 images over 5 classes (ranks hold 19 and 18 images, 3 and 2 classes) and 15
retrieval samples with 1-3 captions each (8 and 7 samples, different caption counts).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import to_tensor

from siclip.data.shards import AtomicShardWriter
from siclip.eval.ranks import Shard
from siclip.eval.retrieval import evaluate_retrieval
from siclip.eval.zeroshot import evaluate_zeroshot

WORLD, N_CLASSES, N_IMAGES, N_SAMPLES, D = 2, 5, 37, 15, 6


class PixelModel(torch.nn.Module):
    """Images: a fixed random map of the mean colour; texts: the first number in the text picks a row."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(3, D, generator=g)
        self.table = torch.randn(64, D, generator=g)

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return F.normalize(x.mean(dim=(2, 3)) @ self.w, dim=-1)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return F.normalize(self.table[tokens[:, 0]], dim=-1)


def tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([int(re.search(r"(\d+)", t).group(1)) for t in texts])[:, None]  # type: ignore[union-attr]


def _make_data(root: Path) -> None:
    g = torch.Generator().manual_seed(1)
    for i in range(N_IMAGES):
        folder = root / "zs" / f"class_{i % N_CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
        Image.new("RGB", (4, 4), colour).save(folder / f"{i:03d}.png")
    (root / "zs" / "held_out_classes.txt").write_text("class_1\nclass_3\n")  # seen/unseen split too
    with AtomicShardWriter(root / "ret-000000.tar") as w:
        for i in range(N_SAMPLES):
            colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
            image = root / "tmp.png"
            Image.new("RGB", (4, 4), colour).save(image)
            captions = [f"caption {(7 * i + c) % 64}" for c in range(1 + i % 3)]
            w.write({"__key__": f"{i:06d}", "png": image.read_bytes(), "json": {"captions": captions}})


def _evaluate(root: Path, shard: Shard) -> dict[str, float]:
    model = PixelModel()
    kw: dict[str, Any] = {"tokenizer": tokenizer, "transform": to_tensor, "batch_size": 4, "shard": shard}
    return {
        **evaluate_zeroshot(model, folder=root / "zs", templates=["a {}.", "{} here"], **kw),
        **evaluate_retrieval(model, urls=[str(root / "ret-000000.tar")], recall_at=(1, 3), **kw),
    }


def _worker(rank: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=WORLD)
    try:
        torch.save(_evaluate(Path(root), Shard(rank, WORLD)), Path(root) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sharded_eval")
    _make_data(root)
    return root


def test_sharded_eval_on_two_ranks_equals_single_process(data: Path) -> None:
    mp.spawn(_worker, args=(str(data),), nprocs=WORLD, join=True)
    single = _evaluate(data, Shard())
    assert 0.0 < single["zeroshot_top1"] < 1.0 and 0.0 < single["i2t_r@1"] < 1.0  # not trivially 0 or 1
    assert {"zeroshot_top1_seen", "zeroshot_top1_unseen"} <= set(single)
    for rank in range(WORLD):
        assert torch.load(data / f"rank{rank}.pt") == single


def test_shard_spans_cover_every_item_once() -> None:
    for n in (0, 1, 5, 37):
        for world in (1, 2, 3, 8):
            spans = [Shard(r, world).span(n) for r in range(world)]
            assert [i for s in spans for i in s] == list(range(n))
            assert max(map(len, spans)) - min(map(len, spans)) <= 1
    with pytest.raises(RuntimeError, match="not initialised"):
        Shard(0, 2).sum([1.0])
