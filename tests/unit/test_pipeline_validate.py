"""The pipeline's Ray-free half: reading, validating and counting every sample of a shard (``prepare_shard``).

Every sample that goes in comes out either kept or counted under a reason of ``SKIP_REASONS``; a bad-sample
kind that is dropped without being counted breaks ``samples_in == kept + skipped`` and fails here.
"""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siclip.data.prepare import SKIP_REASONS, prepare_shard, read_tar_groups
from tests.data_fixtures import BAD_SAMPLES, good_sample, write_tar

KINDS = ["good", *BAD_SAMPLES]


def _as(key: str, members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The same members under another sample key."""
    return [(f"{key}.{name.split('.', 1)[1]}", data) for name, data in members]


def _sample(kind: str, key: str) -> list[tuple[str, bytes]]:
    return _as(key, good_sample("x", 0) if kind == "good" else BAD_SAMPLES[kind])


def test_every_bad_kind_has_a_reason() -> None:
    assert set(BAD_SAMPLES) <= set(SKIP_REASONS)


@pytest.mark.parametrize("kind", sorted(BAD_SAMPLES))
def test_each_bad_kind_is_skipped_and_counted_under_its_reason(kind: str, tmp_path: Path) -> None:
    url = tmp_path / "one.tar"
    write_tar(url, _sample("good", "g0") + _sample(kind, "bad") + _sample("good", "g1"))
    out = prepare_shard(str(url), image_size=8)
    assert out.keys == ["g0", "g1"]
    assert out.skipped == {kind: 1} and out.samples_in == 3


def test_duplicates_and_a_damaged_tar_are_counted(tmp_path: Path) -> None:
    url = tmp_path / "dup.tar"
    write_tar(url, _sample("good", "a") + _sample("good", "b") + _sample("good", "a"))
    out = prepare_shard(str(url), image_size=8)
    assert out.keys == ["a", "b"] and out.skipped == {"duplicate_key": 1} and out.samples_in == 3
    whole = tmp_path / "whole.tar"
    write_tar(whole, [m for i in range(4) for m in _sample("good", f"d{i}")])
    with tarfile.open(whole) as tar:
        at = tar.getmember("d2.jpg").offset  # the 3rd sample's first header: bytes, but no header
    data = bytearray(whole.read_bytes())
    data[at : at + 512] = b"\x07" * 512
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(data))
    groups, readable = read_tar_groups(str(damaged))
    assert not readable and [k for k, _ in groups] == ["d0", "d1"]
    out = prepare_shard(str(damaged), image_size=8)
    assert out.keys == ["d0", "d1"] and out.skipped == {"unreadable_tar": 1} and out.samples_in == 3


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=12))
def test_any_mixture_is_fully_accounted_for(kinds: list[str], tmp_path: Path) -> None:
    url = tmp_path / "mix.tar"
    write_tar(url, [m for i, kind in enumerate(kinds) for m in _sample(kind, f"s{i:03d}")])
    out = prepare_shard(str(url), image_size=8)
    want = Counter(k for k in kinds if k != "good")
    assert out.skipped == dict(want)
    assert out.keys == [f"s{i:03d}" for i, k in enumerate(kinds) if k == "good"]
    assert out.samples_in == len(kinds) == len(out.keys) + sum(out.skipped.values())
    assert len(out.jpgs) == len(out.txts) == len(out.metas) == len(out.keys)
