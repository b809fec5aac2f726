"""``siclip data build``: CC12M (img2dataset shards) -> CC12M-SYN with Ray Data.

This module owns the data stage: :func:`run_pipeline` and the pieces it is made of.

Design (one input shard -> one output shard with the same base name, so a rerun skips finished shards):

0. before any captioning: the earlier build's manifest is read (only a missing one means "nothing built";
   a rerun that would change an output byte is refused), the output is probed with a write and delete
   from the driver and from a Ray worker, a node-local output is refused on a multi-node or autoscaling
   cluster, and GPU workers at zero are requested from the autoscaler and waited for;
1. a dataset of the pending shard paths, one row each;
2. ``map(prepare)`` in CPU tasks, one per shard (memory reserved from the largest shard): read the tar to
   its end, validate every sample (unusable ones are skipped and counted by reason), resize (shorter side
   to ``caption.image_size``, no crop by default) and re-encode JPEG; out comes one row per shard. A read
   that fails for any reason other than the tar's content, a tar cut short included
   (:class:`~siclip.data.shards.ShardIOError`), fails the task, which Ray retries up to
   ``caption.max_retries`` times;
3. ``map(CaptionerActor)`` on an elastic actor pool (``caption.min_actors`` .. ``caption.num_actors``
   actors, each with ``num_gpus_per_actor``/``num_cpus_per_actor``; Ray restarts a lost actor and reruns
   its task): k captions per image in calls of ``caption.batch_size`` images, seeded per sample (seed,
   shard, key) so a rerun reproduces a shard exactly whatever actor, order or batch size captions it;
4. optionally ``map(TeacherActor)`` on a second such pool: the teacher's image and text embeddings per
   sample (``npz``);
5. the last actor stage writes the shard itself, straight to ``caption.output_dir`` (local or ``s3://``,
   :class:`~siclip.data.shards.AtomicShardWriter`), and returns only its manifest entry; the driver
   collects the entries and rewrites ``manifest.json``. A shard is finished only when it is in the manifest
   *and* its file exists with the size recorded there (one listing of the folder); a shard whose task
   failed for good is named at the end (:class:`ShardBuildError`) and built by the next run, and when the
   first ``caption.stop_after_failed_writes`` shards all fail to write the build stops.

Why one row per shard: the actor that writes a shard must hold all of it, and regrouping smaller rows by
shard would need an all-to-all shuffle that does not stream. Parallelism comes from the shards (CC12M has
~1,243 of 10,000 samples); one captioning call still sees ``caption.batch_size`` images. Ray Data's
no-progress timeout (``ray.data_timeout_s``) must then exceed the time one actor needs for one shard.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tarfile
import time
import unicodedata
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from siclip import ray_compat
from siclip.config import ConfigError, SiclipCfg, expand_shards, from_dict, is_uri, to_dict
from siclip.data.shards import (
    IMAGE_EXTENSIONS,
    AtomicShardWriter,
    DamagedTarError,
    Manifest,
    ManifestError,
    ManifestNotFoundError,
    ShardIOError,
    img2dataset_count,
    iter_tar_members,
    list_sizes,
    read_manifest,
    write_manifest,
)

__all__ = [
    "SKIP_REASONS",
    "CaptionerActor",
    "PreparedShard",
    "ShardBuildError",
    "TeacherActor",
    "clean_text",
    "prepare_shard",
    "read_tar_groups",
    "read_task_memory",
    "resize_image",
    "run_pipeline",
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

# Caption settings that change what is written: a rerun into a folder made with other values would mix
# two datasets, so it is refused.
_OUTPUT_KEYS = (
    "model",
    "source",
    "num_captions",
    "method",
    "top_p",
    "max_length",
    "decoder",
    "sync_every",
    "image_size",
    "min_image_size",
    "max_aspect_ratio",
    "seed",
)
# Teacher settings that change the stored embeddings (checked when caption.teacher_embeddings is on).
_TEACHER_KEYS = ("name", "source")
_JPEG_QUALITY = 95
_NEW_FOLDER = "use a new caption.output_dir (or delete the old one) rather than mixing two datasets"
_PREPARE_MEMORY = 256 * 1024 * 1024
# A read task holds the tar's members and the re-encoded images (about 2x the shard's bytes at its peak,
# measured: +178 MB for a 92 MB shard of 2,000 384 px JPEGs), and Ray Data copies the returned row into a
# block: 3x the largest input shard on top of the worker's own.
_PREPARE_MEMORY_PER_SHARD_BYTE = 3


class ShardBuildError(RuntimeError):
    """The build could not finish: some shards could not be built or recorded (the message names them; rerun
    to finish), or the output folder's manifest exists but cannot be read (the message names it)."""


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
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
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


