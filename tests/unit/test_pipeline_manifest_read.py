"""Only a missing manifest means "nothing built yet": any other failure to read it stops the build untouched.

An earlier build's ``manifest.json`` that cannot be read (a permission error, an expired token, a store
answering 503) or that is damaged (cut short, not JSON) must stop ``run_pipeline`` before it builds anything,
with one line naming the file, and leave the manifest exactly as it was: starting afresh would rebuild every
shard (GPU-days) and overwrite the record, and a damaged record must not let changed settings slip past the
rerun guard. The guard itself covers what else changes an output byte: the input shards and the crop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import siclip.data.pipeline as pipeline
from siclip.config import ConfigError, from_dict, to_dict
from siclip.data import shards
from siclip.data.shards import (
    Manifest,
    ManifestError,
    ManifestNotFoundError,
    read_manifest,
    write_manifest,
)
from tests.data_fixtures import good_sample, write_tar


def _setup(tmp_path: Path, **caption: Any) -> tuple[Any, Path]:
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "00000.tar", good_sample("a", 0))
    out = tmp_path / "out"
    cfg = from_dict(
        {
            "caption": {
                "input_shards": [str(src / "00000.tar")],
                "output_dir": str(out),
                "model": "siclip-tiny-coca",
                "source": "",
                **caption,
            }
        }
    )
    return cfg, out


def _earlier_build(cfg: Any, out: Path) -> bytes:
    config = {"caption": to_dict(cfg.caption)}
    write_manifest(
        str(out), Manifest(kind="cc12m-syn", shards=[{"name": "x.tar", "samples": 1}], config=config)
    )
    return (out / "manifest.json").read_bytes()


def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reaching Ray means the build went on: fail loudly instead."""

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("the build started")

    monkeypatch.setattr("siclip.ray_session.init_ray", refuse)


@pytest.mark.parametrize(
    "error",
    [PermissionError(13, "Permission denied"), OSError(5, "503 Slow Down"), TimeoutError("token expired")],
)
def test_an_unreadable_manifest_stops_the_build_and_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    cfg, out = _setup(tmp_path)
    before = _earlier_build(cfg, out)
    real_open = shards.open_url

    def failing_open(url: str, mode: str = "rb") -> Any:
        if url.endswith("manifest.json"):
            raise error
        return real_open(url, mode)

    monkeypatch.setattr(shards, "open_url", failing_open)
    _no_ray(monkeypatch)
    with pytest.raises(pipeline.ShardBuildError) as info:
        pipeline.run_pipeline(cfg, progress=False)
    message = str(info.value)
    assert "\n" not in message and str(out / "manifest.json") in message
    assert type(error).__name__ in message
    assert (out / "manifest.json").read_bytes() == before
    assert not (out / "00000.tar").exists()


