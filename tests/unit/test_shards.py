"""Shard format: atomic writes (locally and to URIs, a failing close included), every member encoder and
decoder and what they refuse, round trips through webdataset, reproducible bytes, manifests (in any folder)
and their errors, sample counts from manifests, the line between damaged tars (bad data) and tars that
cannot be read to their end (failed I/O), img2dataset's stats, ``open_url``'s schemes."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import tarfile
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from siclip.data import shards
from siclip.data.shards import (
    SCHEMA_VERSION,
    AtomicShardWriter,
    DamagedTarError,
    Manifest,
    ManifestError,
    ShardIOError,
    decode_sample,
    encode_sample,
    finished,
    image_of,
    img2dataset_count,
    iter_raw_samples,
    iter_samples,
    iter_tar_members,
    list_shards,
    list_sizes,
    manifest_sample_count,
    open_url,
    read_manifest,
    register_fsspec_schemes,
    shard_name,
    write_manifest,
)

MANIFEST = Manifest(
    kind="demo-web",
    shards=[{"name": "w-000000.tar", "samples": 5}, {"name": "w-000001.tar", "samples": 3}],
    samples_in=9,
    samples_out=8,
    samples_skipped=1,
    skipped={"too_small": 1},
    producer={"siclip": "0.1.0"},
    config={"z": 1, "a": [1, 2]},
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


def _tar(path: Path, members: list[tuple[str, bytes | None]]) -> str:
    """A hand-made tar: ``(name, data)`` per member, ``data=None`` for a directory."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


# ----------------------------------------------------------------------------------------- manifest
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


def test_manifest_errors_name_the_file_and_the_problem(tmp_path) -> None:
    with pytest.raises(ManifestError, match=re.escape("nowhere/manifest.json")):
        read_manifest(tmp_path / "nowhere")
    bad = tmp_path / "manifest.json"
    for content, problem in [
        ("{not json", "not valid JSON"),
        (json.dumps({"schema_version": 1, "shards": [{"name": 3}]}), "shards[0]"),
        (json.dumps({"schema_version": 99}), "schema_version 99"),
        (json.dumps({"schema_version": 1, "colour": "red"}), "unknown key 'colour'"),
        (json.dumps({"schema_version": 1, "kind": 3}), "'kind'"),
        (json.dumps([1]), "JSON object"),
    ]:
        bad.write_text(content)
        with pytest.raises(ManifestError) as info:
            read_manifest(tmp_path)
        assert str(bad) in str(info.value) and problem in str(info.value), content


def test_a_manifest_with_only_its_version_is_an_empty_folder() -> None:
    empty = Manifest.from_dict({"schema_version": 1})
    assert empty.shards == [] and empty.samples_out == 0
    with pytest.raises(ManifestError, match="unknown key 'x'") as info:
        Manifest.from_dict({"schema_version": 1, "x": 0})
    assert "shards" in str(info.value)  # the valid keys are listed


def test_manifest_in_a_folder_given_with_a_trailing_slash(tmp_path) -> None:
    folder = tmp_path / "runX"
    folder.mkdir()
    path = write_manifest(str(folder) + "/", MANIFEST)
    assert path == f"{folder}/manifest.json"
    assert json.loads(Path(path).read_text()) == MANIFEST.to_dict()
    assert os.listdir(folder) == ["manifest.json"]  # no temporary file left
    assert list_shards(str(folder) + "/") == [f"{folder}/w-000000.tar", f"{folder}/w-000001.tar"]


def test_manifest_into_new_nested_and_relative_folders(tmp_path, monkeypatch) -> None:
    nested = tmp_path / "new" / "sub"
    assert write_manifest(nested, MANIFEST) == f"{nested}/manifest.json"
    assert read_manifest(nested) == MANIFEST
    monkeypatch.chdir(tmp_path / "new")
    assert write_manifest("m.json", MANIFEST) == "m.json"  # a bare .json file in the current folder
    assert sorted(os.listdir(".")) == ["m.json", "sub"]
    assert read_manifest("m.json") == MANIFEST


