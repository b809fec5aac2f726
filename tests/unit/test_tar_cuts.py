"""A shard is finished only when its tar was read to the end: a cut anywhere is a failed read, never bad data.

A tar (img2dataset's layout: KEY.jpg, KEY.txt, KEY.json per sample) is cut at every kind of place: at a
member header, inside one, inside a member's data, inside its padding, inside the end-of-archive marker; each
cut is read from a file at rest and from a stream whose object size is known. Every one must raise
``ShardIOError`` (which the build retries and never records as finished), and must never come out of the read
stage as kept samples or skip counts.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

import siclip.data.prepare as prepare
from siclip.data import shards
from siclip.data.prepare import prepare_shard
from siclip.data.shards import ShardIOError, iter_tar_members
from tests.data_fixtures import good_sample, write_tar

N = 6


def _whole(tmp_path: Path) -> tuple[bytes, list[tarfile.TarInfo]]:
    path = tmp_path / "whole.tar"
    write_tar(path, [m for i in range(N) for m in good_sample(f"s{i}", i)])
    with tarfile.open(path) as tar:
        return path.read_bytes(), tar.getmembers()


def _cut_at(tmp_path: Path, where: str) -> tuple[bytes, int]:
    data, members = _whole(tmp_path)
    third = members[6]  # the first member of the 3rd sample
    last = members[-1]
    marker = last.offset_data + (last.size + 511) // 512 * 512  # the end-of-archive marker
    at = {
        "at a header": third.offset,
        "100 bytes into a header": third.offset + 100,
        "in data": third.offset_data + 100,
        "in padding": third.offset_data + third.size + 3,
        "at the end-of-archive marker": marker,
        "inside the end-of-archive marker": marker + 700,
    }[where]
    assert 0 < at < len(data)
    return data, at


WHERE = [
    "at a header",
    "100 bytes into a header",
    "in data",
    "in padding",
    "at the end-of-archive marker",
    "inside the end-of-archive marker",
]


class _SizedStream(io.BytesIO):
    """What an object store hands over: the bytes that came, and the size the object has."""

    def __init__(self, data: bytes, size: int) -> None:
        super().__init__(data)
        self.size = size


@pytest.mark.parametrize("where", WHERE)
def test_a_tar_at_rest_cut_anywhere_is_a_failed_read(tmp_path: Path, where: str) -> None:
    data, at = _cut_at(tmp_path, where)
    url = tmp_path / "in-000000.tar"
    url.write_bytes(data[:at])
    with pytest.raises(ShardIOError, match=r"in-000000\.tar: incomplete tar"):
        list(iter_tar_members(str(url)))
    with pytest.raises(ShardIOError):
        prepare_shard(str(url), image_size=8)


@pytest.mark.parametrize("where", WHERE)
def test_a_stream_cut_anywhere_is_a_failed_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    data, at = _cut_at(tmp_path, where)
    monkeypatch.setattr(shards, "open_url", lambda url, mode="rb": _SizedStream(data[:at], len(data)))
    with pytest.raises(ShardIOError, match=rf"the stream ended after {at} of {len(data)} bytes"):
        prepare_shard("s3://bucket/cc12m/00000.tar", image_size=8)


def test_a_stream_cut_after_the_tar_content_is_still_a_failed_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the end-of-archive marker the tar reads whole, but the object is longer: the stream was cut."""
    data, _ = _whole(tmp_path)
    at = len(data) - 512  # inside the zero padding that fills the last record
    monkeypatch.setattr(shards, "open_url", lambda url, mode="rb": _SizedStream(data[:at], len(data)))
    with pytest.raises(ShardIOError, match=rf"ended after {at} of {len(data)} bytes"):
        list(iter_tar_members("s3://bucket/cc12m/00000.tar"))
    monkeypatch.setattr(shards, "open_url", lambda url, mode="rb": _SizedStream(data, len(data)))
    assert len(list(iter_tar_members("s3://bucket/cc12m/00000.tar"))) == 3 * N


@pytest.mark.parametrize("where", ["at a header", "at the end-of-archive marker"])
def test_a_cut_tar_with_img2dataset_stats_is_a_failed_read(tmp_path: Path, where: str) -> None:
    data, at = _cut_at(tmp_path, where)
    url = tmp_path / "in-000000.tar"
    url.write_bytes(data[:at])
    (tmp_path / "in-000000_stats.json").write_text(json.dumps({"count": N, "successes": N}))
    with pytest.raises(ShardIOError):
        prepare_shard(str(url), image_size=8)


def test_fewer_samples_than_img2dataset_wrote_is_a_failed_read(tmp_path: Path) -> None:
    """A whole, well-formed tar holding fewer samples than its _stats.json says is not the tar it wrote."""
    url = tmp_path / "in-000000.tar"
    write_tar(url, [m for i in range(N - 2) for m in good_sample(f"s{i}", i)])
    (tmp_path / "in-000000_stats.json").write_text(json.dumps({"count": N + 3, "successes": N}))
    with pytest.raises(ShardIOError, match=rf"{N - 2} samples where img2dataset's stats say it wrote {N}"):
        prepare_shard(str(url), image_size=8)
    (tmp_path / "in-000000_stats.json").write_text(json.dumps({"count": N + 3, "successes": N - 2}))
    prepared = prepare_shard(str(url), image_size=8)
    assert prepared.samples_in == N - 2 and prepared.skipped == {}


@pytest.mark.parametrize("where", WHERE)
def test_the_read_stage_retries_a_cut_tar_and_hands_on_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The read task raises ShardIOError (Ray retries exactly that type) after its wait: no row, no counts."""
    waited: list[float] = []
    monkeypatch.setattr(prepare.time, "sleep", waited.append)
    data, at = _cut_at(tmp_path, where)
    url = tmp_path / "in-000000.tar"
    url.write_bytes(data[:at])
    with pytest.raises(ShardIOError):
        prepare.prepare_row(
            {"url": str(url), "name": "in-000000.tar"},
            image_size=8,
            center_crop=False,
            min_image_size=0,
            max_aspect_ratio=10.0,
            retry_delay_s=1.5,
        )
    assert waited == [1.5]


def test_bad_compressed_data_in_the_middle_is_damage_not_a_cut(tmp_path: Path) -> None:
    """Bytes that are all there but do not decompress stop a member short too: that is bad data, counted.

    (Damage that instead makes the compressed stream *end* early cannot be told from a cut by the tar's
    bytes; those spots are left out here. img2dataset's shards are plain tars.)
    """
    import gzip
    import zlib

    import numpy as np

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(40):
            data = (b"abc%d " % i) * 5000 + rng.integers(0, 4, 5000, dtype=np.uint8).tobytes()
            info = tarfile.TarInfo(f"{i:05d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = gzip.compress(buf.getvalue())
    errors = []
    for at in range(len(whole) // 5, len(whole) * 4 // 5, len(whole) // 10):
        bad = whole[:at] + b"\xff" * 2000 + whole[at + 2000 :]
        try:
            gzip.decompress(bad)
            continue
        except zlib.error:  # the decompressor refuses the bytes: what this test is about
            pass
        except (EOFError, OSError):  # the stream ends early (or its CRC fails): not this case
            continue
        path = tmp_path / f"bad-{at}.tar.gz"
        path.write_bytes(bad)
        try:
            list(iter_tar_members(str(path)))
        except ShardIOError as exc:
            raise AssertionError(f"damage at byte {at} read as a failed read: {exc}") from exc
        except tarfile.TarError as exc:
            errors.append(exc)
    assert errors  # at least one of the spots breaks the compressed stream
