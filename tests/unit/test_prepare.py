"""CC12M-SYN read stage without Ray: unusable images are skipped and counted, I/O failures raise.

Every bad image is made here, in the test: one shard holds good samples around a single bad one, and
``prepare_shard`` must keep the good ones, count the bad one under its reason, and keep
``samples_in == samples_out + skipped``.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siclip.data import shards
from siclip.data.prepare import SKIP_REASONS, prepare_shard
from siclip.data.shards import ShardIOError, img2dataset_count

IMAGE_SIZE = 32


def _encode(size: tuple[int, int], fmt: str = "JPEG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (what a decompression bomb looks like to PIL)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _tar(path: Path, samples: list[tuple[str, bytes, str]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, image, ext in samples:
            for name, data in ((f"{key}.{ext}", image), (f"{key}.txt", f"photo {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _shard_with(tmp_path: Path, bad: bytes, ext: str = "jpg") -> str:
    good = [(f"g{i}", _encode((48, 40), seed=i), "jpg") for i in range(2)]
    return _tar(tmp_path / "in-000000.tar", [good[0], ("bad", bad, ext), good[1]])


def _check(prepared: shards.Any, reason: str) -> None:
    assert reason in SKIP_REASONS
    assert prepared.keys == ["g0", "g1"]
    assert prepared.skipped == {reason: 1}
    assert prepared.samples_in == len(prepared.keys) + sum(prepared.skipped.values()) == 3
    for jpg in prepared.jpgs:
        assert min(Image.open(io.BytesIO(jpg)).size) == IMAGE_SIZE


def test_too_small_image_is_skipped(tmp_path: Path) -> None:
    url = _shard_with(tmp_path, _encode((1, 1)))  # img2dataset's 1x1 placeholder
    _check(prepare_shard(url, image_size=IMAGE_SIZE, min_image_size=16), "too_small")
    # Without the limit it is blown up to IMAGE_SIZE and kept: the option is what drops it.
    assert len(prepare_shard(url, image_size=IMAGE_SIZE, min_image_size=0).keys) == 3


def test_bad_aspect_image_is_skipped(tmp_path: Path) -> None:
    url = _shard_with(tmp_path, _encode((200, 16)))  # 12.5 : 1
    _check(prepare_shard(url, image_size=IMAGE_SIZE, max_aspect_ratio=10.0), "bad_aspect")
    assert len(prepare_shard(url, image_size=IMAGE_SIZE, max_aspect_ratio=20.0).keys) == 3


def test_decompression_bomb_is_skipped(tmp_path: Path) -> None:
    # PIL raises above 2 x MAX_IMAGE_PIXELS (about 179 M pixels) when the header is read.
    url = _shard_with(tmp_path, _png_header_only(20_000, 20_000), ext="png")
    _check(prepare_shard(url, image_size=IMAGE_SIZE), "decompression_bomb")


def test_decompression_bomb_warning_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Between 1 and 2 x MAX_IMAGE_PIXELS PIL only warns; the pipeline refuses those too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    url = _shard_with(tmp_path, _encode((60, 60)))  # 3600 pixels: a warning, not an error
    assert 3000 < 60 * 60 < 2 * 3000
    _check(prepare_shard(url, image_size=IMAGE_SIZE), "decompression_bomb")


def test_encode_error_is_skipped(tmp_path: Path) -> None:
    # 600 x 2 scaled to a 256 px short side is 76,800 px long: past JPEG's 65,500 px limit, so saving fails.
    url = _shard_with(tmp_path, _encode((600, 2)))
    prepared = prepare_shard(url, image_size=256, min_image_size=0, max_aspect_ratio=1e9)
    assert prepared.keys == ["g0", "g1"]
    assert prepared.skipped == {"encode_error": 1}
    assert prepared.samples_in == 3


def test_defaults_skip_the_600x2_image_before_encoding(tmp_path: Path) -> None:
    from siclip.config import CaptionCfg

    c = CaptionCfg()
    url = _shard_with(tmp_path, _encode((600, 2)))
    prepared = prepare_shard(
        url, image_size=c.image_size, min_image_size=c.min_image_size, max_aspect_ratio=c.max_aspect_ratio
    )
    assert prepared.skipped == {"too_small": 1} and len(prepared.keys) == 2


def test_missing_shard_raises_instead_of_counting(tmp_path: Path) -> None:
    with pytest.raises(ShardIOError, match=r"in-000009\.tar"):
        prepare_shard(str(tmp_path / "in-000009.tar"), image_size=IMAGE_SIZE)


def test_failing_pipe_raises(tmp_path: Path) -> None:
    with pytest.raises(ShardIOError):
        prepare_shard("pipe:exit 3", image_size=IMAGE_SIZE)


def test_stream_cut_short_is_an_io_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transport that stops sending before the object's end is a failure, not a damaged tar."""
    url = _tar(tmp_path / "in-000000.tar", [(f"g{i}", _encode((48, 40), seed=i), "jpg") for i in range(4)])
    data = Path(url).read_bytes()

    class CutStream(io.BytesIO):
        size = len(data)  # what the store says the object holds

    monkeypatch.setattr(shards, "open_url", lambda u, mode="rb": CutStream(data[: len(data) // 2]))
    with pytest.raises(ShardIOError, match="ended after"):
        prepare_shard(url, image_size=IMAGE_SIZE)


def _damaged_tar(tmp_path: Path, n: int) -> str:
    url = _tar(tmp_path / "in-000000.tar", [(f"g{i}", _encode((48, 40), seed=i), "jpg") for i in range(n)])
    with tarfile.open(url) as tar:
        at = tar.getmember("g2.jpg").offset  # the 3rd sample's first header: bytes, but no header
    data = bytearray(Path(url).read_bytes())
    data[at : at + 512] = b"\x07" * 512
    Path(url).write_bytes(bytes(data))
    return url


def test_damaged_tar_counts_lost_samples_from_img2dataset_stats(tmp_path: Path) -> None:
    url = _damaged_tar(tmp_path, 6)
    # Without img2dataset's stats the loss cannot be known: it stands as one.
    prepared = prepare_shard(url, image_size=IMAGE_SIZE)
    assert prepared.keys == ["g0", "g1"] and prepared.skipped == {"unreadable_tar": 1}
    # With them, every sample the tar held beyond those read is counted.
    stats = {"count": 8, "successes": 6, "failed_to_download": 2, "failed_to_resize": 0}
    (tmp_path / "in-000000_stats.json").write_text(json.dumps(stats))
    assert img2dataset_count(url) == 6
    prepared = prepare_shard(url, image_size=IMAGE_SIZE)
    assert prepared.keys == ["g0", "g1"]
    assert prepared.skipped == {"unreadable_tar": 4}
    assert prepared.samples_in == 6 == len(prepared.keys) + sum(prepared.skipped.values())


def test_img2dataset_count_without_stats(tmp_path: Path) -> None:
    assert img2dataset_count(str(tmp_path / "in-000000.tar")) is None
    (tmp_path / "in-000001_stats.json").write_text("{broken")
    assert img2dataset_count(str(tmp_path / "in-000001.tar")) is None


def test_data_build_exits_1_naming_unfinished_shards(tmp_path: Path, monkeypatch, capsys) -> None:
    from siclip import cli
    from siclip.data import pipeline

    url = _shard_with(tmp_path, _encode((48, 40)))
    config = tmp_path / "build.yaml"
    config.write_text(f"caption:\n  input_shards: [{url}]\n  output_dir: {tmp_path / 'out'}\n")

    def unfinished(cfg: object) -> None:
        raise pipeline.ShardBuildError("siclip data: 1 shards could not be built (in-000000.tar); run again")

    monkeypatch.setattr(pipeline, "run_pipeline", unfinished)
    assert cli.main(["data", "build", "--config", str(config)]) == 1
    assert "in-000000.tar" in capsys.readouterr().err


@pytest.mark.parametrize("decoder", ["cached", "open_clip"])
def test_captioner_actor_uses_the_configured_decoder(decoder: str) -> None:
    from siclip.config import SiclipCfg, apply_overrides, from_dict, to_dict
    from siclip.data.pipeline import CaptionerActor

    cfg = from_dict(
        apply_overrides(
            to_dict(SiclipCfg()),
            [
                "caption.model=siclip-tiny-coca",
                "caption.source=",
                f"caption.decoder={decoder}",
                "caption.sync_every=3",
            ],
        )
    )
    actor = CaptionerActor(to_dict(cfg))
    dec = actor.captioner.decoder
    if decoder == "open_clip":
        assert dec is None
    else:
        assert type(dec).__name__ == "CachedCoCaDecoder" and dec.sync_every == 3
