"""Caption attribute accuracy against hand-counted examples, and the web-vs-synthetic comparison on shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from siclip.data.caption_quality import attribute_accuracy, compare_captions
from siclip.data.shards import AtomicShardWriter

VOCAB = {
    "shape": ["circle", "square"],
    "colour": ["red", "blue"],
    "size": ["small", "large"],
    "position": ["top left", "center"],
}
RED_CIRCLE = {"shape": "circle", "colour": "red", "size": "large", "position": "top left"}
BLUE_SQUARE = {"shape": "square", "colour": "blue", "size": "small", "position": "center"}


def test_attribute_accuracy_hand_counted() -> None:
    captions = [
        "A LARGE red circle at the Top  Left of the picture",  # all four, any case and spacing
        "red ball",  # colour only; "ball" is a synonym and does not count
        "a small red square in the center",  # size, position right; colour and shape wrong
        "bluesquare, centered",  # no whole word matches at all
    ]
    attrs = [RED_CIRCLE, RED_CIRCLE, BLUE_SQUARE, BLUE_SQUARE]
    got = attribute_accuracy(captions, attrs, vocabulary=VOCAB)
    # hits per attribute: shape 1+0+1+0, colour 1+1+0+0, size 1+0+1+0, position 1+0+1+0
    assert got["shape"] == pytest.approx(2 / 4)
    assert got["colour"] == pytest.approx(2 / 4)
    assert got["size"] == pytest.approx(2 / 4)
    assert got["position"] == pytest.approx(2 / 4)
    assert got["overall"] == pytest.approx(8 / 16)
    assert got["all"] == pytest.approx(1 / 4)
    assert got["wrong"] == pytest.approx(1 / 16)  # caption 3 names "red" for a blue square
    assert got["n"] == 4


def test_attribute_accuracy_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 captions but 1"):
        attribute_accuracy(["a", "b"], [RED_CIRCLE], vocabulary=VOCAB)


def test_compare_captions_reads_web_and_synthetic_shards(tmp_path: Path) -> None:
    web, syn = str(tmp_path / "web-000000.tar"), str(tmp_path / "syn-000000.tar")
    with AtomicShardWriter(web) as w, AtomicShardWriter(syn) as s:
        for i, (text, attrs) in enumerate([("cheap red ball", RED_CIRCLE), ("blue tile", BLUE_SQUARE)]):
            meta = {"attributes": attrs}
            w.write({"__key__": f"{i}", "txt": text, "json": meta})
            full = f"a {attrs['size']} {attrs['colour']} {attrs['shape']} at the {attrs['position']}"
            caps = {"syn_text": [full, f"a {attrs['colour']} thing"]}
            s.write({"__key__": f"{i}", "txt": text, "json": meta, "syn.json": json.dumps(caps)})
    got = compare_captions([web], [syn])
    assert got["web"]["n"] == 2 and got["synthetic"]["n"] == 4
    assert got["web"]["colour"] == 1.0 and got["web"]["shape"] == 0.0
    assert got["synthetic"]["shape"] == pytest.approx(2 / 4)
    assert got["synthetic"]["colour"] == 1.0
    assert got["synthetic"]["overall"] > got["web"]["overall"]