def test_manifest_sample_count_from_shard_paths_and_folders(tmp_path, monkeypatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_manifest(a, Manifest(shards=[{"name": "x.tar", "samples": 5}, {"name": "y.tar.gz", "samples": 7}]))
    write_manifest(b, Manifest(shards=[{"name": "z.tgz", "samples": 11}]))
    assert manifest_sample_count(str(a / "x.tar")) == 5  # one path, not a folder
    assert manifest_sample_count(str(a / "y.tar.gz")) == 7
    assert manifest_sample_count(b / "z.tgz") == 11
    assert manifest_sample_count([str(a / "x.tar"), str(b / "z.tgz"), str(a / "y.tar.gz")]) == 23
    assert manifest_sample_count([str(a / "x.tar"), str(tmp_path / "c" / "q.tar")]) is None
    monkeypatch.chdir(a)
    assert manifest_sample_count(["x.tar", "y.tar.gz"]) == 12  # bare names: the current folder


# ------------------------------------------------------------------------------------------ writing
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


def test_images_are_encoded_from_pil_or_arrays_keeping_their_colours() -> None:
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 10, 30] + [0] * 762)
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 1] = 123
    out = encode_sample({"__key__": 7, "png": palette, "webp": rgb, "jpeg": Image.fromarray(rgb)})
    assert out["__key__"] == "7"
    back = decode_sample(out)
    assert back["png"].getpixel((0, 0)) == (200, 10, 30)
    assert back["webp"].getpixel((1, 1)) == (0, 123, 0)
    assert back["jpeg"].size == (4, 4)
    # each extension gets its own format
    formats = {ext: Image.open(io.BytesIO(out[ext])).format for ext in ("png", "webp", "jpeg")}
    assert formats == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}
    assert Image.open(io.BytesIO(encode_sample({"__key__": "k", "jpg": rgb})["jpg"])).format == "JPEG"


def test_text_json_npz_and_class_encoders() -> None:
    out = encode_sample(
        {
            "__key__": "k",
            "__url__": "ignored",
            "txt": "héllo",
            "teacher.syn.json": {"b": 1, "a": [2]},
            "cls": 3,
            "id": "x7",
            "index": 12,
            "raw.bin": bytearray(b"\x00\x01"),
        }
    )
    assert out == {
        "__key__": "k",
        "txt": "héllo".encode(),
        "teacher.syn.json": b'{"a": [2], "b": 1}',
        "cls": b"3",
        "id": b"x7",
        "index": b"12",
        "raw.bin": b"\x00\x01",
    }
    npz = encode_sample({"__key__": "k", "npz": {"e": [1.5, 2.5]}})["npz"]
    with np.load(io.BytesIO(npz)) as z:
        np.testing.assert_array_equal(z["e"], [1.5, 2.5])


@pytest.mark.parametrize(
    ("sample", "names"),
    [
        ({"txt": "no key"}, "__key__"),
        ({"__key__": "k", "npz": [1, 2]}, "'npz'"),
        ({"__key__": "k", "npz": {"o": [{"a": 1}]}}, "pickle"),
        ({"__key__": "k", "foo": 3}, "'foo'"),
        ({"__key__": "k", "x.PKL": b"x"}, "'x.PKL'"),
    ],
)
def test_encoder_errors_name_the_member(sample: dict[str, Any], names: str) -> None:
    with pytest.raises(ValueError) as info:
        encode_sample(sample)
    assert names in str(info.value)


def test_tar_headers_are_plain_and_reproducible(tmp_path) -> None:
    path = tmp_path / "h.tar"
    with AtomicShardWriter(path) as w:
        for i in range(3):
            w.write({"__key__": f"{i}", "txt": "t"})
    assert w.count == 3
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["0.txt", "1.txt", "2.txt"]
    assert {(m.mtime, m.mode, m.pax_headers == {}) for m in members} == {(0, 0o644, True)}


def test_writer_life_cycle(tmp_path, monkeypatch) -> None:
    path = tmp_path / "c.tar"
    w = AtomicShardWriter(path)
    w.write({"__key__": "a", "txt": "t"})
    w.close()
    w.close()  # a second close is a no-op
    w.abort()  # and so is an abort after it: the shard stays
    assert path.exists() and not (tmp_path / "c.tar.tmp").exists()
    with pytest.raises(RuntimeError, match="closed"):
        w.write({"__key__": "b", "txt": "t"})
    w2 = AtomicShardWriter(tmp_path / "d.tar")
    w2.abort()
    w2.abort()
    w2.close()  # after an abort nothing is written, twice or not
    assert sorted(os.listdir(tmp_path)) == ["c.tar"]
    monkeypatch.chdir(tmp_path)
    with AtomicShardWriter("rel.tar") as w3:  # a bare file name: the current folder
        w3.write({"__key__": "a", "txt": "t"})
    assert sorted(os.listdir(tmp_path)) == ["c.tar", "rel.tar"]