def _prepare_row(
    row: dict[str, Any],
    *,
    image_size: int,
    center_crop: bool,
    min_image_size: int,
    max_aspect_ratio: float,
    retry_delay_s: float,
) -> dict[str, Any]:
    """Ray Data ``map``: one shard path -> one row holding the shard's prepared samples."""
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


def _sample_seed(seed: int, shard: str, key: str) -> int:
    """The caption seed of one sample: its captions depend on it and the image only, never on the batch."""
    # crc32, not hash(): Python salts str hashes per process, and every actor is its own process.
    return zlib.crc32(f"{seed}:{shard}:{key}".encode()) & 0x7FFFFFFF


def _decode_images(jpgs: list[bytes]) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in jpgs]


# ------------------------------------------------------------------------------------------- writing
def _write_shard(path: str, row: dict[str, Any], *, with_npz: bool) -> dict[str, Any]:
    """Write one prepared, captioned shard and return its manifest entry (checking the counts add up)."""
    skipped = {k: int(v) for k, v in json.loads(row["skipped"]).items()}
    with AtomicShardWriter(path) as writer:
        for i, key in enumerate(row["keys"]):
            sample: dict[str, Any] = {
                "__key__": key,
                "jpg": row["jpg"][i],
                "txt": row["txt"][i],
                "json": row["json"][i],
                "syn.json": row["syn"][i],
            }
            if with_npz:
                sample["npz"] = row["npz"][i]
            writer.write(sample)
        samples = writer.count
        samples_in = int(row["samples_in"])
        if samples_in != samples + sum(skipped.values()):
            # A bug, not bad data: raising here aborts the write, so the shard is never marked finished.
            raise RuntimeError(
                f"{path}: samples_in {samples_in} != samples_out {samples} + skipped {sum(skipped.values())}"
            )
    return {
        "name": row["shard"],
        "samples": samples,
        "samples_in": samples_in,
        "skipped": dict(sorted(skipped.items())),
        "bytes": writer.size,
        "sha256": writer.sha256,
    }