@pytest.mark.parametrize("damage", ["truncated", "not json", "not utf-8", "wrong keys"])
def test_a_damaged_manifest_is_an_error_not_a_fresh_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    cfg, out = _setup(tmp_path)
    whole = _earlier_build(cfg, out)
    broken = {
        "truncated": whole[: len(whole) // 2],
        "not json": b"<html>503 Service Unavailable</html>",
        "not utf-8": b"\xff\xfe{",
        "wrong keys": b'{"schema_version": 1, "shards": 7}',
    }[damage]
    (out / "manifest.json").write_bytes(broken)
    _no_ray(monkeypatch)
    # With other caption settings too: a damaged record must not let them through.
    changed = from_dict({"caption": {**to_dict(cfg.caption), "num_captions": 3}})
    for attempt in (cfg, changed):
        with pytest.raises(pipeline.ShardBuildError, match=str(out / "manifest.json")):
            pipeline.run_pipeline(attempt, progress=False)
    assert (out / "manifest.json").read_bytes() == broken


def test_only_a_missing_manifest_reads_as_not_found(tmp_path: Path) -> None:
    with pytest.raises(ManifestNotFoundError):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert not isinstance(info.value, ManifestNotFoundError)
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").mkdir()  # there, but unreadable as a file
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert not isinstance(info.value, ManifestNotFoundError)


# ---- the rerun guard: what else changes an output byte ---------------------------------------------------------


def _built_with(out: Path, cfg: Any, **build: Any) -> None:
    config = {"caption": to_dict(cfg.caption), "build": build}
    write_manifest(
        str(out), Manifest(kind="cc12m-syn", shards=[{"name": "00000.tar", "samples": 1}], config=config)
    )


def test_other_input_shards_into_the_same_folder_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, out = _setup(tmp_path)
    src = tmp_path / "src"
    write_tar(src / "00001.tar", good_sample("b", 1))
    _built_with(out, cfg, center_crop=False, inputs=[str(src / "00000.tar")])
    before = (out / "manifest.json").read_bytes()
    _no_ray(monkeypatch)
    more = from_dict({"caption": {**to_dict(cfg.caption), "input_shards": [str(src / "0000*.tar")]}})
    with pytest.raises(ConfigError) as info:
        pipeline.run_pipeline(more, progress=False)
    message = str(info.value)
    assert message.startswith("caption.input_shards:") and "\n" not in message
    assert str(src / "00001.tar") in message and str(out) in message
    other = from_dict({"caption": {**to_dict(cfg.caption), "input_shards": [str(src / "00001.tar")]}})
    with pytest.raises(ConfigError, match=r"caption\.input_shards: .*00001\.tar.*00000\.tar"):
        pipeline.run_pipeline(other, progress=False)
    assert (out / "manifest.json").read_bytes() == before


def test_cropped_and_uncropped_shards_never_mix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, out = _setup(tmp_path)
    _built_with(out, cfg, center_crop=False, inputs=[str(tmp_path / "src" / "00000.tar")])
    _no_ray(monkeypatch)
    with pytest.raises(ConfigError, match=r"^center_crop: got True but .* was built with False"):
        pipeline.run_pipeline(cfg, progress=False, center_crop=True)


def test_the_same_inputs_given_another_way_are_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A glob, a brace list or a relative path naming the same shards is no change."""
    cfg, out = _setup(tmp_path)
    src = tmp_path / "src"
    _built_with(out, cfg, center_crop=False, inputs=[str(src / "00000.tar")])
    monkeypatch.chdir(tmp_path)
    same = from_dict({"caption": {**to_dict(cfg.caption), "input_shards": ["src/0000{0..0}.tar"]}})
    (out / "00000.tar").write_bytes(b"")  # finished before: nothing left to build, so no Ray needed
    _no_ray(monkeypatch)
    manifest = pipeline.run_pipeline(same, progress=False)
    assert [s["name"] for s in manifest.shards] == ["00000.tar"]


def test_a_resume_rebuilds_a_shard_whose_size_is_not_the_recorded_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node crash can leave a short file under the final name: its recorded size gives it away."""
    cfg, out = _setup(tmp_path)
    out.mkdir()
    (out / "00000.tar").write_bytes(b"\0" * 2048)
    config = {
        "caption": to_dict(cfg.caption),
        "build": {"center_crop": False, "inputs": [str(tmp_path / "src" / "00000.tar")]},
    }
    entry = {"name": "00000.tar", "samples": 1, "samples_in": 1, "skipped": {}, "bytes": 2048}
    write_manifest(
        str(out), Manifest(kind="cc12m-syn", shards=[entry], samples_in=1, samples_out=1, config=config)
    )
    _no_ray(monkeypatch)
    assert [s["name"] for s in pipeline.run_pipeline(cfg, progress=False).shards] == ["00000.tar"]  # intact
    (out / "00000.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(AssertionError, match="the build started"):  # rebuilt, not taken as finished
        pipeline.run_pipeline(cfg, progress=False)


def test_the_demo_drops_captions_made_from_another_demo_world(tmp_path: Path) -> None:
    """``siclip demo`` after ``siclip demo --quick`` in the same folder: the world has other web shards, so
    its derived CC12M-SYN folder is captioned again instead of being refused by the rerun guard."""
    from siclip.demo import drop_stale_captions

    cfg, out = _setup(tmp_path)
    src = tmp_path / "src"
    _built_with(out, cfg, center_crop=False, inputs=[str(src / "00000.tar")])
    drop_stale_captions(cfg)  # the same inputs: kept
    assert (out / "manifest.json").is_file()
    write_tar(src / "00001.tar", good_sample("b", 1))
    bigger = from_dict({"caption": {**to_dict(cfg.caption), "input_shards": [str(src / "*.tar")]}})
    drop_stale_captions(bigger)
    assert not out.exists()
