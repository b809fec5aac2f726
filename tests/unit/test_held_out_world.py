"""The demo world in the paper's data regime (docs/ablation-design.md): a third of the classes never reach the
student's web shards, the teacher's data has every class with clean captions, and the world records which."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from siclip.config import ConfigError
from siclip.data.demo_world import ATTRIBUTES, DemoWorld, generate_demo_world, names_a_class
from siclip.data.shards import iter_samples
from siclip.demo import demo_config, held_out_mentions, prepare_demo, student_shards

SIZES = {
    "n_web": 150,
    "n_clean": 20,
    "n_retrieval": 10,
    "n_zeroshot_per_class": 1,
    "image_size": 32,
    "samples_per_shard": 50,
}
# docs/ablation-design.md's table, written out by hand
DESIGN_TABLE = {
    "red": ("circle", "star"),
    "green": ("triangle", "diamond"),
    "blue": ("square", "cross"),
    "yellow": ("circle", "star"),
    "purple": ("triangle", "diamond"),
    "orange": ("square", "cross"),
}
HELD_OUT = {(c, s) for c, shapes in DESIGN_TABLE.items() for s in shapes}
SHAPE_WORDS = {
    "circle": ("circle", "round", "ball", "dot", "disc"),
    "square": ("square", "box", "block", "tile"),
    "triangle": ("triangle", "pyramid", "wedge"),
    "star": ("star", "starburst"),
    "cross": ("cross", "plus"),
    "diamond": ("diamond", "rhombus", "lozenge"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> DemoWorld:
    return generate_demo_world(tmp_path_factory.mktemp("held"), held_out=True, n_teacher=200, **SIZES)


def _samples(shards: list[str]) -> list[dict]:
    return [s for p in shards for s in iter_samples(p)]


def _naive_names(text: str, colour: str, shape: str) -> bool:
    words = text.lower().split()
    return any(a == colour and b.startswith(SHAPE_WORDS[shape]) for a, b in itertools.pairwise(words))


def test_the_rule_holds_out_the_design_table_a_third_of_the_classes(world: DemoWorld) -> None:
    assert set(world.held_out_classes) == {f"{c}_{s}" for c, s in HELD_OUT}
    assert len(HELD_OUT) * 3 == len(ATTRIBUTES["colour"]) * len(ATTRIBUTES["shape"])
    record = json.loads(Path(world.root, "demo_world.json").read_text())
    assert set(record["held_out_classes"]) == set(world.held_out_classes)
    listed = Path(world.zeroshot_dir, "held_out_classes.txt").read_text().split()
    assert set(listed) == set(world.held_out_classes)
    # the zero-shot folder still holds every class, held-out ones included
    folders = {d for d in os.listdir(world.zeroshot_dir) if Path(world.zeroshot_dir, d).is_dir()}
    assert len(folders) == 36 and set(listed) < folders


def test_held_out_classes_never_reach_the_student_web_shards(world: DemoWorld) -> None:
    samples = _samples(world.web_shards)
    assert len(samples) == SIZES["n_web"]
    seen = set()
    for s in samples:
        attrs, said, text = s["json"]["attributes"], s["json"]["mentioned"], s["txt"]
        assert (attrs["colour"], attrs["shape"]) not in HELD_OUT
        assert (said.get("colour"), attrs["shape"]) not in HELD_OUT, text
        for colour, shape in HELD_OUT:
            assert not _naive_names(text, colour, shape), text
            assert not names_a_class(text, f"{colour}_{shape}"), text
        seen.add((attrs["colour"], attrs["shape"]))
    # every colour and every shape still occurs in the student's data
    assert {c for c, _ in seen} == set(ATTRIBUTES["colour"])
    assert {s for _, s in seen} == set(ATTRIBUTES["shape"])


def test_the_teacher_split_has_every_class_with_clean_captions(world: DemoWorld) -> None:
    samples = _samples(world.teacher_shards)
    assert len(samples) == 200
    classes = {(s["json"]["attributes"]["colour"], s["json"]["attributes"]["shape"]) for s in samples}
    assert classes > HELD_OUT
    for s in samples:
        for caption in s["json"]["captions"]:
            assert all(v in caption for v in s["json"]["attributes"].values()), caption
    clean = _samples(world.clean_shards)
    assert any(
        (s["json"]["attributes"]["colour"], s["json"]["attributes"]["shape"]) in HELD_OUT for s in clean
    )


def test_the_default_world_has_no_held_out_classes_and_no_teacher_split(tmp_path: Path) -> None:
    plain = generate_demo_world(tmp_path, **SIZES)
    assert plain.held_out_classes == () and plain.teacher_shards == []
    assert not Path(plain.zeroshot_dir, "held_out_classes.txt").exists()
    assert not (tmp_path / "teacher").exists()
    attrs = {
        (s["json"]["attributes"]["colour"], s["json"]["attributes"]["shape"])
        for s in _samples(plain.web_shards)
    }
    assert attrs & HELD_OUT


def test_names_a_class_against_the_naive_reference() -> None:
    texts = [
        "Buy Red Ball online",
        "a large red circle at the top",
        "RED ICON",
        "red, circle",
        "a red star shape",
    ]
    for text in texts:
        for colour, shape in HELD_OUT:
            assert names_a_class(text, f"{colour}_{shape}") == _naive_names(
                text.replace(",", " ,"), colour, shape
            )


def test_synthetic_captions_naming_a_held_out_class_are_counted(tmp_path: Path) -> None:
    from siclip.data.shards import AtomicShardWriter

    path = str(tmp_path / "syn-000000.tar")
    with AtomicShardWriter(path) as writer:
        writer.write({"__key__": "0", "txt": "x", "syn.json": {"syn_text": ["a red circle", "a red square"]}})
        writer.write({"__key__": "1", "txt": "y", "syn.json": {"syn_text": ["a blue cross in the middle"]}})
    got = held_out_mentions([path], ("red_circle", "blue_cross"))
    assert got == {"captions": 3.0, "naming_held_out": 2.0, "share": pytest.approx(2 / 3)}


def test_the_student_takes_every_web_shard_of_the_held_out_world(world: DemoWorld, tmp_path: Path) -> None:
    shards = student_shards(world, str(tmp_path), len(world.web_shards))
    assert [Path(p).name for p in shards] == [Path(p).name for p in world.web_shards]
    with pytest.raises(ConfigError, match="student_web_shards"):
        student_shards(world, str(tmp_path), len(world.web_shards) + 1)


def test_one_demo_folder_never_mixes_the_two_worlds(tmp_path: Path) -> None:
    (tmp_path / "demo_regime.txt").write_text("default\n")
    with pytest.raises(ConfigError, match="default demo world"):
        prepare_demo(out_dir=str(tmp_path), quick=True, held_out=True)
    assert not (tmp_path / "world").exists()
    assert demo_config("demo", root=str(tmp_path)).eval.zeroshot_dir == str(tmp_path / "world" / "zeroshot")


def test_the_world_zero_shot_folder_gives_seen_and_unseen_accuracy(world: DemoWorld) -> None:
    """The held-out world's zero-shot folder alone makes the evaluation split its accuracy."""
    import torch
    import torch.nn.functional as F
    from torchvision.transforms.functional import to_tensor

    from siclip.eval.zeroshot import evaluate_zeroshot, load_classnames

    names = load_classnames(world.classnames_file)

    class ColourModel(torch.nn.Module):
        def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            return F.normalize(x.mean(dim=(2, 3)), dim=-1)

        def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
            return F.normalize(
                torch.rand(tokens.shape[0], 3, generator=torch.Generator().manual_seed(0)), dim=-1
            )

    got = evaluate_zeroshot(
        ColourModel(),
        tokenizer=lambda texts: torch.tensor([names.index(t) for t in texts])[:, None],
        transform=to_tensor,
        folder=world.zeroshot_dir,
        classnames=names,
        templates=["{}"],
    )
    assert set(got) == {f"zeroshot_top{k}{g}" for k in (1, 5) for g in ("", "_seen", "_unseen")}
    # 24 seen and 12 unseen classes, one image each: the overall accuracy is their weighted mean
    assert got["zeroshot_top1"] == pytest.approx(
        (24 * got["zeroshot_top1_seen"] + 12 * got["zeroshot_top1_unseen"]) / 36
    )