def _commit_shard(
    out_dir: str, row: dict[str, Any], *, with_npz: bool, max_retries: int, retry_delay_s: float
) -> dict[str, Any]:
    """Write the shard (retrying failed writes with growing waits).

    Returns the row ``{"name": shard, "entry": JSON, "error": ""}``, or, once the retries are spent,
    ``{"name": shard, "entry": "", "error": what failed}``: the driver counts failed writes to stop a build
    whose output cannot be written. A counts bug (RuntimeError) still raises.
    """
    path = _join(out_dir, row["shard"])
    for attempt in range(max_retries + 1):
        try:
            entry = _write_shard(path, row, with_npz=with_npz)
            return {"name": row["shard"], "entry": json.dumps(entry, sort_keys=True), "error": ""}
        except RuntimeError:
            raise
        except Exception as exc:  # the store failed us (connection, credentials, throttling)
            if attempt == max_retries:
                error = f"{path}: cannot write ({type(exc).__name__}: {exc})"
                log.warning("%s; giving up on this shard", error)
                return {"name": row["shard"], "entry": "", "error": error}
            wait = retry_delay_s * 2**attempt
            log.warning(
                "%s: write failed (%s); retry %d of %d in %.0f s", path, exc, attempt + 1, max_retries, wait
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------- actors
# The model-loading actors and the teacher builder run inside Ray Data; tests/integration covers them.
class CaptionerActor:
    """Ray Data callable class: adds ``syn`` (a ``{"syn_text": [...]}`` JSON string per sample) to a shard
    row, and writes the shard when it is the last stage (``out_dir`` given), returning its manifest entry."""

    def __init__(self, cfg: dict[str, Any], out_dir: str = "", chunk: int = 0) -> None:
        import torch

        from siclip.data.captioner import Captioner

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.cfg = from_dict(cfg)
        self.out_dir = out_dir
        c = self.cfg.caption
        self.chunk = chunk or c.batch_size
        self.captioner = Captioner(
            c.model,
            c.source,
            num_captions=c.num_captions,
            method=c.method,
            top_p=c.top_p,
            max_length=c.max_length,
            batch_size=c.batch_size,
            seed=c.seed,
            decoder=c.decoder,
            sync_every=c.sync_every,
        )

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        jpgs = list(row["jpg"])
        seeds = [_sample_seed(self.cfg.caption.seed, row["shard"], str(key)) for key in row["keys"]]
        starts = list(range(0, len(jpgs), self.chunk))
        syn: list[str] = []

        def pixels(start: int) -> Any:
            return self.captioner.preprocess_images(_decode_images(jpgs[start : start + self.chunk]))

        # Decoding and preprocessing the next chunk (PIL and torch release the GIL) overlaps captioning this
        # one, so the GPU does not wait for the CPU between chunks.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="siclip-decode") as pool:
            ahead = [pool.submit(pixels, starts[0])] if starts else []
            for i, start in enumerate(starts):
                batch = ahead.pop().result()
                if i + 1 < len(starts):
                    ahead.append(pool.submit(pixels, starts[i + 1]))
                captions = self.captioner.caption(
                    [], pixels=batch, sample_seeds=seeds[start : start + self.chunk]
                )
                syn.extend(json.dumps({"syn_text": caps}) for caps in captions)
        row["syn"] = syn
        if not self.out_dir:
            return row
        c = self.cfg.caption
        return _commit_shard(
            self.out_dir, row, with_npz=False, max_retries=c.max_retries, retry_delay_s=c.retry_delay_s
        )


class TeacherActor:
    """Ray Data callable class: adds ``npz`` = ``{"image_emb": [D], "text_emb": [1 + k, D]}`` (float16) to a
    captioned shard row, writes the shard to ``out_dir`` and returns its manifest entry.

    The text embeddings are of the real caption then the k synthetic ones, MobileCLIP's reinforced layout.
    """

    def __init__(self, cfg: dict[str, Any], out_dir: str, chunk: int = 0) -> None:
        import torch

        self.cfg = from_dict(cfg)
        self.out_dir = out_dir
        self.chunk = chunk or self.cfg.caption.batch_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.transform, self.tokenizer = _build_teacher_parts(self.cfg)
        self.model.to(self.device).eval().requires_grad_(False)

    def _embed(self, jpgs: list[bytes], txts: list[str], syns: list[str]) -> list[bytes]:
        import numpy as np
        import torch
        import torch.nn.functional as F

        n = len(jpgs)
        images = _decode_images(jpgs)
        texts = [[txt, *json.loads(syn)["syn_text"]] for txt, syn in zip(txts, syns, strict=True)]
        per = len(texts[0])
        with torch.no_grad():
            pixels = torch.stack([self.transform(im) for im in images]).to(self.device)
            image_emb = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
            tokens = self.tokenizer([t for group in texts for t in group]).to(self.device)
            text_emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1).view(n, per, -1)
        out = []
        for i in range(n):
            buf = io.BytesIO()
            np.savez(
                buf,
                image_emb=image_emb[i].cpu().numpy().astype(np.float16),
                text_emb=text_emb[i].cpu().numpy().astype(np.float16),
            )
            out.append(buf.getvalue())
        return out

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        jpgs, txts, syns = list(row["jpg"]), list(row["txt"]), list(row["syn"])
        npz: list[bytes] = []
        for s in range(0, len(jpgs), self.chunk):
            npz.extend(
                self._embed(jpgs[s : s + self.chunk], txts[s : s + self.chunk], syns[s : s + self.chunk])
            )
        row["npz"] = npz
        c = self.cfg.caption
        return _commit_shard(
            self.out_dir, row, with_npz=True, max_retries=c.max_retries, retry_delay_s=c.retry_delay_s
        )


def _check_teacher(cfg: SiclipCfg) -> None:
    """Fail in the driver, before Ray starts actors, when the teacher cannot give meaningful embeddings."""
    if not cfg.teacher.source:
        raise ConfigError(
            f"teacher.source: got ''; caption.teacher_embeddings=true needs {cfg.teacher.name!r}'s trained "
            "weights (a .pt/.safetensors file, local-dir:PATH or an open_clip pretrained tag), not random ones"
        )
    try:
        from siclip.models.build import build_teacher  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"caption.teacher_embeddings=true needs siclip.models.build.build_teacher ({exc})"
        ) from exc


def _build_teacher_parts(cfg: SiclipCfg) -> tuple[Any, Any, Any]:
    """The frozen teacher, its own eval transform and tokenizer (a siclip preset's, else open_clip's)."""
    from siclip.models.build import build_teacher
    from siclip.models.presets import build_tokenizer, build_transform, list_presets

    name = cfg.teacher.name
    model = build_teacher(cfg.teacher)
    if name in list_presets():
        return model, build_transform(name, train=False), build_tokenizer(name)
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
    return model, image_transform_v2(preprocess, is_train=False), open_clip.get_tokenizer(name)


