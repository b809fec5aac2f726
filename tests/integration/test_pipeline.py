"""Ray Data pipeline (CC12M -> CC12M-SYN) on generated shards holding every kind of bad sample."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from siclip.config import ConfigError, from_dict
from siclip.data.shards import read_manifest
from tests.data_fixtures import BAD_SAMPLES, good_sample, noise_jpeg, write_tar

pytestmark = pytest.mark.ray

K = 2
IMAGE_SIZE = 16


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cc12m")
    shard0 = good_sample("a0", 0) + good_sample("a1", 1)
    for members in BAD_SAMPLES.values():
        shard0 += members
    shard0 += [
        *good_sample("a2", 2),
        ("a1.jpg", noise_jpeg(11)),
        ("a1.txt", b"same key again"),
    ]  # duplicate key
    write_tar(root / "in-000000.tar", shard0)
    write_tar(root / "in-000001.tar", [m for i in range(7) for m in good_sample(f"c{i}", 100 + i)])
    whole = root / "whole.tar"
    write_tar(whole, [m for i in range(4) for m in good_sample(f"d{i}", 200 + i)])
    with tarfile.open(whole) as tar:
        at = tar.getmember("d2.jpg").offset  # the 3rd sample's header: damaged bytes, not a cut
    data = bytearray(whole.read_bytes())
    whole.unlink()
    data[at : at + 512] = b"\x07" * 512
    (root / "in-000002.tar").write_bytes(bytes(data))
    (root / "in-000003.tar").write_bytes(b"not a tar archive " * 64)
    # The teacher's weights: a teacher without any is refused (its embeddings would mean nothing).
    import torch

    from siclip.models.presets import build_preset

    torch.manual_seed(0)
    torch.save(build_preset("tiny-teacher").state_dict(), root / "teacher.pt")
    return root


def _cfg(
    inputs: Path,
    out: Path,
    teacher_overrides: dict[str, str] | None = None,
    ray: dict[str, object] | None = None,
    **caption: object,
) -> object:
    base = {
        "input_shards": [str(inputs / "in-{000000..000003}.tar")],
        "output_dir": str(out),
        "model": "siclip-tiny-coca",
        "source": "",
        "num_captions": K,
        "max_length": 8,
        "batch_size": 3,
        "num_cpus_per_actor": 0.5,
        "image_size": IMAGE_SIZE,
        "min_image_size": 8,
        "retry_delay_s": 0.0,
    }
    base.update(caption)
    teacher = {"name": "tiny-teacher", "source": str(inputs / "teacher.pt")}
    teacher.update(teacher_overrides or {})
    return from_dict({"caption": base, "teacher": teacher, "ray": {"data_timeout_s": 120, **(ray or {})}})


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_build_counts_readback_and_resume(ray_session: None, inputs: Path, tmp_path: Path) -> None:
    import ray.data
    import webdataset as wds

    from siclip.data.pipeline import run_pipeline

    out = tmp_path / "syn"
    manifest = run_pipeline(_cfg(inputs, out, teacher_embeddings=True), progress=False)  # type: ignore[arg-type]

    expected_skips = dict.fromkeys(BAD_SAMPLES, 1)
    expected_skips["duplicate_key"] = 1
    expected_skips["unreadable_tar"] = 2  # the damaged tar and the garbage file
    assert manifest.skipped == dict(sorted(expected_skips.items()))
    assert manifest.samples_out == 3 + 7 + 2  # the damaged tar keeps the 2 samples before the damage
    assert manifest.samples_in == manifest.samples_out + manifest.samples_skipped
    assert [s["name"] for s in manifest.shards] == [f"in-00000{i}.tar" for i in range(4)]
    assert [s["samples"] for s in manifest.shards] == [3, 7, 2, 0]
    on_disk = read_manifest(out)
    assert on_disk.samples_out == manifest.samples_out and on_disk.skipped == manifest.skipped
    assert on_disk.producer["captioner"] == "siclip-tiny-coca"
    assert on_disk.config["caption"]["num_captions"] == K

    urls = [str(out / s["name"]) for s in manifest.shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == ["a0", "a1", "a2", *[f"c{i}" for i in range(7)], "d0", "d1"]
    for s in samples:
        assert min(s["jpg"].size) == IMAGE_SIZE  # shorter side resized, aspect kept
        assert s["jpg"].size[0] > s["jpg"].size[1]
        assert s["txt"].startswith("photo ")
        assert s["json"]["url"].endswith(".jpg")
        caps = s["syn.json"]["syn_text"]
        assert len(caps) == K and all(isinstance(c, str) for c in caps)
        assert not any("_of_text>" in c or "." in c for c in caps)  # cleaned (random weights: odd text)
        emb = s["npz"]  # the teacher's embeddings: image, then real caption + K synthetic ones
        assert emb["image_emb"].shape == (64,) and emb["text_emb"].shape == (1 + K, 64)
        assert emb["image_emb"].dtype == np.float16
        assert np.linalg.norm(emb["text_emb"].astype(np.float32), axis=1) == pytest.approx(1.0, abs=2e-3)
    rows = ray.data.read_webdataset([u for u in urls if not u.endswith("3.tar")], decoder=None).take_all()
    assert len(rows) == len(samples)
    assert all(len(json.loads(r["syn.json"])["syn_text"]) == K for r in rows)

    # Killed run: one shard gone, a half-written temp file left behind; the rerun redoes only that one.
    first = _shard_bytes(out)
    victim = out / "in-000001.tar"
    victim.unlink()
    (out / "in-000001.tar.tmp").write_bytes(b"half a tar")
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = run_pipeline(_cfg(inputs, out, teacher_embeddings=True), progress=False)  # type: ignore[arg-type]
    assert _shard_bytes(out) == first  # identical bytes, captions included (seeded per shard chunk)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in kept} == kept
    assert not (out / "in-000001.tar.tmp").exists()
    assert again.to_dict() == manifest.to_dict()

    # A rerun into the same folder with other caption settings would mix two datasets.
    with pytest.raises(ConfigError, match="num_captions"):
        run_pipeline(_cfg(inputs, out, teacher_embeddings=True, num_captions=3), progress=False)  # type: ignore[arg-type]
    # ... and so would embeddings of another teacher.
    other = {"source": str(inputs / "other-teacher.pt")}
    with pytest.raises(ConfigError, match=r"teacher.source: got '.*other-teacher.pt' but"):
        run_pipeline(_cfg(inputs, out, other, teacher_embeddings=True), progress=False)  # type: ignore[arg-type]
    assert on_disk.config["teacher"]["source"] == str(inputs / "teacher.pt")


def test_teacher_without_weights_is_refused(inputs: Path, tmp_path: Path) -> None:
    from siclip.data.pipeline import run_pipeline

    cfg = _cfg(inputs, tmp_path / "syn", {"source": ""}, teacher_embeddings=True)
    with pytest.raises(ConfigError, match=r"^teacher.source: got ''; caption.teacher_embeddings=true needs"):
        run_pipeline(cfg, progress=False)  # type: ignore[arg-type]
    assert not (tmp_path / "syn" / "manifest.json").exists()


FLAKY = """#!/bin/sh
# Fails while the attempt counter is in FAIL (a store that is down), then streams the tar.
echo x >> "$1.attempts"
n=$(wc -l < "$1.attempts")
case " $FAIL " in *" $n "*) echo "attempt $n: connection refused" >&2; exit 3;; esac
cat "$1"
"""


def test_failed_read_is_retried_and_never_marked_finished(
    ray_session: None, inputs: Path, tmp_path: Path
) -> None:
    from siclip.data.pipeline import ShardBuildError, run_pipeline

    src = tmp_path / "src"
    src.mkdir()
    (src / "in-000001.tar").write_bytes((inputs / "in-000001.tar").read_bytes())
    script = tmp_path / "flaky.sh"
    script.write_text(FLAKY.replace("$FAIL", "1 2"))
    flaky = f"pipe:sh {script} {src}/in-000001.tar"
    good = str(inputs / "in-000000.tar")
    # A copy cut at a member header: tarfile alone would read it as a shorter, complete tar.
    whole = (inputs / "in-000001.tar").read_bytes()
    with tarfile.open(inputs / "in-000001.tar") as tar:
        at = tar.getmember("c4.jpg").offset
    cut = src / "in-000009.tar"
    cut.write_bytes(whole[:at])
    out = tmp_path / "syn"

    def cfg(retries: int) -> object:
        # The pipe needs webdataset's pipes, which the test session turns off (WDS_SECURE=1).
        return _cfg(
            inputs,
            out,
            None,
            {"env_vars": {"WDS_SECURE": "0"}},
            input_shards=[good, flaky, str(cut)],
            max_retries=retries,
        )

    # No retries: the failed read and the cut tar fail their shards; the other is kept; the build names
    # the missing ones.
    with pytest.raises(
        ShardBuildError, match=r"2 shards could not be built \(in-000001.tar, in-000009.tar\)"
    ):
        run_pipeline(cfg(0), progress=False)  # type: ignore[arg-type]
    partial = read_manifest(out)
    assert [s["name"] for s in partial.shards] == ["in-000000.tar"]
    assert not (out / "in-000001.tar").exists() and not (out / "in-000009.tar").exists()
    assert partial.samples_in == partial.samples_out + partial.samples_skipped

    # One retry: attempt 2 fails too, attempt 3 (Ray's retry) reads the shard; the cut tar, downloaded
    # again, is read whole: the rerun completes both.
    cut.write_bytes(whole)
    manifest = run_pipeline(cfg(1), progress=False)  # type: ignore[arg-type]
    assert len((src / "in-000001.tar.attempts").read_text().split()) == 3
    assert [s["name"] for s in manifest.shards] == ["in-000000.tar", "in-000001.tar", "in-000009.tar"]
    assert [s["samples"] for s in manifest.shards] == [3, 7, 7]
    assert manifest.samples_in == manifest.samples_out + manifest.samples_skipped


def test_an_output_that_refuses_every_shard_stops_after_the_first_k(
    ray_session: None, inputs: Path, tmp_path: Path
) -> None:
    """The probe passes (the folder is writable) but every shard's final name is taken by a folder."""
    from siclip.data.pipeline import ShardBuildError, run_pipeline

    out = tmp_path / "syn"
    for i in range(4):
        (out / f"in-00000{i}.tar").mkdir(parents=True)
    with pytest.raises(
        ShardBuildError, match=r"the first 2 shards all failed to write .*IsADirectoryError"
    ) as info:
        run_pipeline(_cfg(inputs, out, stop_after_failed_writes=2, max_retries=0), progress=False)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert not (out / "manifest.json").exists()


def test_gpu_on_cpu_cluster_fails_fast(ray_session: None, inputs: Path, tmp_path: Path) -> None:
    from siclip.data.pipeline import run_pipeline

    with pytest.raises(
        RuntimeError,
        match=r"^caption\.num_gpus_per_actor=1: the captioner pool needs at least .* = 1 GPUs but the Ray cluster has 0",
    ):
        run_pipeline(_cfg(inputs, tmp_path / "gpu", num_gpus_per_actor=1.0), progress=False)  # type: ignore[arg-type]
    # fast = before any work: nothing written, not even a manifest (no wall-clock bound on a shared machine)
    assert not (tmp_path / "gpu").exists() or not any((tmp_path / "gpu").iterdir())


def test_no_inputs_fail_before_ray(tmp_path: Path) -> None:
    from siclip.data.pipeline import run_pipeline

    cfg = from_dict(
        {"caption": {"input_shards": [str(tmp_path / "none-*.tar")], "output_dir": str(tmp_path)}}
    )
    with pytest.raises(ConfigError, match="no input shards matched"):
        run_pipeline(cfg, progress=False)
    assert not os.path.exists(tmp_path / "manifest.json")
