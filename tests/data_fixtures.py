"""Small shards the data tests share: raw img2dataset-style input tars (the data build's tests) and
training shards whose samples say who they are (the loader's tests)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from siclip.data.loader import build_train_loader
from siclip.data.shards import AtomicShardWriter


# ------------------------------------------------------------------------------- input shards (the build)
def noise_jpeg(seed: int, size: tuple[int, int] = (40, 28)) -> bytes:
    """A JPEG of seeded noise, ``size`` = (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path | str, members: list[tuple[str, bytes]]) -> None:
    """A plain tar of ``(member name, bytes)`` in the given order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def good_sample(key: str, seed: int) -> list[tuple[str, bytes]]:
    """One usable img2dataset sample: a 40x28 JPEG, the caption ``photo <key>`` and its ``json``."""
    meta = json.dumps({"url": f"http://x/{key}.jpg"}).encode()
    return [(f"{key}.jpg", noise_jpeg(seed)), (f"{key}.txt", f"photo {key}".encode()), (f"{key}.json", meta)]


BAD_SAMPLES = {
    "empty_image": [("b0.jpg", b""), ("b0.txt", b"x")],
    "not_image": [("b1.jpg", b"certainly not a jpeg"), ("b1.txt", b"x")],
    "truncated_image": [("b2.jpg", noise_jpeg(99, (64, 64))[:1500]), ("b2.txt", b"x")],
    "missing_caption": [("b3.jpg", noise_jpeg(3))],
    "empty_caption": [("b4.jpg", noise_jpeg(4)), ("b4.txt", b"  \n ")],
    "undecodable_text": [("b5.jpg", noise_jpeg(5)), ("b5.txt", b"\xff\xfe\xfa caption")],
    "missing_image": [("b6.txt", b"a caption without an image")],
    "bad_json": [("b7.jpg", noise_jpeg(7)), ("b7.txt", b"x"), ("b7.json", b"{not json")],
}
"""Skip reason -> the members of one sample that must be skipped for it."""


# ---------------------------------------------------------------------------- training shards (the loader)
SYN_CAPTIONS = 4
"""Synthetic captions per sample in :func:`write_id_shard`."""
EMB_WIDTH = 3
"""Teacher embedding width in :func:`write_id_shard`."""


def id_png(value: int) -> bytes:
    """A 4x4 PNG whose red channel is ``value % 256``: a batch's pixels say which samples it holds."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def write_id_shard(
    path: Path | str, ids: Any, *, syn: bool = False, npz: bool = False, corrupt: Any = ()
) -> str:
    """A training shard of samples ``ids``: key ``%06d``, image :func:`id_png`, caption ``cap <id> 0``.

    ``syn``: ``syn <id> <j>`` for j in 1..:data:`SYN_CAPTIONS`; ``npz``: ``image_emb`` of ``-id`` and
    ``text_emb`` row r of ``1000 * id + r``; ids in ``corrupt`` get an image that does not decode.
    """
    with AtomicShardWriter(path) as w:
        for i in ids:
            sample: dict[str, object] = {"__key__": f"{i:06d}", "png": id_png(i), "txt": f"cap {i} 0"}
            if i in corrupt:
                sample["png"] = b"not an image"
            if syn:
                sample["syn.json"] = {"syn_text": [f"syn {i} {j + 1}" for j in range(SYN_CAPTIONS)]}
            if npz:
                text_emb = np.stack(
                    [np.full(EMB_WIDTH, 1000 * i + r, np.float32) for r in range(1 + SYN_CAPTIONS)]
                )
                sample["npz"] = {"image_emb": np.full((2, EMB_WIDTH), -i, np.float32), "text_emb": text_emb}
            w.write(sample)
    return str(path)


def id_tokens(texts: list[str]) -> torch.Tensor:
    """A tokenizer for those captions: "cap 17 0" -> [17, 0], "syn 17 3" -> [17, 3] (sample, caption)."""
    return torch.tensor([[int(t.split()[1]), int(t.split()[2])] for t in texts])


def to_tensor(image: Image.Image) -> torch.Tensor:
    """A transform: the image as a float CHW tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


def make_loader(urls: Any, **kw: Any) -> Any:
    """``build_train_loader`` with small test defaults (batch 4, one rank, no workers, buffer 8, seed 0)."""
    args: dict[str, Any] = {
        "urls": urls,
        "batch_size": 4,
        "rank": 0,
        "world_size": 1,
        "transform": to_tensor,
        "tokenizer": id_tokens,
        "loader_workers": 0,
        "shuffle_buffer": 8,
        "seed": 0,
    }
    args.update(kw)
    return build_train_loader(**args)


def batch_ids(batch: dict[str, torch.Tensor]) -> list[int]:
    """The sample ids of a batch, from its real-caption tokens."""
    return batch["text"][:, 0].tolist()  # type: ignore[no-any-return]
