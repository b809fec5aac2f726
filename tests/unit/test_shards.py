"""Shard format: atomic writes, round trips through webdataset, manifests and their errors, safe decoding."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from siclip.data.shards import (
    SCHEMA_VERSION,
    AtomicShardWriter,
    Manifest,
    ManifestError,
    decode_sample,
    iter_samples,
    list_shards,
    list_sizes,
    manifest_sample_count,
    open_url,
    read_manifest,
    shard_name,
    write_manifest,
)


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _sample(i: int) -> dict:
    return {
        "__key__": f"{i:09d}",
        "jpg": _jpeg((200, 10 * i, 0)),
        "txt": f"caption {i}",
        "json": {"url": f"demo://{i}", "key": f"{i:09d}", "width": 16, "height": 12},
        "syn.json": {"syn_text": [f"syn {i} a", f"syn {i} b"]},
        "npz": {"image_emb": np.full((4,), i, np.float32), "text_emb": np.zeros((3, 4), np.float32)},
    }


def test_shard_name() -> None:
    assert shard_name("web", 7) == "web-000007.tar"


def test_atomic_writer_leaves_no_final_file_on_exception(tmp_path) -> None:
    path = tmp_path / "out-000000.tar"
    with pytest.raises(RuntimeError, match="boom"), AtomicShardWriter(path) as w:
        w.write(_sample(0))
        raise RuntimeError("boom")
    assert not path.exists()
    assert not (tmp_path / "out-000000.tar.tmp").exists()


def test_atomic_writer_writes_tmp_then_renames(tmp_path) -> None:
    path = tmp_path / "out-000000.tar"
    with AtomicShardWriter(path) as w:
        w.write(_sample(0))
        assert not path.exists() and (tmp_path / "out-000000.tar.tmp").exists()
    assert path.exists() and not (tmp_path / "out-000000.tar.tmp").exists()
    assert w.count == 1


def test_writer_refuses_pickles(tmp_path) -> None:
    with pytest.raises(ValueError, match="pickle"), AtomicShardWriter(tmp_path / "x.tar") as w:
        w.write({"__key__": "a", "pkl": b"x"})
    assert not (tmp_path / "x.tar").exists()


def test_round_trip_with_webdataset(tmp_path) -> None:
    path = tmp_path / "rt-000000.tar"
    with AtomicShardWriter(path) as w:
        for i in range(3):
            w.write(_sample(i))
    raw = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [r["__key__"] for r in raw] == [f"{i:09d}" for i in range(3)]
    for i, r in enumerate(raw):
        assert r["txt"].decode() == f"caption {i}"
        assert json.loads(r["syn.json"])["syn_text"] == [f"syn {i} a", f"syn {i} b"]
        s = decode_sample(r)
        assert s["jpg"].size == (16, 12) and s["jpg"].mode == "RGB"
        assert s["json"]["url"] == f"demo://{i}"
        np.testing.assert_array_equal(s["npz"]["image_emb"], np.full((4,), i, np.float32))
        assert s["npz"]["text_emb"].shape == (3, 4)
    # our own sequential reader agrees with webdataset
    ours = list(iter_samples(str(path)))
    assert [s["txt"] for s in ours] == [f"caption {i}" for i in range(3)]
    assert ours[1]["syn.json"]["syn_text"][1] == "syn 1 b"


def test_same_samples_same_bytes(tmp_path) -> None:
    for name in ("a.tar", "b.tar"):
        with AtomicShardWriter(tmp_path / name) as w:
            w.write(_sample(1))
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_decode_never_unpickles(tmp_path) -> None:
    # A hand-made tar with a pickle member: the decoder must drop it, and npz must refuse object arrays.
    path = tmp_path / "evil.tar"
    obj_npz = io.BytesIO()
    np.savez(obj_npz, x=np.array([{"a": 1}], dtype=object))
    with tarfile.open(path, "w") as tar:
        for name, data in (("k.pyd", b"\x80\x04K\x01."), ("k.txt", b"hello"), ("k.npz", obj_npz.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = next(iter(wds.WebDataset(str(path), shardshuffle=False)))
    with pytest.raises(ValueError, match="allow_pickle"):
        decode_sample(raw)["npz"]["x"]
    raw.pop("npz")
    s = decode_sample(raw)
    assert "pyd" not in s and s["txt"] == "hello"


def test_manifest_round_trip_and_counts(tmp_path) -> None:
    m = Manifest(
        kind="demo-web",
        shards=[{"name": "web-000000.tar", "samples": 5}, {"name": "web-000001.tar", "samples": 3}],
        samples_in=10,
        samples_out=8,
        samples_skipped=2,
        skipped={"decode_error": 2},
        producer={"siclip": "0.1.0"},
        config={"seed": 0},
    )
    path = write_manifest(tmp_path, m)
    assert os.path.basename(path) == "manifest.json"
    assert not list(tmp_path.glob("*.tmp"))
    back = read_manifest(tmp_path)
    assert back == m and back.schema_version == SCHEMA_VERSION
    assert Manifest.from_dict(m.to_dict()) == m
    assert read_manifest(path) == m
    assert manifest_sample_count(str(tmp_path)) == 8
    assert manifest_sample_count([str(tmp_path / "web-000001.tar")]) == 3
    assert manifest_sample_count([str(tmp_path / "web-000000.tar"), str(tmp_path / "web-000001.tar")]) == 8
    assert manifest_sample_count([str(tmp_path / "other-000000.tar")]) is None
    assert manifest_sample_count(str(tmp_path / "nowhere")) is None
    assert list_shards(tmp_path) == [str(tmp_path / "web-000000.tar"), str(tmp_path / "web-000001.tar")]


def test_manifest_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(ManifestError, match=r"missing.*manifest\.json|manifest\.json.*cannot read"):
        read_manifest(tmp_path / "missing")
    bad = tmp_path / "manifest.json"
    bad.write_text("{not json")
    with pytest.raises(ManifestError, match=str(bad).replace(".", r"\.") + ": not valid JSON"):
        read_manifest(tmp_path)
    bad.write_text(json.dumps({"schema_version": 1, "shards": [{"name": 3}]}))
    with pytest.raises(ManifestError, match=r"shards\[0\]"):
        read_manifest(tmp_path)
    bad.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ManifestError, match="schema_version 99"):
        read_manifest(tmp_path)
    bad.write_text(json.dumps({"schema_version": 1, "colour": "red"}))
    with pytest.raises(ManifestError, match="unknown key 'colour'"):
        read_manifest(tmp_path)


def test_fsspec_uri_write_read_and_manifest() -> None:
    # fsspec's in-memory filesystem stands in for s3:// and friends: same code path, no network.
    base = "memory://siclip-test-shards"
    url = f"{base}/{shard_name('remote', 0)}"
    with AtomicShardWriter(url) as w:
        w.write(_sample(5))
    write_manifest(
        base, Manifest(kind="remote", shards=[{"name": "remote-000000.tar", "samples": 1}], samples_out=1)
    )
    assert read_manifest(base).kind == "remote"
    assert manifest_sample_count([url]) == 1
    (s,) = list(iter_samples(url))
    assert s["txt"] == "caption 5" and s["jpg"].size == (16, 12)
    assert list_shards(base) == [url]


def test_writer_reports_the_size_and_sha256_of_the_file(tmp_path) -> None:
    import hashlib

    for target in (str(tmp_path / "a.tar"), "memory://sizes/a.tar"):
        with AtomicShardWriter(target) as w:
            w.write({"__key__": "k", "txt": "hello" * 300})
        with open_url(target) as f:
            data = f.read()
        assert w.size == len(data) and w.sha256 == hashlib.sha256(data).hexdigest()


def test_local_shard_and_manifest_reach_the_disk_before_their_rename(tmp_path, monkeypatch) -> None:
    """fsync of the finished temp file comes before the rename that makes it 'finished'."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(f"fsync {os.path.basename(os.readlink(f'/proc/self/fd/{fd}'))}")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append(f"rename {os.path.basename(src)}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with AtomicShardWriter(tmp_path / "s.tar") as w:
        w.write({"__key__": "k", "txt": "x"})
    write_manifest(tmp_path, Manifest(kind="t"))
    for name in ("s.tar.tmp", "manifest.json.tmp"):
        assert events.index(f"fsync {name}") < events.index(f"rename {name}")


def test_list_sizes_lists_a_folder_once(tmp_path) -> None:
    (tmp_path / "a.tar").write_bytes(b"x" * 7)
    (tmp_path / "sub").mkdir()
    assert list_sizes(tmp_path) == {"a.tar": 7}
    assert list_sizes(tmp_path / "absent") == {}
    with AtomicShardWriter("memory://ls/out/b.tar") as w:
        w.write({"__key__": "k", "txt": "x"})
    assert list_sizes("memory://ls/out") == {"b.tar": w.size}
    assert list_sizes("memory://ls/nothing") == {}