def test_writer_makes_missing_folders(tmp_path) -> None:
    path = tmp_path / "x" / "y" / "s.tar"
    with AtomicShardWriter(path) as w:
        w.write({"__key__": "a", "txt": "t"})
    assert [s["txt"] for s in iter_samples(str(path))] == ["t"]


def test_a_failing_close_leaves_nothing_and_keeps_the_callers_error(tmp_path, monkeypatch) -> None:
    import webdataset as wds

    close = wds.TarWriter.close

    def broken_close(self: Any) -> None:  # the tar is finished, but flushing it fails
        close(self)
        raise OSError("disk full")

    monkeypatch.setattr(wds.TarWriter, "close", broken_close)
    with pytest.raises(OSError, match="disk full"), AtomicShardWriter(tmp_path / "a.tar") as w:
        w.write({"__key__": "a", "txt": "t"})
    assert os.listdir(tmp_path) == []
    # an error inside the block is what the caller sees, even though closing the tar fails too
    with pytest.raises(KeyError, match="mine"), AtomicShardWriter(tmp_path / "b.tar") as w:
        w.write({"__key__": "a", "txt": "t"})
        raise KeyError("mine")
    assert os.listdir(tmp_path) == []


def test_file_uri_writer_shows_the_shard_only_once_closed(tmp_path) -> None:
    url = f"file://{tmp_path}/f.tar"
    with AtomicShardWriter(url) as w:
        w.write({"__key__": "a", "txt": "t"})
        assert not (tmp_path / "f.tar").exists() and not finished(url)  # not there until closed
    assert os.listdir(tmp_path) == ["f.tar"]
    assert finished(url) and finished(tmp_path / "f.tar")
    assert [s["txt"] for s in iter_samples(url)] == ["t"]


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


def test_memory_uri_writer_abort_and_finished() -> None:
    fs = fsspec.filesystem("memory")
    root = f"/siclip-contracts-{uuid.uuid4().hex}"  # the memory file system lives as long as the process
    base = f"memory://{root}"
    with pytest.raises(RuntimeError, match="boom"), AtomicShardWriter(f"{base}/a.tar") as w:
        w.write({"__key__": "a", "txt": "t"})
        raise RuntimeError("boom")
    assert not fs.exists(f"{root}/a.tar") and not fs.exists(f"{root}/a.tar.tmp")
    assert not finished(f"{base}/a.tar")
    with AtomicShardWriter(f"{base}/b.tar") as w:
        w.write({"__key__": "a", "txt": "t"})
    assert finished(f"{base}/b.tar") and fs.ls(root, detail=False) == [f"{root}/b.tar"]


def test_finished_only_for_a_file(tmp_path) -> None:
    assert not finished(tmp_path)  # a folder is not a shard
    assert not finished(tmp_path / "none.tar")


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


# ------------------------------------------------------------------------------------------ reading
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


def test_decode_every_member_kind() -> None:
    grey, rgba = io.BytesIO(), io.BytesIO()
    Image.new("L", (2, 2), 77).save(grey, format="PNG")
    Image.new("RGBA", (2, 2), (1, 2, 3, 4)).save(rgba, format="PNG")
    raw = {
        "__key__": "k",
        "__url__": "u.tar",
        "png": grey.getvalue(),
        "webp": rgba.getvalue(),  # the decoder goes by content, not by extension
        "text": b"plain",
        "a.b.json": b'{"x": 1}',
        "cls": bytearray(b"3"),
        "already": "decoded",
        "x.pyd": b"\x80\x04K\x01.",
        "after": b"kept",
    }
    s = decode_sample(raw)
    assert s["__key__"] == "k" and s["__url__"] == "u.tar"
    assert s["png"].mode == "RGB" and s["png"].getpixel((0, 0)) == (77, 77, 77)
    assert s["webp"].mode == "RGB" and s["webp"].getpixel((1, 1)) == (1, 2, 3)
    assert s["text"] == "plain" and s["a.b.json"] == {"x": 1}
    assert s["cls"] == b"3" and type(s["cls"]) is bytes
    assert s["already"] == "decoded" and s["after"] == b"kept" and "x.pyd" not in s
    kept = decode_sample(raw, images=False)
    assert kept["png"] == grey.getvalue() and type(kept["png"]) is bytes


