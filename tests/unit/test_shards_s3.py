"""Shard I/O against a real S3 API (moto's server): direct uploads that never leave a partial object, and
failed reads raised as I/O errors rather than counted as bad data. No Ray."""

from __future__ import annotations

import pytest

from siclip.data.shards import AtomicShardWriter, ShardIOError, finished, iter_raw_samples, iter_tar_members
from tests.s3_server import S3Server, s3_server  # noqa: F401  (the fixture)


def _sample(i: int) -> dict[str, object]:
    return {"__key__": f"k{i}", "txt": f"caption {i}", "json": {"i": i}}


def test_direct_upload_commits_only_on_clean_close(s3_server: S3Server) -> None:  # noqa: F811
    fs = s3_server.filesystem()
    fs.mkdir("shards")
    with AtomicShardWriter("s3://shards/a.tar") as w:
        for i in range(3):
            w.write(_sample(i))
    assert [s["__key__"] for s in iter_raw_samples("s3://shards/a.tar")] == ["k0", "k1", "k2"]
    assert fs.ls("shards") == ["shards/a.tar"]  # straight to the final key: no temporary object, no copy

    with pytest.raises(RuntimeError, match="boom"), AtomicShardWriter("s3://shards/b.tar") as w:
        w.write(_sample(0))
        raise RuntimeError("boom")
    assert not finished("s3://shards/b.tar")
    assert fs.ls("shards", refresh=True) == ["shards/a.tar"]


def test_upload_to_a_stopped_server_leaves_nothing(s3_server: S3Server) -> None:  # noqa: F811
    s3_server.filesystem().mkdir("shards")
    writer = AtomicShardWriter("s3://shards/c.tar")
    writer.write(_sample(0))
    s3_server.stop()
    with pytest.raises(Exception):  # noqa: B017  (botocore's connection error)
        writer.close()
    s3_server.start()
    assert not finished("s3://shards/c.tar")


def test_missing_object_and_dead_server_are_io_errors(s3_server: S3Server) -> None:  # noqa: F811
    s3_server.filesystem().mkdir("shards")
    with pytest.raises(ShardIOError, match=r"nope\.tar"):
        list(iter_tar_members("s3://shards/nope.tar"))
    s3_server.stop()
    with pytest.raises(ShardIOError, match="cannot read"):
        list(iter_tar_members("s3://shards/a.tar"))


def test_direct_upload_moves_nothing(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import s3fs

    s3_server.filesystem().mkdir("shards")
    moves: list[tuple[object, ...]] = []
    monkeypatch.setattr(s3fs.S3FileSystem, "mv", lambda self, *args, **kw: moves.append(args))
    with AtomicShardWriter("s3://shards/e.tar") as w:
        w.write(_sample(0))
    assert moves == []  # no temporary key to copy and delete (S3 has no rename)
    assert [s["__key__"] for s in iter_raw_samples("s3://shards/e.tar")] == ["k0"]


def test_aborted_upload_stays_aborted(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import gc
    import sys

    import webdataset as wds

    fs = s3_server.filesystem()
    fs.mkdir("shards")
    close = wds.TarWriter.close

    def broken_close(self: object) -> None:  # the tar is finished, but flushing it fails
        close(self)  # type: ignore[arg-type]
        raise OSError("disk full")

    monkeypatch.setattr(wds.TarWriter, "close", broken_close)
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    # the caller's error is what propagates, even though closing the tar fails too
    with pytest.raises(KeyError, match="mine"), AtomicShardWriter("s3://shards/d.tar") as w:
        w.write(_sample(0))
        raise KeyError("mine")
    del w
    gc.collect()  # a discarded upload has nothing to flush when it is collected
    assert unraisable == []
    assert fs.ls("shards", refresh=True) == []


def test_uri_globs_expand_on_s3(s3_server: S3Server) -> None:  # noqa: F811
    """``s3://bucket/cc12m/*.tar`` lists the bucket (it used to stay one literal shard that never opens)."""
    from siclip.config import expand_shards, from_dict
    from siclip.data.commit import resolve_inputs
    from siclip.data.shards import list_sizes

    fs = s3_server.filesystem()
    fs.mkdir("inputs")
    for name in ("00001.tar", "00000.tar", "00002.tar", "00000_stats.json", "other/00003.tar"):
        fs.pipe(f"inputs/cc12m/{name}", b"x" * 10)
    want = [f"s3://inputs/cc12m/0000{i}.tar" for i in range(3)]
    assert expand_shards(["s3://inputs/cc12m/*.tar"]) == want
    assert (
        expand_shards(["s3://inputs/cc12m/0000{1..2}.tar"]) == want[1:]
    )  # braces without a glob stay as given
    assert expand_shards(["s3://inputs/cc12m/0000[02].tar", "s3://inputs/cc12m/other/*.tar"]) == [
        want[0],
        want[2],
        "s3://inputs/cc12m/other/00003.tar",
    ]
    assert expand_shards(["s3://inputs/nothing/*.tar"]) == []
    cfg = from_dict({"caption": {"input_shards": ["s3://inputs/cc12m/*.tar"]}})
    assert resolve_inputs(cfg) == [(u, u.rsplit("/", 1)[1]) for u in want]
    assert list_sizes("s3://inputs/cc12m") == {
        "00000.tar": 10,
        "00001.tar": 10,
        "00002.tar": 10,
        "00000_stats.json": 10,
    }
