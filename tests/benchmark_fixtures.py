"""Tiny copies of the paper's evaluation datasets in the layouts CLIP_benchmark reads (a few images each).

Every class folder a layout requires exists (empty ones allowed), so labels line up with the standard class
names; only a few classes hold images. Each image is a flat colour that depends on its class, so a model
can tell classes apart and metrics are not all zero. ``BagModel`` is a tiny CLIP-like model to evaluate on them.
"""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

N_IMAGES = 12  # images per dataset (retrieval: 12 images x 2 captions)


def flat_image(i: int, size: int = 24) -> Image.Image:
    """A ``size`` x ``size`` image of one colour, its own for each ``i`` (a class index, an image number)."""
    return Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i + 40) % 256, (17 * i + 200) % 256))


def imagenet_wnids() -> list[str]:
    from clip_benchmark.datasets.builder import all_imagenet_wordnet_ids

    return list(all_imagenet_wordnet_ids)


def imagenet_r_wnids() -> list[str]:
    """The 200 ImageNet-R wnids, read from CLIP_benchmark's builder source (a local set in a function)."""
    import clip_benchmark.datasets.builder as builder

    tree = ast.parse(Path(builder.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "imagenet_r_wnids":
            return sorted(ast.literal_eval(node.value))
    raise LookupError("imagenet_r_wnids not found in clip_benchmark's builder")


def _class_folders(root: Path, wnids: list[str], ext: str) -> None:
    for w in wnids:
        (root / w).mkdir(parents=True, exist_ok=True)
    for i in range(N_IMAGES):
        label = (i * 7) % 5  # five classes hold images
        flat_image(label).save(root / wnids[label] / f"img_{i:03d}.{ext}", format="JPEG")


def make_imagenet1k(root: Path) -> Path:
    _class_folders(root / "val", imagenet_wnids(), "JPEG")
    return root


def make_imagenet_sketch(root: Path) -> Path:
    _class_folders(root, imagenet_wnids(), "JPEG")
    return root


def make_imagenet_r(root: Path) -> Path:
    _class_folders(root, imagenet_r_wnids(), "jpg")
    return root


def make_imagenetv2(root: Path) -> Path:
    folder = root / "ImageNetV2-matched-frequency"
    for i in range(N_IMAGES):
        label = (i * 7) % 5
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        flat_image(label).save(folder / str(label) / f"{i:03d}.jpeg", format="JPEG")
    return root


def _captions(i: int) -> list[str]:
    return [f"a picture of thing {i}", f"photo number {i} of a thing"]


def make_mscoco(root: Path) -> Path:
    """COCO 2014 Karpathy layout: ``val2014/`` and ``coco_test_karpathy.json`` (COCO caption format)."""
    (root / "val2014").mkdir(parents=True)
    images, annotations = [], []
    for i in range(N_IMAGES):
        name = f"COCO_val2014_{i:012d}.jpg"
        flat_image(i).save(root / "val2014" / name, format="JPEG")
        images.append({"id": i, "file_name": name})
        for caption in _captions(i):
            annotations.append({"id": len(annotations), "image_id": i, "caption": caption})
    (root / "coco_test_karpathy.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root


def make_flickr30k(root: Path) -> Path:
    """Flickr30k as CLIP_benchmark reads it: images and ``flickr30k_test_karpathy.txt`` (image,caption)."""
    root.mkdir(parents=True)
    lines = ["image,caption"]
    for i in range(N_IMAGES):
        name = f"{1000 + i}.jpg"
        flat_image(i).save(root / name, format="JPEG")
        lines += [f"{name},{c}" for c in _captions(i)]
    (root / "flickr30k_test_karpathy.txt").write_text("\n".join(lines) + "\n")
    return root


def make_wds_classification(root: Path, classnames: list[str], templates: list[str]) -> Path:
    """A CLIP_benchmark WebDataset export: ``test/nshards.txt``, ``test/0.tar`` (webp + cls), class names
    and ``{c}`` templates beside them."""
    import tarfile

    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(N_IMAGES):
            label = i % len(classnames)
            buf = io.BytesIO()
            flat_image(label).save(buf, format="WEBP")
            for ext, data in (("webp", buf.getvalue()), ("cls", str(label).encode())):
                member = tarfile.TarInfo(f"s{i:04d}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def make_paper_suite(root: Path) -> dict[str, str]:
    """All six datasets under ``root``; returns ``{name: root}`` for ``eval.roots``."""
    makers = {
        "imagenet1k": make_imagenet1k,
        "imagenetv2": make_imagenetv2,
        "imagenet_r": make_imagenet_r,
        "imagenet_sketch": make_imagenet_sketch,
        "mscoco": make_mscoco,
        "flickr30k": make_flickr30k,
    }
    return {name: str(make(root / name)) for name, make in makers.items()}


class BagModel(nn.Module):
    """encode_text: mean of token embeddings; encode_image: a linear map of 4x4-pooled pixels."""

    def __init__(self, dim: int = 16, vocab: int = 49408) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.tok = nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.img = nn.Parameter(torch.randn(3 * 16, dim, generator=g))

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        mask = (tokens > 0).float()[..., None]
        x = (self.tok[tokens] * mask).sum(1) / mask.sum(1).clamp(min=1)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(images, 4).flatten(1) @ self.img
        return F.normalize(x, dim=-1) if normalize else x
