"""The demo's data regime mirrors the paper's: the teacher learns from more and cleaner data, for longer,
than the student, whose rows see only a small web subset with its synthetic captions (CC12M-SYN's role)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from siclip.config import ConfigError, expand_shards
from siclip.data.demo_world import DemoWorld, generate_demo_world
from siclip.data.shards import iter_samples
from siclip.demo import DEMO_SIZES, demo_config, student_shards


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoWorld]:
    """A tiny world (6 web shards) under a demo root, its web shards copied to where CC12M-SYN would be."""
    root = tmp_path_factory.mktemp("demo")
    world = generate_demo_world(
        root / "world",
        n_web=120,
        n_clean=30,
        n_retrieval=10,
        n_zeroshot_per_class=1,
        image_size=32,
        samples_per_shard=20,
    )
    syn = Path(demo_config("demo", root=str(root)).caption.output_dir)
    syn.mkdir(parents=True)
    for shard in world.web_shards:
        shutil.copy(shard, syn / Path(shard).name)
    return root, world


def _keys(shards: list[str]) -> set[tuple[str, str]]:
    return {(Path(s).parent.name, sample["__key__"]) for s in shards for sample in iter_samples(s)}


def test_teacher_sees_the_clean_split_and_every_web_image_the_student_a_web_subset(
    demo: tuple[Path, DemoWorld],
) -> None:
    root, world = demo
    teacher = demo_config("demo_teacher", root=str(root))
    syn_dir = demo_config("demo", root=str(root)).caption.output_dir
    student = student_shards(world, syn_dir, 2)
    assert student == [str(Path(syn_dir) / f"web-00000{i}.tar") for i in range(2)]

    teacher_keys = _keys(expand_shards(teacher.data.train_shards))
    student_keys = {("web", k) for _, k in _keys(student)}
    clean = {("clean", k) for _, k in _keys(world.clean_shards)}
    web = {("web", k) for _, k in _keys(world.web_shards)}
    teacher_keys = {("web" if d == "web_syn" else d, k) for d, k in teacher_keys}
    assert teacher_keys == clean | web  # the clean split's complete captions and the whole web set
    assert len(student_keys) == 40 and student_keys < web and not student_keys & clean
    assert teacher.data.synthetic == "sum"  # the web set with its synthetic captions too


@pytest.mark.parametrize("mode", sorted(DEMO_SIZES))
def test_each_demo_size_gives_the_teacher_more_data_and_more_steps(mode: str) -> None:
    sizes = DEMO_SIZES[mode]
    world = sizes["world"]
    web_shards = -(-world["n_web"] // world["samples_per_shard"])
    student_images = sizes["student_web_shards"] * world["samples_per_shard"]
    assert 1 <= sizes["student_web_shards"] < web_shards
    assert (world["n_clean"] + world["n_web"]) >= 3 * student_images
    assert sizes["teacher_steps"] > sizes["student_steps"]


def test_the_configs_match_the_full_demo() -> None:
    """``siclip train --config configs/demo.yaml`` after the demo trains on the data the demo's student used."""
    full = DEMO_SIZES["full"]
    student = demo_config("demo")
    names = [Path(p).name for p in expand_shards(student.data.train_shards)]
    assert names == [f"web-{i:06d}.tar" for i in range(full["student_web_shards"])]
    assert demo_config("demo_teacher").train.max_steps == full["teacher_steps"]
    assert student.train.max_steps == full["student_steps"]


def test_the_student_subset_must_leave_the_teacher_more(demo: tuple[Path, DemoWorld]) -> None:
    _, world = demo
    with pytest.raises(ConfigError, match=r"^student_web_shards: got 6; allowed: 1 to 5 "):
        student_shards(world, "syn", 6)
    with pytest.raises(ConfigError, match=r"^student_web_shards: got 0;"):
        student_shards(world, "syn", 0)


def test_student_experiment_overrides_stay_off_the_teacher_stage() -> None:
    from siclip.demo import teacher_overrides

    kept = teacher_overrides(["profile=paper", "model.sasp.qk_init=zero", "loss.fd_weight=1", "train.seed=3"])
    assert kept == ["train.seed=3"]
