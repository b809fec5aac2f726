"""CC12M -> CC12M-SYN against a real S3 API (moto's server): inputs read from and shards written to ``s3://``
through the code users run (s3fs), with a missing object and the server stopped mid-build, then restarted."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from siclip.config import from_dict
from siclip.data.shards import iter_samples, read_manifest
from tests.s3_server import S3Server, s3_server  # noqa: F401  (the fixture)

pytestmark = pytest.mark.ray

OUT = "s3://cc12m-syn/v1"
NAMES = [f"in-00000{i}.tar" for i in range(4)]
MISSING = "in-000002.tar"


def _jpeg(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar(shard: int) -> bytes:
    """Three good samples; shard 1 also holds a 1x1 placeholder image, which must be skipped as too_small."""
    members = []
    for i in range(3):
        members += [
            (f"s{shard}k{i}.jpg", _jpeg(10 * shard + i)),
            (f"s{shard}k{i}.txt", f"photo {i}".encode()),
        ]
    if shard == 1:
        members += [("s1tiny.jpg", _jpeg(99, (1, 1))), ("s1tiny.txt", b"placeholder")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _cfg(server: S3Server) -> object:
    caption = {
        "input_shards": ["s3://cc12m/in-{000000..000003}.tar"],
        "output_dir": OUT,
        "model": "siclip-tiny-coca",
        "source": "",
        "num_captions": 2,
        "max_length": 6,
        "batch_size": 4,
        "num_cpus_per_actor": 0.5,
        "image_size": 16,
        "min_image_size": 8,
        "max_retries": 1,
        "retry_delay_s": 0.0,
    }
    return from_dict({"caption": caption, "ray": {"data_timeout_s": 120, "env_vars": server.env}})


def test_s3_build_survives_a_missing_object_and_a_stopped_server(
    ray_session: None,
    s3_server: S3Server,  # noqa: F811
) -> None:
    from siclip.data.pipeline import ShardBuildError, run_pipeline

    fs = s3_server.filesystem()
    fs.mkdir("cc12m")
    fs.mkdir("cc12m-syn")
    for i, name in enumerate(NAMES):
        if name != MISSING:
            fs.pipe(f"cc12m/{name}", _tar(i))

    def stop_after_first(entry: dict[str, object]) -> None:
        s3_server.stop()  # the first shard is recorded; everything after it meets a dead server

    with pytest.raises(ShardBuildError) as failed:
        run_pipeline(_cfg(s3_server), progress=False, on_shard=stop_after_first)  # type: ignore[arg-type]
    assert MISSING in str(failed.value)  # never readable: named, not counted as bad data
    assert not s3_server.running

    s3_server.start()
    fs = s3_server.filesystem()
    partial = read_manifest(OUT)
    assert len(partial.shards) == 1  # nothing after the stop was recorded ...
    first = partial.shards[0]
    assert first["name"] != MISSING
    samples = list(iter_samples([f"{OUT}/{first['name']}"], images=False))
    assert len(samples) == first["samples"] == 3  # ... and what was recorded is complete
    assert partial.samples_in == partial.samples_out + partial.samples_skipped
    assert not fs.glob("cc12m-syn/v1/*.tmp")

    fs.pipe(f"cc12m/{MISSING}", _tar(2))
    manifest = run_pipeline(_cfg(s3_server), progress=False)  # type: ignore[arg-type]
    assert [s["name"] for s in manifest.shards] == NAMES
    assert [s["samples"] for s in manifest.shards] == [3, 3, 3, 3]
    assert manifest.skipped == {"too_small": 1}
    assert manifest.samples_in == 13 == manifest.samples_out + manifest.samples_skipped
    assert read_manifest(OUT).to_dict() == manifest.to_dict()
    keys = [s["__key__"] for s in iter_samples([f"{OUT}/{n}" for n in NAMES], images=False)]
    assert keys == [f"s{s}k{i}" for s in range(4) for i in range(3)]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("cc12m-syn/v1")) == sorted([*NAMES, "manifest.json"])