# ------------------------------------------------------------------------------------------- driver
def _check_resources(cfg: SiclipCfg, prepare_cpus: float) -> None:
    """Fail before starting when the actor pools can never be scheduled (Ray Data would wait silently).

    Every pool (captioner, and teacher when on) starts ``caption.min_actors`` actors, so those must fit
    together, with a CPU left for a read task; pools that cannot all grow to ``caption.num_actors`` only
    get a warning (they are elastic and grow as far as the cluster allows). When the cluster lacks them now
    but its autoscaler can launch them (GPU workers scaled to zero), they are requested and waited for, up
    to ``caption.worker_start_timeout_s``.
    """
    import ray

    c = cfg.caption
    pools = 2 if c.teacher_embeddings else 1
    what, need, stays = (
        ("captioner and teacher pools", "need", "they stay")
        if pools == 2
        else ("captioner pool", "needs", "it stays")
    )
    # GPUs of one captioner actor plus, with stored embeddings, one teacher actor (its own share)
    per_pair = c.num_gpus_per_actor + (c.teacher_gpus if c.teacher_embeddings else 0.0)
    shares = f"({c.num_gpus_per_actor:g} + {c.teacher_gpus:g})" if c.teacher_embeddings else f"{per_pair:g}"
    need_gpus = c.min_actors * per_pair
    need_cpus = pools * c.min_actors * c.num_cpus_per_actor
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0.0)), float(res.get("CPU", 0.0))
    if need_gpus > gpus + 1e-9 or need_cpus + prepare_cpus > cpus + 1e-9:
        gpus, cpus = _wait_for_autoscaler(cfg, need_gpus, need_cpus + prepare_cpus, what, need)
    if need_gpus > gpus + 1e-9:
        keys = "caption.num_gpus_per_actor" + (
            " / caption.teacher_gpus_per_actor" if c.teacher_embeddings else ""
        )
        raise RuntimeError(
            f"{keys}={shares}: the {what} {need} at least {c.min_actors} (caption.min_actors) x {shares} = "
            f"{need_gpus:g} GPUs but the Ray cluster has {gpus:g}; lower caption.min_actors or {keys} (0: "
            "caption on CPUs), or connect to a cluster with more GPUs (ray.address / RAY_ADDRESS)."
        )
    if need_cpus + prepare_cpus > cpus + 1e-9:
        raise RuntimeError(
            f"caption.num_cpus_per_actor={c.num_cpus_per_actor:g} leaves no CPU for reading shards: the "
            f"cluster has {cpus:g} CPUs, the {what} {need} {pools} x {c.min_actors} x "
            f"{c.num_cpus_per_actor:g} = {need_cpus:g} and a read task {prepare_cpus:g}. Lower "
            "caption.num_cpus_per_actor or caption.min_actors."
        )
    full = c.num_actors * per_pair
    most = _autoscaler().most  # unknown (None): the autoscaler may grow the pools, no warning
    if full > gpus + 1e-9 and most is not None and full > most.get("GPU", 0.0) + 1e-9:
        log.warning(
            "the %s would need %g GPUs at caption.num_actors=%d but the cluster has %g: %s smaller",
            what,
            full,
            c.num_actors,
            gpus,
            stays,
        )


_WAIT_POLL_S = 5.0


def _autoscaler() -> ray_compat.Autoscaler:
    """The cluster's autoscaler, read as ``train.use_gpu: auto`` reads it (siclip/ray_compat.py)."""
    return ray_compat.autoscaler()


def _wait_for_autoscaler(
    cfg: SiclipCfg, need_gpus: float, need_cpus: float, what: str, need: str
) -> tuple[float, float]:
    """Ask the autoscaler for the pools' minimum and wait for it; returns the cluster's (GPUs, CPUs) then.

    Returns at once (with what the cluster has) when there is no autoscaler or it can never launch that
    much: the caller's checks then fail with their own message. An autoscaler whose limits Ray does not
    publish is asked and waited for (the timeout bounds the wait).
    """
    import ray

    res = ray.cluster_resources()
    have = (float(res.get("GPU", 0.0)), float(res.get("CPU", 0.0)))
    scaler = _autoscaler()
    most = scaler.most
    if not scaler.present:
        return have
    if most is not None and (
        need_gpus > most.get("GPU", 0.0) + 1e-9 or need_cpus > most.get("CPU", 0.0) + 1e-9
    ):
        return have
    from ray.autoscaler.sdk import request_resources

    c = cfg.caption
    timeout = c.worker_start_timeout_s

    def bundle(gpus: float) -> dict[str, float]:
        return {"CPU": c.num_cpus_per_actor, **({"GPU": gpus} if gpus else {})}

    print(
        f"siclip data: the cluster has {have[0]:g} GPUs and {have[1]:g} CPUs now; the {what} {need} "
        f"{need_gpus:g} GPUs and {need_cpus:g} CPUs (a read task included): asking the autoscaler and waiting "
        f"up to {timeout} s (caption.worker_start_timeout_s)",
        flush=True,
    )
    bundles = [bundle(c.num_gpus_per_actor)] * c.min_actors
    if c.teacher_embeddings:
        bundles += [bundle(c.teacher_gpus)] * c.min_actors
    request_resources(bundles=[*bundles, {"CPU": 1.0}])
    deadline = time.monotonic() + timeout
    try:
        while True:
            res = ray.cluster_resources()
            have = (float(res.get("GPU", 0.0)), float(res.get("CPU", 0.0)))
            if have[0] + 1e-9 >= need_gpus and have[1] + 1e-9 >= need_cpus:
                return have
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"caption.worker_start_timeout_s: {timeout} s passed and the autoscaler never launched "
                    f"the {need_gpus:g} GPUs and {need_cpus:g} CPUs the {what} {need} (the cluster has "
                    f"{have[0]:g} GPUs and {have[1]:g} CPUs); allowed: a longer timeout, fewer or smaller "
                    "actors (caption.min_actors, caption.num_gpus_per_actor), or a cluster that can launch "
                    "such nodes"
                )
            time.sleep(_WAIT_POLL_S)
    finally:
        # The actors' own demand keeps the nodes from here on; a standing request would pin the cluster size.
        request_resources(bundles=[])


