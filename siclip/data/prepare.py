"""One input shard -> its usable samples, resized and re-encoded: the data build's read stage, without Ray.

This module owns what ``siclip data build`` does to each input shard before captioning
(``siclip/data/pipeline.py`` runs it as Ray Data's read tasks): :func:`read_tar_groups` (a tar's members
grouped into samples by key, a damaged tar told apart from one that cannot be read), :func:`validate_sample`
(every reason a sample is unusable, :data:`SKIP_REASONS`), :func:`to_rgb` and :func:`resize_image` (as
img2dataset makes images), :func:`prepare_shard` (all of one shard, with its counts), :func:`prepare_row` (the
same as the row a read task hands on) and :func:`read_task_memory` (what one read task reserves).
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
import time
import unicodedata
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from siclip.data.shards import (
    IMAGE_EXTENSIONS,
    DamagedTarError,
    ShardIOError,
    img2dataset_count,
    iter_tar_members,
    list_sizes,
)

__all__ = [
    "JPEG_QUALITY",
    "PREPARE_MEMORY",
    "SKIP_REASONS",
    "PreparedShard",
    "clean_text",
    "prepare_row",
    "prepare_shard",
    "read_tar_groups",
    "read_task_memory",
    "resize_image",
    "to_rgb",
    "validate_sample",
]

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "unreadable_tar",
    "duplicate_key",
    "missing_image",
    "empty_image",
    "not_image",
    "truncated_image",
    "decompression_bomb",
    "too_small",
    "bad_aspect",
    "encode_error",
    "missing_caption",
    "undecodable_text",
    "empty_caption",
    "bad_json",
)
"""Why a sample is skipped. ``unreadable_tar`` counts the samples lost in a tar whose content is damaged
part-way: as many as img2dataset's ``<shard>_stats.json`` says the tar held beyond those read, or one when
there is no such file (samples read before the damage are kept). A tar that cannot be *read* to its end
(missing, no connection, no credentials, cut short anywhere) is not bad data: its task fails and is
retried, and the shard stays unfinished."""

JPEG_QUALITY = 95
"""The quality every prepared image is re-encoded at (the manifest's ``producer`` records it)."""
PREPARE_MEMORY = 256 * 1024 * 1024
"""Bytes every read task reserves whatever its shard (the worker's own); :func:`read_task_memory` adds the
shard's part."""
# A read task holds the tar's members and the re-encoded images (about 2x the shard's bytes at its peak,
# measured: +178 MB for a 92 MB shard of 2,000 384 px JPEGs), and Ray Data copies the returned row into a
# block: 3x the largest input shard on top of the worker's own.
_PREPARE_MEMORY_PER_SHARD_BYTE = 3


# ------------------------------------------------------------------------------------------ reading
def read_tar_groups(url: str) -> tuple[list[tuple[str, dict[str, bytes]]], bool]:
    """Group a tar's members into samples by key, like webdataset.

    Returns ``(groups, readable)``: ``groups`` in file order (a key seen again later in the file, or an
    extension repeated within one key, makes a group marked with the ``"__duplicate__"`` member, which
    validation skips as ``duplicate_key``), ``readable`` False when the tar's content is damaged before its
    end (the group being read is kept when the damage is at a member header, since each of its members was
    read whole, and dropped otherwise). Raises :class:`~siclip.data.shards.ShardIOError` when the tar cannot
    be read to its end: a missing object, a failed connection, or data that stops early anywhere, in a
    stream or a file at rest, including fewer samples than img2dataset's ``<shard>_stats.json`` says.
    """
    groups: list[tuple[str, dict[str, bytes]]] = []
    seen: set[str] = set()
    current_key: str | None = None
    current: dict[str, bytes] = {}

    def flush() -> None:
        if current_key is None:
            return
        if current_key in seen:
            current["__duplicate__"] = b""
        seen.add(current_key)
        groups.append((current_key, current))

    try:
        for key, ext, data in iter_tar_members(url, expected_samples=img2dataset_count(url)):
            if key != current_key:
                flush()
                current_key, current = key, {}
            if ext.lower() in current:
                current["__duplicate__"] = b""
            current[ext.lower()] = data
    except (tarfile.TarError, EOFError, zlib.error) as exc:  # damaged content (I/O failures propagate)
        if isinstance(exc, DamagedTarError):
            flush()
        log.warning("%s: damaged tar (%s); kept %d samples read before the damage", url, exc, len(groups))
        return groups, False
    flush()
    return groups, True


# ----------------------------------------------------------------------------------------- validating
def validate_sample(
    members: dict[str, bytes], *, min_image_size: int = 0, max_aspect_ratio: float = math.inf
) -> tuple[str | None, Any, str, dict[str, Any]]:
    """Check one raw sample; returns ``(reason, image, caption, meta)`` with ``reason`` None if usable.

    Cheap checks run first; the image's size is checked from its header (``too_small``: shorter side below
    ``min_image_size``; ``bad_aspect``: longer / shorter side above ``max_aspect_ratio``, as img2dataset
    does) before it is decoded, fully, so truncation shows. PIL's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``) refuses images too large to decode safely, its warning included.
    ``image`` is an RGB PIL image when usable.
    """
    from PIL import Image

    if "__duplicate__" in members:
        return "duplicate_key", None, "", {}
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        return "missing_image", None, "", {}
    data = members[ext]
    if not data:
        return "empty_image", None, "", {}
    if "txt" not in members:
        return "missing_caption", None, "", {}
    try:
        caption = clean_text(members["txt"].decode("utf-8"))
    except UnicodeDecodeError:
        return "undecodable_text", None, "", {}
    if not caption:
        return "empty_caption", None, "", {}
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "bad_json", None, "", {}
        if not isinstance(meta, dict):
            return "bad_json", None, "", {}
    with warnings.catch_warnings():
        # Above MAX_IMAGE_PIXELS PIL only warns (it raises above twice that): both are refused here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return "decompression_bomb", None, "", {}
        except Exception:  # PIL raises several types for bytes that are no image at all
            return "not_image", None, "", {}
        w, h = opened.size
        if min(w, h) < max(min_image_size, 1):
            return "too_small", None, "", {}
        if max(w, h) / min(w, h) > max_aspect_ratio:
            return "bad_aspect", None, "", {}
        try:
            opened.load()
            image = to_rgb(opened)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return "decompression_bomb", None, "", {}
        except Exception:  # truncated data, bad Huffman tables: the image is unusable
            return "truncated_image", None, "", {}
    return None, image, caption, meta


def clean_text(text: str) -> str:
    """A caption without byte-order marks or control characters (each control run becomes one space), its
    whitespace collapsed; "" when nothing else was there (the sample is then skipped as ``empty_caption``)."""
    kept = (" " if unicodedata.category(ch) == "Cc" else ch for ch in text if ch != "\ufeff")
    return " ".join("".join(kept).split())


def to_rgb(image: Any) -> Any:
    """An RGB copy of a PIL image, as img2dataset would make it.

    Transparency (an alpha channel, or a palette / grey image's transparent colour) is composited on white;
    16-bit (and 32-bit integer) greyscale is scaled to 8 bits, so mid-grey stays mid-grey instead of being
    clipped to white.
    """
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        import numpy as np

        grey = np.asarray(image).astype(np.int64)
        return Image.fromarray((np.clip(grey, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_image(image: Any, size: int, *, center_crop: bool = False) -> Any:
    """Resize so the shorter side is ``size`` (aspect kept); with ``center_crop`` cut the centre square."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if new != (w, h):
        image = image.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if center_crop and new[0] != new[1]:
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def _encode_jpeg(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


@dataclass
class PreparedShard:
    """One input shard after reading, validation and resizing."""

    keys: list[str] = field(default_factory=list)
    jpgs: list[bytes] = field(default_factory=list)
    txts: list[str] = field(default_factory=list)
    metas: list[str] = field(default_factory=list)
    """The input ``json`` member of each sample, re-serialised (``{}`` when there was none)."""
    samples_in: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def prepare_shard(
    url: str,
    *,
    image_size: int,
    center_crop: bool = False,
    min_image_size: int = 0,
    max_aspect_ratio: float = math.inf,
) -> PreparedShard:
    """Read, validate, resize and re-encode one shard.

    Never raises for bad data (it is counted, ``samples_in == len(keys) + sum(skipped)``); raises
    :class:`~siclip.data.shards.ShardIOError` when the shard cannot be read.
    """
    groups, readable = read_tar_groups(url)
    out = PreparedShard()
    skipped: Counter[str] = Counter()
    for key, members in groups:
        reason, image, caption, meta = validate_sample(
            members, min_image_size=min_image_size, max_aspect_ratio=max_aspect_ratio
        )
        if reason is None:
            try:
                jpg = _encode_jpeg(resize_image(image, image_size, center_crop=center_crop))
            except Exception:  # e.g. a side past JPEG's 65,500 px after resizing a 600x2 image
                reason = "encode_error"
        if reason is not None:
            skipped[reason] += 1
            continue
        out.keys.append(key)
        out.jpgs.append(jpg)
        out.txts.append(caption)
        out.metas.append(json.dumps(meta, sort_keys=True))
    out.samples_in = len(groups)
    if not readable:
        expected = img2dataset_count(url)
        lost = 1 if expected is None else max(expected - len(groups), 0)
        if lost:
            skipped["unreadable_tar"] += lost
            out.samples_in += lost
    out.skipped = dict(skipped)
    return out


def prepare_row(
    row: dict[str, Any],
    *,
    image_size: int,
    center_crop: bool,
    min_image_size: int,
    max_aspect_ratio: float,
    retry_delay_s: float,
) -> dict[str, Any]:
    """One read task of the build (a Ray Data ``map``): ``{"url", "name"}`` in, the shard prepared as one row.

    The row: ``shard`` (the name), ``samples_in``, ``skipped`` (JSON, reason -> count), and one list entry per
    usable sample in ``keys``, ``jpg`` (JPEG bytes), ``txt`` and ``json``. A shard that cannot be read waits
    ``retry_delay_s`` (Ray resubmits a failed task at once) and raises
    :class:`~siclip.data.shards.ShardIOError`.
    """
    try:
        prepared = prepare_shard(
            row["url"],
            image_size=image_size,
            center_crop=center_crop,
            min_image_size=min_image_size,
            max_aspect_ratio=max_aspect_ratio,
        )
    except ShardIOError as exc:
        log.warning("%s: %s; the task will be retried after %.0f s", row["name"], exc, retry_delay_s)
        time.sleep(retry_delay_s)  # Ray resubmits at once: the wait spaces the retries
        raise
    return {
        "shard": row["name"],
        "samples_in": prepared.samples_in,
        "skipped": json.dumps(prepared.skipped, sort_keys=True),
        "keys": prepared.keys,
        "jpg": prepared.jpgs,
        "txt": prepared.txts,
        "json": prepared.metas,
    }


def read_task_memory(urls: list[str]) -> int:
    """Bytes to reserve for one read task: the worker's own plus 3x the largest of these input shards.

    Sizes come from one listing per input folder; shards of unknown size (``pipe:``, a listing that fails)
    count as nothing, so the reservation never falls below the fixed part.
    """
    by_dir: dict[str, set[str]] = {}
    for url in urls:
        if url.startswith("pipe:"):
            continue
        folder, _, name = url.rpartition("/")
        by_dir.setdefault(folder or ".", set()).add(name)
    largest = 0
    for folder, names in by_dir.items():
        try:
            sizes = list_sizes(folder)
        except Exception as exc:  # the read tasks will report a real problem; this is only a reservation
            log.warning("%s: cannot list the input shards' sizes (%s); reserving the default", folder, exc)
            continue
        largest = max([largest, *(sizes.get(n, 0) for n in names)])
    return PREPARE_MEMORY + _PREPARE_MEMORY_PER_SHARD_BYTE * largest
