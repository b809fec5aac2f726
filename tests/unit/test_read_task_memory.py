"""The read task's memory reservation follows the shards it reads, not a fixed 256 MB.

A read task holds one whole shard and its re-encoded images (CC12M's 10,000-image shards are ~250 MB), so the
reservation Ray schedules by must grow with the largest input shard; sizes come from one listing per folder.
"""

from __future__ import annotations

from pathlib import Path

from siclip.data.prepare import read_task_memory
from tests.s3_server import S3Server, s3_server  # noqa: F401  (the fixture)

MB = 2**20


def test_the_reservation_grows_with_the_largest_shard(tmp_path: Path) -> None:
    small, big = tmp_path / "00000.tar", tmp_path / "00001.tar"
    small.write_bytes(b"\0" * MB)
    big.write_bytes(b"\0" * (40 * MB))
    base = read_task_memory([])
    assert base >= 128 * MB  # a worker's own memory, whatever the shards
    one = read_task_memory([str(small)])
    both = read_task_memory([str(small), str(big)])
    assert one >= base + 2 * MB  # at least twice the shard: its members and its re-encoded images
    assert both >= base + 2 * 40 * MB and both - base == 40 * (one - base)  # the largest decides, linearly
    assert read_task_memory([str(tmp_path / "absent.tar"), "pipe:cat x.tar"]) == base  # unknown: no more


def test_sizes_of_s3_shards_come_from_one_listing(s3_server: S3Server) -> None:  # noqa: F811
    fs = s3_server.filesystem()
    fs.mkdir("shards")
    fs.pipe("shards/cc12m/00000.tar", b"\0" * (3 * MB))
    fs.pipe("shards/cc12m/00001.tar", b"\0" * MB)
    base = read_task_memory([])
    got = read_task_memory(["s3://shards/cc12m/00000.tar", "s3://shards/cc12m/00001.tar"])
    assert got - base >= 2 * 3 * MB
    assert read_task_memory(["s3://no-such-bucket/cc12m/00000.tar"]) == base  # a failed listing: the default