_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _check_cluster_storage(out_dir: str) -> None:
    """On a cluster of several nodes, or one an autoscaler can grow, the output must be shared storage.

    The actors write shards on whatever node they run; the manifest and a rerun's checks see the driver's.
    """
    import ray

    from siclip.preflight import check_shared_folder

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    can_grow = _autoscaler().present
    check_shared_folder("caption.output_dir", out_dir, nodes=nodes, can_add_nodes=can_grow)


def _output_name(url: str) -> str:
    """The output shard's name: the input's base name; for a ``pipe:`` command, that of the tar it names."""
    if url.startswith("pipe:"):
        import shlex

        try:
            words = shlex.split(url.removeprefix("pipe:"))
        except ValueError:
            words = url.removeprefix("pipe:").split()
        tars = [w for w in (w.split("?")[0].split("#")[0] for w in words) if w.endswith(_SHARD_SUFFIXES)]
        if not tars:
            raise ConfigError(
                f"caption.input_shards: got {url!r}; a pipe: command must name its tar (a word ending in "
                f"{', '.join(_SHARD_SUFFIXES)}), which gives the output shard its name"
            )
        url = tars[-1]
    return url.rstrip("/").rsplit("/", 1)[-1]


def _resolve_inputs(cfg: SiclipCfg) -> list[tuple[str, str]]:
    patterns = cfg.caption.input_shards
    urls = expand_shards(patterns)
    if not urls:
        raise ConfigError(f"caption.input_shards: got {list(patterns)!r}; no input shards matched")
    missing = [u for u in urls if not is_uri(u) and not os.path.isfile(u)]
    if missing:
        raise ConfigError(f"caption.input_shards: no such shard file {missing[0]!r} ({len(missing)} missing)")
    names = [_output_name(u) for u in urls]
    dupes = sorted(n for n, k in Counter(names).items() if k > 1)
    if dupes:
        raise ConfigError(
            f"caption.input_shards: two inputs share the shard name {dupes[0]!r}; output shards keep the "
            "input's base name, so names must be unique"
        )
    return list(zip(urls, names, strict=True))


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
    return _PREPARE_MEMORY + _PREPARE_MEMORY_PER_SHARD_BYTE * largest


def _join(out_dir: str, name: str) -> str:
    return out_dir.rstrip("/") + "/" + name


def _probe_output(out_dir: str) -> str:
    """Write a small file into ``out_dir`` and delete it; returns "" or what failed (one line)."""
    import uuid

    path = _join(out_dir, f".siclip-write-probe-{uuid.uuid4().hex}")
    try:
        if is_uri(out_dir):
            import fsspec

            fs, fs_path = fsspec.core.url_to_fs(path)
            with fs.open(fs_path, "wb") as f:
                f.write(b"siclip write probe\n")
            fs.rm(fs_path)
        else:
            os.makedirs(out_dir, exist_ok=True)
            with open(path, "wb") as f:
                f.write(b"siclip write probe\n")
            os.remove(path)
    except Exception as exc:  # permissions, a read-only mount, a missing bucket, credentials
        return f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return ""


def _check_output_writable(out_dir: str, error: str, where: str) -> None:
    if error:
        raise ConfigError(
            f"caption.output_dir: got {out_dir!r}; cannot write there from {where} ({error}); nothing was "
            "captioned: allowed: a folder or bucket every node can write (check the path, its permissions "
            "and the credentials, e.g. ray.env_vars)"
        )


