"""The CoCa captioner: caption cleaning, the tiny CoCa's vocabulary table, captioning, and learning."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siclip.data.captioner import Captioner, CompactVocab, captioner_loss, clean_caption, train_captioner

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("<start_of_text>a red circle . on the left <end_of_text>", "a red circle"),
        ("<start_of_text>a dog on a sofa. <end_of_text>!!!!!!", "a dog on a sofa"),
        ("<start_of_text>  two   cats <end_of_text> . later text", "two cats"),
        ("<start_of_text>no period and no end token", "no period and no end token"),
        ("<start_of_text>. starts with a period <end_of_text>", ""),
        ("st. louis arch at night.", "st"),
    ],
)
def test_clean_caption_cuts_at_first_period(raw: str, clean: str) -> None:
    assert clean_caption(raw) == clean


def test_compact_vocab_round_trip() -> None:
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    texts = ["a red circle", "a red square at the top", "a square"]
    raw = tok(texts)
    vocab = CompactVocab.from_tokens(raw, size=8)  # 4 reserved + the 4 most frequent tokens
    assert vocab.ids[:4] == (0, 49406, 49407, -1)
    a, red, square = (tok([w])[0, 1].item() for w in ("a", "red", "square"))
    assert set(vocab.ids[4:7]) == {a, red, square}  # each used twice or more
    compact = vocab.encode(raw)
    assert compact.shape == raw.shape and int(compact.max()) < 8
    assert compact[0, 0] == CompactVocab.SOT and (compact == CompactVocab.EOT).sum() == 3
    assert set(compact[1].tolist()) >= {CompactVocab.UNK, CompactVocab.PAD}  # "at the top" did not fit
    words = open_clip.decode(torch.tensor(vocab.decode_ids(compact[1].tolist()))).split()
    assert [w for w in words if w not in ("at", "the", "top")] == [
        "<start_of_text>a",
        "red",
        "square",
        "<end_of_text>",
    ]  # unknowns and padding dropped
    full = CompactVocab.from_tokens(raw, size=64)
    for row in range(3):
        assert open_clip.decode(torch.tensor(full.decode_ids(full.encode(raw)[row].tolist()))) == (
            f"<start_of_text>{texts[row]} <end_of_text>"
        )
    assert CompactVocab.from_json(vocab.to_json()) == vocab


def _image(colour: str, size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), COLOURS[colour])


def _clean_shard(path: Path, n: int) -> str:
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            colour = list(COLOURS)[int(rng.integers(3))]
            buf = io.BytesIO()
            _image(colour).save(buf, format="JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"a {colour} picture".encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_tiny_coca_learns_and_captions(tmp_path: Path) -> None:
    shard = _clean_shard(tmp_path / "clean-000000.tar", 48)

    def train(name: str, steps: int) -> str:
        out = str(tmp_path / name)
        return train_captioner(
            [shard], out_path=out, steps=steps, batch_size=16, lr=3e-3, image_size=32, progress=False
        )

    init, trained = train("init.safetensors", 0), train("tiny.safetensors", 30)
    before, after = captioner_loss(init, [shard]), captioner_loss(trained, [shard])
    assert after["caption_loss"] < 0.7 * before["caption_loss"], (before, after)

    cap = Captioner("tiny-coca", trained, num_captions=3, max_length=8, batch_size=2, seed=0)
    images = [_image("red"), _image("blue"), _image("green")]
    first = cap.caption(images, seed=7)
    assert len(first) == 3 and all(len(c) == 3 for c in first)
    assert all(isinstance(t, str) and "<" not in t and "." not in t for c in first for t in c)
    assert cap.caption(images, seed=7) == first  # seeded: reproducible
    assert cap.caption([]) == []

    beam = Captioner("siclip-tiny-coca", trained, method="beam", num_captions=5, max_length=8)
    out = beam.caption(images[:2])
    assert [len(c) for c in out] == [1, 1]