def test_image_of_prefers_the_first_extension_and_names_a_missing_one() -> None:
    assert image_of({"png": 2, "jpg": 1}) == 1
    assert image_of({"webp": 4}) == 4
    with pytest.raises(KeyError, match="k7"):
        image_of({"__key__": "k7", "txt": "t"})


def test_members_with_folders_dots_and_no_extension(tmp_path) -> None:
    url = _tar(
        tmp_path / "m.tar",
        [
            ("d.1", None),  # a folder entry: skipped
            ("README", b"no extension: skipped"),
            ("d.1/k.txt", b"a"),
            ("d.1/k.syn.json", b"{}"),
            ("x/a.d/k.txt", b"b"),
            ("top.txt", b"c"),
        ],
    )
    assert list(iter_tar_members(url)) == [
        ("d.1/k", "txt", b"a"),
        ("d.1/k", "syn.json", b"{}"),
        ("x/a.d/k", "txt", b"b"),
        ("top", "txt", b"c"),
    ]
    raws = list(iter_raw_samples(url))
    assert raws == [
        {"__key__": "d.1/k", "__url__": url, "txt": b"a", "syn.json": b"{}"},
        {"__key__": "x/a.d/k", "__url__": url, "txt": b"b"},
        {"__key__": "top", "__url__": url, "txt": b"c"},
    ]


def test_iter_samples_over_several_shards(tmp_path) -> None:
    urls = []
    for s in range(2):
        with AtomicShardWriter(tmp_path / f"s{s}.tar") as w:
            w.write({"__key__": f"{s}", "txt": f"t{s}", "png": np.zeros((2, 2, 3), np.uint8)})
        urls.append(str(tmp_path / f"s{s}.tar"))
    decoded = list(iter_samples(urls))
    assert [s["txt"] for s in decoded] == ["t0", "t1"]
    assert all(isinstance(s["png"], Image.Image) for s in decoded)
    assert all(isinstance(s["png"], bytes) for s in iter_samples(urls, images=False))


def _two_samples(path: Path) -> bytes:
    with AtomicShardWriter(path) as w:
        for i in range(2):
            w.write({"__key__": f"{i:06d}", "txt": "x" * 3000})
    return path.read_bytes()


def test_a_truncated_member_is_an_io_error_and_a_bad_header_bad_data(tmp_path) -> None:
    path = tmp_path / "t.tar"
    data = _two_samples(path)
    with tarfile.open(path) as tar:
        second = tar.getmembers()[1]
    path.write_bytes(data[: second.offset_data + 100])  # a file at rest that stops inside a member
    with pytest.raises(ShardIOError, match=re.escape(str(path))):
        list(iter_tar_members(str(path)))
    gz = tmp_path / "t.tar.gz"
    whole = gzip.compress(data)
    gz.write_bytes(whole[: len(whole) - 30])
    with pytest.raises(ShardIOError, match=re.escape(str(gz))):
        list(iter_tar_members(str(gz)))
    # Bytes that are there but are no header: damaged content, the members before it read whole.
    damaged = bytearray(data)
    damaged[second.offset : second.offset + 512] = b"\x07" * 512
    path.write_bytes(bytes(damaged))
    got = []
    with pytest.raises(DamagedTarError, match=f"byte {second.offset}"):
        got.extend(k for k, _, _ in iter_tar_members(str(path)))
    assert got == ["000000"]


class _CutStream(io.RawIOBase):
    """A stream that stops after ``limit`` bytes of ``data`` while claiming its full size (a dropped download)."""

    def __init__(self, data: bytes, limit: int, *, size: bool = True, name: str | None = None) -> None:
        self._buf = io.BytesIO(data[:limit])
        if size:
            self.size = len(data)
        if name is not None:
            self.name = name
            self._file = open(name, "rb")  # noqa: SIM115 -- closed in close()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(n)

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        if hasattr(self, "_file"):
            self._file.close()
        super().close()


@pytest.mark.parametrize("how", ["object size", "size of the named file"])
def test_a_stream_cut_short_is_an_io_error(tmp_path, monkeypatch, how: str) -> None:
    path = tmp_path / "c.tar"
    data = _two_samples(path)
    cut = 2 * 512 + 3072 + 100  # inside the second sample's member
    if how == "object size":
        stream = _CutStream(data, cut)
    else:  # a mounted bucket: the local file's size says how much should have come
        stream = _CutStream(data, cut, size=False, name=str(path))
    monkeypatch.setattr(shards, "open_url", lambda url, mode="rb": stream)
    with pytest.raises(ShardIOError) as info:
        list(iter_tar_members("s3://b/c.tar"))
    assert "s3://b/c.tar" in str(info.value) and f"{cut} of {len(data)} bytes" in str(info.value)


