"""Demo world: deterministic bytes, manifests that match the shards, captions as specified, ImageFolder layout."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siclip.data.demo_world import ATTRIBUTES, clean_captions, generate_demo_world, web_caption
from siclip.data.shards import iter_samples, read_manifest

SIZES = {"n_web": 120, "n_clean": 30, "n_retrieval": 20, "n_zeroshot_per_class": 2, "image_size": 32}
SYNONYMS = {
    "circle": {"round", "ball", "dot", "disc"},
    "square": {"box", "block", "tile"},
    "triangle": {"pyramid", "wedge"},
    "star": {"starburst"},
    "cross": {"plus"},
    "diamond": {"rhombus", "lozenge"},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_demo_world(tmp_path_factory.mktemp("demo"), seed=3, samples_per_shard=50, **SIZES)


def _digest(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path) -> None:
    again = generate_demo_world(tmp_path / "again", seed=3, samples_per_shard=50, **SIZES)
    assert _digest(world.root) == _digest(again.root)
    other = generate_demo_world(tmp_path / "other", seed=4, samples_per_shard=50, **SIZES)
    a, b = _digest(world.root), _digest(other.root)
    assert a.keys() == b.keys()
    assert a["web/web-000000.tar"] != b["web/web-000000.tar"]


def test_idempotent(world) -> None:
    before = os.path.getmtime(world.web_shards[0])
    same = generate_demo_world(world.root, seed=3, samples_per_shard=50, **SIZES)
    assert same == world
    assert os.path.getmtime(world.web_shards[0]) == before


def test_counts_match_manifests(world) -> None:
    for shards, n, kind in (
        (world.web_shards, SIZES["n_web"], "demo-web"),
        (world.clean_shards, SIZES["n_clean"], "demo-clean"),
        (world.retrieval_shards, SIZES["n_retrieval"], "demo-retrieval"),
    ):
        manifest = read_manifest(os.path.dirname(shards[0]))
        assert manifest.kind == kind
        assert manifest.samples_out == n == sum(s["samples"] for s in manifest.shards)
        assert [s["name"] for s in manifest.shards] == [os.path.basename(p) for p in shards]
        for entry, path in zip(manifest.shards, shards, strict=True):
            samples = list(iter_samples(path))
            assert len(samples) == entry["samples"]
            for s in samples:
                assert s["jpg"].size == (32, 32)
                meta = s["json"]
                assert meta["key"] == s["__key__"] and meta["width"] == meta["height"] == 32
                assert set(meta["attributes"]) == set(ATTRIBUTES)
                assert all(meta["attributes"][k] in v for k, v in ATTRIBUTES.items())
    assert len(world.web_shards) == 3  # 120 samples at 50 per shard


def test_web_captions_partial_and_noisy(world) -> None:
    samples = [s for p in world.web_shards for s in iter_samples(p)]
    full = mentions = wrong = 0
    for s in samples:
        attrs, said, text = s["json"]["attributes"], s["json"]["mentioned"], s["txt"]
        words = _words(text)
        for name, value in said.items():
            if name == "shape":
                assert value in words or words & SYNONYMS[value], text
            elif name == "colour":
                assert value in words, text
                wrong += value != attrs["colour"]
            elif name == "size":
                continue  # synonyms: tiny, big, ...
        mentions += bool(said)
        full += len(said) == 4
    n = len(samples)
    assert full <= 0.1 * n  # web captions are partial
    assert 0.75 * n <= mentions < n  # mostly about the image, a few pure noise ("click here for more")
    assert wrong >= 1  # sometimes a wrong colour


def test_clean_captions_complete(world) -> None:
    for path in world.clean_shards + world.retrieval_shards:
        for s in iter_samples(path):
            attrs = s["json"]["attributes"]
            captions = s["json"]["captions"]
            assert s["txt"] == captions[0] and len(set(captions)) == 5
            for caption in captions:
                for value in attrs.values():
                    assert value in caption, (caption, attrs)


def test_caption_functions_directly() -> None:
    rng = np.random.default_rng(0)
    attrs = {"shape": "star", "colour": "orange", "size": "large", "position": "top left"}
    for c in clean_captions(attrs, rng, k=5):
        assert "an orange" in c or "large orange" in c
    texts = [web_caption(attrs, rng)[0] for _ in range(200)]
    assert any("orange" in t.lower() for t in texts) and any("orange" not in t.lower() for t in texts)


def test_imagefolder_layout(world) -> None:
    classes = sorted(
        d for d in os.listdir(world.zeroshot_dir) if os.path.isdir(os.path.join(world.zeroshot_dir, d))
    )
    assert len(classes) == len(ATTRIBUTES["colour"]) * len(ATTRIBUTES["shape"])
    names = Path(world.classnames_file).read_text().splitlines()
    assert names == [c.replace("_", " ") for c in classes]
    assert "red circle" in names
    for c in classes:
        files = sorted(os.listdir(os.path.join(world.zeroshot_dir, c)))
        assert len(files) == SIZES["n_zeroshot_per_class"]
        with Image.open(os.path.join(world.zeroshot_dir, c, files[0])) as im:
            assert im.size == (32, 32) and im.format == "JPEG"
    # the object really has its class colour: the most saturated pixels are near the class colour
    folder = os.path.join(world.zeroshot_dir, "red_square")
    with Image.open(os.path.join(folder, sorted(os.listdir(folder))[0])) as red:
        pixels = np.asarray(red, dtype=float)
    sat = pixels.max(-1) - pixels.min(-1)
    r, g, b = pixels[sat > np.percentile(sat, 95)].mean(0)
    assert r > 150 and g < 100 and b < 100


def test_torchvision_imagefolder_reads_it(world) -> None:
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(world.zeroshot_dir)
    assert len(ds) == 36 * SIZES["n_zeroshot_per_class"]
    assert ds.classes[0] == "blue_circle"


def test_new_parameters_regenerate_without_stale_shards(tmp_path) -> None:
    small = {**SIZES, "n_web": 40, "n_zeroshot_per_class": 1}
    first = generate_demo_world(tmp_path, seed=0, samples_per_shard=10, **small)
    assert len(first.web_shards) == 4
    second = generate_demo_world(tmp_path, seed=0, samples_per_shard=20, **small)
    assert len(second.web_shards) == 2
    assert sorted(os.listdir(tmp_path / "web")) == ["manifest.json", "web-000000.tar", "web-000001.tar"]
    assert read_manifest(tmp_path / "web").samples_out == 40
