"""What the read stage makes of unusual images and captions: as img2dataset would, and nothing lost silently.

Transparency is composited on white (img2dataset's choice), 16-bit greyscale keeps its brightness (mid-grey
stays mid-grey, not clipped to white), and captions lose byte-order marks and control characters; a caption
that was nothing else is skipped and counted as ``empty_caption``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from siclip.data.prepare import prepare_shard, validate_sample
from tests.data_fixtures import good_sample, write_tar


def _png(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


def _rgb_of(data: bytes) -> np.ndarray:
    reason, image, _, _ = validate_sample({"png": data, "txt": b"a caption"})
    assert reason is None and image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_alpha_is_composited_on_white() -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (200, 10, 10, 0)  # fully transparent red: white
    rgba[0, 1] = (0, 0, 0, 128)  # half-transparent black: mid-grey
    rgba[0, 2] = (10, 200, 30, 255)  # opaque: as it is
    rgba[1] = (0, 0, 255, 0)
    got = _rgb_of(_png(Image.fromarray(rgba, "RGBA")))
    assert got[0, 0].tolist() == [255, 255, 255] and got[1].tolist() == [[255, 255, 255]] * 3
    assert np.abs(got[0, 1] - 127).max() <= 1  # 255 * (1 - 128/255)
    assert got[0, 2].tolist() == [10, 200, 30]
    la = Image.fromarray(np.array([[[0, 0], [90, 255]]], np.uint8), "LA")
    assert _rgb_of(_png(la)).tolist() == [[[255, 255, 255], [90, 90, 90]]]


def test_a_palette_images_transparent_colour_is_white() -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    got = _rgb_of(_png(p, transparency=0))  # palette entry 0 (black) is transparent
    assert got.tolist() == [[[255, 255, 255], [250, 0, 0]]]


def test_16_bit_grey_keeps_its_brightness() -> None:
    levels = np.array([[0, 32768, 65535, 4096]], np.uint16)  # black, mid-grey, white, dark grey
    data = _png(Image.fromarray(levels))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16-bit on disk
    got = _rgb_of(data)[0, :, 0]
    assert np.abs(got - levels[0] / 257).max() <= 1.0, got  # 8-bit equivalents: 0, 127.5, 255, 15.9


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("\ufeffA dog on a beach", "A dog on a beach"),
        ("A dog\x00 on\ta beach\r\n", "A dog on a beach"),
        ("a\x07b\x1bc \x7f d\u0085e", "a b c d e"),
        ("Ünïcödé ✓ 日本 👍🏽", "Ünïcödé ✓ 日本 👍🏽"),  # letters, symbols and emoji stay
    ],
)
def test_captions_lose_byte_order_marks_and_control_characters(raw: str, want: str) -> None:
    reason, _, caption, _ = validate_sample({"png": _png(Image.new("RGB", (4, 4))), "txt": raw.encode()})
    assert (reason, caption) == (None, want)


def test_a_caption_of_only_control_characters_is_counted_as_empty(tmp_path: Path) -> None:
    url = tmp_path / "00000.tar"
    junk = [("j.jpg", good_sample("x", 0)[0][1]), ("j.txt", "\ufeff\x00\x01\r\n\t".encode())]
    write_tar(url, good_sample("a", 1) + junk + good_sample("b", 2))
    out = prepare_shard(str(url), image_size=8)
    assert out.keys == ["a", "b"] and out.skipped == {"empty_caption": 1} and out.samples_in == 3