def test_a_stream_without_a_known_size_cut_short_is_an_io_error(tmp_path, monkeypatch) -> None:
    path = tmp_path / "c.tar"
    data = _two_samples(path)
    monkeypatch.setattr(
        shards, "open_url", lambda url, mode="rb": _CutStream(data, 2 * 512 + 3072 + 100, size=False)
    )
    with pytest.raises(ShardIOError, match=re.escape("pipe:cat c.tar")):
        list(iter_tar_members("pipe:cat c.tar"))
    # and a whole one reads fine
    monkeypatch.setattr(shards, "open_url", lambda url, mode="rb": _CutStream(data, len(data), size=False))
    assert [k for k, _, _ in iter_tar_members("pipe:cat c.tar")] == ["000000", "000001"]


def test_a_missing_file_is_an_io_error_naming_the_cause(tmp_path) -> None:
    with pytest.raises(ShardIOError) as info:
        list(iter_tar_members(str(tmp_path / "no.tar")))
    assert f"{tmp_path}/no.tar" in str(info.value) and "FileNotFoundError" in str(info.value)


def test_img2dataset_stats(tmp_path) -> None:
    stats = tmp_path / "00000_stats.json"
    url = str(tmp_path / "00000.tar")
    assert img2dataset_count(url) is None  # no stats file
    for content, want in [
        ({"count": 10, "successes": 7}, 7),
        ({"successes": 0}, 0),
        ({"successes": -1}, None),
        ({"successes": "7"}, None),
        ({"count": 10}, None),
        ([7], None),
    ]:
        stats.write_text(json.dumps(content))
        assert img2dataset_count(url) == want, content
    stats.write_bytes(b"\xff\xfe")
    assert img2dataset_count(url) is None  # not UTF-8: unknown
    stats.write_text("{")
    assert img2dataset_count(url) is None  # not JSON: unknown
    (tmp_path / "odd.tgz_stats.json").write_text(json.dumps({"successes": 3}))
    assert img2dataset_count(str(tmp_path / "odd.tgz")) == 3  # only a .tar suffix is replaced
    assert img2dataset_count("pipe:false") is None  # never run a command to find stats
    (tmp_path / "dir_stats.json").mkdir()
    with pytest.raises(
        ShardIOError, match=re.escape("dir_stats.json")
    ):  # there but unreadable: not "no stats"
        img2dataset_count(str(tmp_path / "dir.tar"))


def test_open_url_schemes(tmp_path, monkeypatch) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    with open_url(str(path)) as f:  # binary reading by default
        assert f.read() == b"abc"
    with open_url(f"file://{path}") as f:
        assert f.read() == b"abc"
    monkeypatch.setattr("webdataset.utils.enforce_security", False)  # the test session forbids pipes
    with open_url(f"pipe:cat {path}") as f:
        assert f.read() == b"abc"
    with fsspec.open("memory://siclip-contracts/f.bin", "wb") as f:
        f.write(b"xyz")
    with open_url("memory://siclip-contracts/f.bin") as f:
        assert f.read() == b"xyz"


def test_register_fsspec_schemes_lets_webdataset_read_them(tmp_path, monkeypatch) -> None:
    import importlib

    import webdataset as wds

    wds_gopen = importlib.import_module("webdataset.gopen")
    table = {**wds_gopen.gopen_schemes, "gs": "gsutil handler"}
    table.pop("memory", None)
    table.pop("az", None)
    monkeypatch.setattr(wds_gopen, "gopen_schemes", table)
    register_fsspec_schemes(("gs", "memory", "az"))
    assert table["gs"] == "gsutil handler"  # webdataset's own gs handler is kept
    assert table["memory"] is table["az"] is not None  # fsspec's opener for the others
    del table["gs"]
    register_fsspec_schemes(("gs",))
    assert table["gs"] is table["memory"]  # no handler yet: fsspec's is used
    register_fsspec_schemes()  # the defaults
    assert {"s3", "gcs", "gs", "az", "abfs", "abfss", "hdfs"} <= set(table)
    url = "memory://siclip-contracts/wds.tar"
    with AtomicShardWriter(url) as w:
        w.write({"__key__": "a", "txt": "via webdataset"})
    (sample,) = list(wds.WebDataset(url, shardshuffle=False))
    assert sample["txt"] == b"via webdataset"