def _load_previous(
    out_dir: str, cfg: SiclipCfg, build: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Per-shard records of an earlier run into the same folder (refusing one made differently).

    Made differently: other caption settings that change an output byte, another teacher (when embeddings
    are stored), and, from ``build`` (``{"center_crop": bool, "inputs": [urls]}``, as the manifest records
    it), cropping or other input shards. A manifest that does not record a setting has nothing to contradict.
    """
    try:
        previous = read_manifest(out_dir)
    except ManifestNotFoundError:
        return {}
    except ManifestError as exc:
        # Only "not there" means a new build: starting afresh over an unreadable or damaged manifest would
        # rebuild every shard and overwrite the record of what was built.
        raise ShardBuildError(
            f"siclip data: {exc}; the earlier build's record is kept untouched and nothing was built: fix "
            "access to it (or restore it), then run again"
        ) from exc
    before = previous.config.get("caption", {})
    now = to_dict(cfg.caption)
    changed = [
        f"caption.{k}" for k in (*_OUTPUT_KEYS, "teacher_embeddings") if k in before and before[k] != now[k]
    ]
    if cfg.caption.teacher_embeddings and "teacher" in previous.config:
        teacher_before, teacher_now = previous.config["teacher"], to_dict(cfg.teacher)
        changed += [f"teacher.{k}" for k in _TEACHER_KEYS if teacher_before.get(k) != teacher_now[k]]
    if changed:
        key = changed[0]
        section, name = key.split(".")
        was = (before if section == "caption" else previous.config["teacher"]).get(name)
        value = to_dict(getattr(cfg, section))[name]
        raise ConfigError(f"{key}: got {value!r} but {out_dir} was built with {was!r}; {_NEW_FOLDER}")
    built = previous.config.get("build", {})
    if build is not None and isinstance(built, dict):
        if "center_crop" in built and built["center_crop"] != build["center_crop"]:
            raise ConfigError(
                f"center_crop: got {build['center_crop']!r} but {out_dir} was built with "
                f"{built['center_crop']!r}; {_NEW_FOLDER}"
            )
        if "inputs" in built and set(built["inputs"]) != set(build["inputs"]):
            added = [u for u in build["inputs"] if u not in set(built["inputs"])]
            dropped = [u for u in built["inputs"] if u not in set(build["inputs"])]
            parts = [f"{len(added)} new (first {added[0]!r})"] if added else []
            parts += [f"{len(dropped)} no longer given (first {dropped[0]!r})"] if dropped else []
            raise ConfigError(
                f"caption.input_shards: not the {len(built['inputs'])} shards {out_dir} was built from: "
                f"{' and '.join(parts)}; {_NEW_FOLDER}"
            )
    return {s["name"]: s for s in previous.shards}


def _intact(record: dict[str, Any], sizes: dict[str, int], out_dir: str) -> bool:
    """A recorded shard is finished when its file is there with the size recorded (when one was)."""
    name = record["name"]
    if name not in sizes:
        return False
    want = record.get("bytes")
    if isinstance(want, int) and sizes[name] != want:
        log.warning(
            "%s: %d bytes but the manifest recorded %d; building it again",
            _join(out_dir, name),
            sizes[name],
            want,
        )
        return False
    return True


def _build_manifest(
    cfg: SiclipCfg,
    order: list[str],
    records: dict[str, dict[str, Any]],
    producer: dict[str, Any],
    build: dict[str, Any] | None = None,
) -> Manifest:
    shards = [records[n] for n in order if n in records]
    skipped: Counter[str] = Counter()
    for s in shards:
        skipped.update(s.get("skipped", {}))
    config: dict[str, Any] = {"caption": to_dict(cfg.caption)}
    if cfg.caption.teacher_embeddings:
        config["teacher"] = to_dict(cfg.teacher)
    if build is not None:
        config["build"] = build
    manifest = Manifest(
        kind="cc12m-syn",
        shards=shards,
        samples_in=sum(int(s.get("samples_in", s["samples"])) for s in shards),
        samples_out=sum(int(s["samples"]) for s in shards),
        samples_skipped=sum(skipped.values()),
        skipped=dict(sorted(skipped.items())),
        producer=producer,
        config=config,
    )
    if manifest.samples_in != manifest.samples_out + manifest.samples_skipped:
        raise RuntimeError(
            f"manifest totals do not add up: in {manifest.samples_in} != out {manifest.samples_out} + "
            f"skipped {manifest.samples_skipped}"
        )
    return manifest


def _try_write_manifest(out_dir: str, manifest: Manifest, *, attempts: int, delay_s: float) -> bool:
    """Write the manifest, retrying; False (logged) when the store keeps failing."""
    for attempt in range(attempts):
        try:
            write_manifest(out_dir, manifest)
            return True
        except Exception as exc:  # the store failed us; the shards stay unrecorded until a write succeeds
            log.warning("%s: cannot write the manifest (%s: %s)", out_dir, type(exc).__name__, exc)
            if attempt + 1 < attempts:
                time.sleep(delay_s * 2**attempt)
    return False


def _unfinished_error(out_dir: str, failed: list[str], unrecorded: list[str]) -> ShardBuildError:
    parts = []
    if failed:
        parts.append(
            f"{len(failed)} shards could not be built ({', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''})"
        )
    if unrecorded:
        parts.append(
            f"{len(unrecorded)} built shards could not be recorded in {out_dir}/manifest.json "
            f"({', '.join(unrecorded[:5])}{', ...' if len(unrecorded) > 5 else ''})"
        )
    return ShardBuildError(
        f"siclip data: {'; '.join(parts)}; see the errors above, then run the same command again to finish them"
    )


# The Ray driver and its log line: tests/integration runs them.
def run_pipeline(
    cfg: SiclipCfg,
    *,
    progress: bool = True,
    center_crop: bool = False,
    chunk_size: int = 0,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> Manifest:
    """Caption ``caption.input_shards`` into ``caption.output_dir``; returns the written manifest.

    Finished output shards (listed in the manifest and present) are not redone; a half-written ``.tmp``
    from a killed run is overwritten. ``chunk_size`` (default ``caption.batch_size``) is how many images
    one captioning call receives. ``on_shard`` is called in the driver with each shard's manifest entry
    once it is recorded (progress hooks, tests). Raises ConfigError when no input matches or the config
    cannot work, RuntimeError when the actors could never be scheduled, :class:`ShardBuildError` naming
    the shards that could not be built or recorded (the others are kept: rerun to finish), and Ray Data's
    ``ExecutionTimeoutError`` after ``ray.data_timeout_s`` seconds without progress.
    """
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    started = time.perf_counter()
    c = cfg.caption
    inputs = _resolve_inputs(cfg)
    if c.teacher_embeddings:
        _check_teacher(cfg)
    out_dir = c.output_dir
    _check_output_writable(out_dir, _probe_output(out_dir), "this driver")
    # What else decides an output byte: the crop, and which inputs (the rerun guard compares both).
    build = {
        "center_crop": center_crop,
        "inputs": [u if is_uri(u) else os.path.abspath(u) for u, _ in inputs],
    }
    records = _load_previous(out_dir, cfg, build)
    order = [name for _, name in inputs]
    # A shard on disk but not in the manifest was written just before a kill; redo it (same bytes). One
    # listing gives every file's size: a recorded shard whose size differs is not the file that was built.
    sizes = list_sizes(out_dir)
    done = {n for n in order if n in records and _intact(records[n], sizes, out_dir)}
    pending = [(u, n) for u, n in inputs if n not in done]
    records = {n: r for n, r in records.items() if n in done}
    producer = {
        "captioner": f"{c.model}:{c.source}" if c.source else c.model,
        "model": c.model,
        "source": c.source,
        "center_crop": center_crop,
        "jpeg_quality": _JPEG_QUALITY,
        "teacher": f"{cfg.teacher.name}:{cfg.teacher.source}" if c.teacher_embeddings else "",
        "tool": "siclip.data.pipeline",
    }
    done_before = len(inputs) - len(pending)
    attempts = c.max_retries + 1
    if not pending:
        manifest = _build_manifest(cfg, order, records, producer, build)
        if not _try_write_manifest(out_dir, manifest, attempts=attempts, delay_s=c.retry_delay_s):
            raise _unfinished_error(out_dir, [], order)
        _summary(
            manifest,
            shards_done=0,
            shards_reused=done_before,
            written=0,
            seconds=time.perf_counter() - started,
        )
        return manifest

    from siclip.ray_session import init_ray

    init_ray(cfg.ray)
    prepare_cpus = 1.0
    _check_cluster_storage(out_dir)
    _check_resources(cfg, prepare_cpus)
    cfg_dict = to_dict(cfg)
    chunk = chunk_size or c.batch_size
    # Tasks and actors get ray.env_vars (e.g. AWS_ENDPOINT_URL for an S3-compatible store).
    env_vars = {str(k): str(v) for k, v in cfg.ray.env_vars.items()}  # YAML may give numbers; Ray wants str
    env: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
    # The actors write the shards: check a worker can, before any GPU time is spent.
    probe = ray.remote(num_cpus=0, max_retries=0, **env)(_probe_output)
    _check_output_writable(
        out_dir, ray.get(probe.remote(out_dir), timeout=float(cfg.ray.data_timeout_s)), "a Ray worker"
    )

    ds = ray.data.from_items(
        [{"url": u, "name": n} for u, n in pending], override_num_blocks=len(pending)
    ).map(
        _prepare_row,  # type: ignore[arg-type]
        fn_kwargs={
            "image_size": c.image_size,
            "center_crop": center_crop,
            "min_image_size": c.min_image_size,
            "max_aspect_ratio": c.max_aspect_ratio,
            "retry_delay_s": c.retry_delay_s,
        },
        num_cpus=prepare_cpus,
        # A read task holds one shard in memory (reserved from the largest pending shard's size); the
        # reservation also keeps Ray Data from fusing the read tasks into the captioner actors, which would
        # serialise decoding with captioning.
        memory=read_task_memory([u for u, _ in pending]),
        # Bounded retries of I/O failures only: bad data never raises, and a bug would fail every try.
        max_retries=c.max_retries,
        retry_exceptions=[ShardIOError],
        **env,
    )
    pool = {
        "compute": ActorPoolStrategy(min_size=c.min_actors, max_size=c.num_actors),
        "num_gpus": c.num_gpus_per_actor,
        "num_cpus": c.num_cpus_per_actor,
        # Ray restarts a lost actor (max_restarts=-1 by default) and reruns its task, this many times.
        "max_task_retries": max(c.max_retries, 1),
        **env,
    }
    last_out = "" if c.teacher_embeddings else out_dir
    ds = ds.map(
        CaptionerActor,  # type: ignore[arg-type]
        fn_constructor_kwargs={"cfg": cfg_dict, "out_dir": last_out, "chunk": chunk},
        **pool,
    )
    if c.teacher_embeddings:
        ds = ds.map(
            TeacherActor,  # type: ignore[arg-type]
            fn_constructor_kwargs={"cfg": cfg_dict, "out_dir": out_dir, "chunk": chunk},
            **{**pool, "num_gpus": c.teacher_gpus},
        )

    # This dataset's own context: the process-wide one (and later datasets, e.g. training's) stay as they are.
    ds.context.execution_no_progress_timeout_s = float(cfg.ray.data_timeout_s)
    ds.context.enable_progress_bars = progress
    # A shard whose task failed for good (its retries spent) is dropped from this run, not the whole
    # build: the others finish, and the driver names the missing ones at the end.
    ds.context.max_errored_blocks = -1

    written = 0
    unrecorded: list[str] = []
    failed_writes: list[str] = []
    records_new: set[str] = set()
    for row in ds.iter_rows():
        if row["error"]:
            failed_writes.append(row["error"])
            if (
                c.stop_after_failed_writes
                and len(failed_writes) >= c.stop_after_failed_writes
                and not records_new
            ):
                raise ShardBuildError(
                    f"siclip data: the first {len(failed_writes)} shards all failed to write "
                    f"(caption.stop_after_failed_writes={c.stop_after_failed_writes}), so the build stopped "
                    f"rather than caption every shard for nothing; last: {failed_writes[-1]}"
                )
            continue
        entry = json.loads(row["entry"])
        name = entry["name"]
        records_new.add(name)
        records[name] = entry
        written += int(entry["samples"])
        # Rewritten after every shard, so a killed run still knows what it finished; one try here (the
        # next shard, or the end, tries again), so a flaky store does not stall the build.
        if _try_write_manifest(
            out_dir, _build_manifest(cfg, order, records, producer, build), attempts=1, delay_s=0
        ):
            unrecorded = []
            if on_shard is not None:
                on_shard(entry)
        else:
            unrecorded.append(name)
    manifest = _build_manifest(cfg, order, records, producer, build)
    recorded = unrecorded == [] or _try_write_manifest(
        out_dir, manifest, attempts=attempts, delay_s=c.retry_delay_s
    )
    failed = [n for _, n in pending if n not in records]
    if failed or not recorded:
        raise _unfinished_error(out_dir, failed, [] if recorded else unrecorded)
    seconds = time.perf_counter() - started
    _summary(manifest, shards_done=len(pending), shards_reused=done_before, written=written, seconds=seconds)
    return manifest


def _summary(
    manifest: Manifest, *, shards_done: int, shards_reused: int, written: int, seconds: float
) -> None:
    """One line for the log: what this run built, the folder's totals, and this run's rate."""
    rate = written / seconds if seconds > 0 else 0.0
    print(
        f"siclip data: {shards_done} shards built ({written} samples, {rate:.1f}/s incl. start-up, "
        f"{seconds:.1f} s), {shards_reused} already done; folder totals: in {manifest.samples_in}, "
        f"out {manifest.samples_out}, skipped {manifest.samples_skipped} {manifest.skipped}",
        flush=True,
    )


def iter_output(out_dir: str) -> Iterator[dict[str, Any]]:
    """Decoded samples of a finished CC12M-SYN folder in manifest order (tools and tests)."""
    from siclip.data.shards import iter_samples, list_shards

    yield from iter_samples(list_shards(out_dir))
