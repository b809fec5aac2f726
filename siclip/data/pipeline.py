"""``siclip data build``: CC12M (img2dataset shards) -> CC12M-SYN with Ray Data.

This module owns the data stage: :func:`run_pipeline` and the pieces it is made of.

Design (one input shard -> one output shard with the same base name, so a rerun skips finished shards):

1. a dataset of the pending shard paths, one row each;
2. ``flat_map(prepare)`` in CPU tasks, one per shard: read the tar, validate every sample (bad ones are
   skipped and counted by reason), resize (shorter side to ``caption.image_size``, no crop by default) and
   re-encode JPEG; the shard's valid samples come out as *chunk rows* of ``caption.batch_size`` samples;
3. ``map(CaptionerActor)`` on an actor pool (``caption.num_actors`` actors, each with
   ``num_gpus_per_actor``/``num_cpus_per_actor``): k captions per image, seeded per (seed, shard, chunk) so
   a rerun reproduces a shard exactly whatever actor or order captions it;
4. optionally ``map(TeacherActor)``: the teacher's image and text embeddings per sample (``npz``);
5. the driver collects the chunk rows, and when a shard's chunks are all in, writes the output shard with
   :class:`~siclip.data.shards.AtomicShardWriter` and rewrites ``manifest.json``.

Why chunk rows rather than one row per sample or per shard: a row per sample loses the shard grouping (Ray
Data splits and merges blocks freely; regrouping needs an all-to-all shuffle that is not streaming), and a
row per shard makes one captioning call take as long as a whole shard, which trips Ray Data's
no-progress timeout (``ray.data_timeout_s``) and starves the actor pool of parallelism. Chunk rows keep
each shard's grouping by name, stream, and let several actors share one shard. Writing happens in the
driver because only there do all of a shard's chunks meet without a shuffle; its cost (tar writes) is
small next to captioning.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from siclip.config import ConfigError, SiclipCfg, expand_shards, from_dict, is_uri, to_dict
from siclip.data.shards import (
    IMAGE_EXTENSIONS,
    AtomicShardWriter,
    Manifest,
    ManifestError,
    TruncatedMemberError,
    finished,
    iter_tar_members,
    read_manifest,
    write_manifest,
)

__all__ = [
    "SKIP_REASONS",
    "CaptionerActor",
    "PreparedShard",
    "TeacherActor",
    "prepare_shard",
    "read_tar_groups",
    "resize_image",
    "run_pipeline",
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
    "missing_caption",
    "undecodable_text",
    "empty_caption",
    "bad_json",
)
"""Why a sample is skipped. ``unreadable_tar`` counts once per tar that cannot be read to its end: the
samples it still held cannot be counted, so they stand as one skipped entry (samples read before the
error are kept)."""

# Caption settings that change what is written: a rerun into a folder made with other values would mix
# two datasets, so it is refused.
_OUTPUT_KEYS = ("model", "source", "num_captions", "method", "top_p", "max_length", "image_size", "seed")
_JPEG_QUALITY = 95
_PREPARE_MEMORY = 256 * 1024 * 1024


# ------------------------------------------------------------------------------------------ reading
def read_tar_groups(url: str) -> tuple[list[tuple[str, dict[str, bytes]]], bool, int]:
    """Group a tar's members into samples by key, like webdataset; never raises on a bad tar.

    Returns ``(groups, readable, duplicates)``: ``groups`` in file order (a key seen again later in the
    file, or an extension repeated within one key, makes a group marked with the ``"__duplicate__"``
    member), ``readable`` False when the tar could not be read to its end (the group being read then is
    dropped), ``duplicates`` the number of groups marked.
    """
    groups: list[tuple[str, dict[str, bytes]]] = []
    seen: set[str] = set()
    duplicates = 0
    current_key: str | None = None
    current: dict[str, bytes] = {}

    def flush() -> None:
        nonlocal duplicates
        if current_key is None:
            return
        if current_key in seen:
            current["__duplicate__"] = b""
        if "__duplicate__" in current:
            duplicates += 1
        seen.add(current_key)
        groups.append((current_key, current))

    try:
        for key, ext, data in iter_tar_members(url):
            if key != current_key:
                flush()
                current_key, current = key, {}
            if ext.lower() in current:
                current["__duplicate__"] = b""
            current[ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as exc:
        if isinstance(exc, TruncatedMemberError) and exc.key != current_key:
            flush()  # the damage starts a new sample: the one before it is complete
        log.warning("%s: unreadable tar (%s); kept %d samples read before the error", url, exc, len(groups))
        return groups, False, duplicates
    flush()
    return groups, True, duplicates


# ----------------------------------------------------------------------------------------- validating
def validate_sample(members: dict[str, bytes]) -> tuple[str | None, Any, str, dict[str, Any]]:
    """Check one raw sample; returns ``(reason, image, caption, meta)`` with ``reason`` None if usable.

    Cheap checks run first; the image is decoded last (fully, so truncation shows). ``image`` is an RGB
    PIL image when usable.
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
        caption = members["txt"].decode("utf-8").strip()
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
    try:
        opened = Image.open(io.BytesIO(data))
    except Exception:  # PIL raises several types for bytes that are no image at all
        return "not_image", None, "", {}
    try:
        opened.load()
        image = opened.convert("RGB")
    except Exception:  # truncated data, bad Huffman tables, decompression bombs: the image is unusable
        return "truncated_image", None, "", {}
    return None, image, caption, meta


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


def prepare_shard(url: str, *, image_size: int, center_crop: bool = False) -> PreparedShard:
    """Read, validate, resize and re-encode one shard; never raises for bad data (it is counted)."""
    groups, readable, _ = read_tar_groups(url)
    out = PreparedShard()
    skipped: Counter[str] = Counter()
    for key, members in groups:
        reason, image, caption, meta = validate_sample(members)
        if reason is not None:
            skipped[reason] += 1
            continue
        out.keys.append(key)
        out.jpgs.append(_encode_jpeg(resize_image(image, image_size, center_crop=center_crop)))
        out.txts.append(caption)
        out.metas.append(json.dumps(meta, sort_keys=True))
    out.samples_in = len(groups)
    if not readable:
        skipped["unreadable_tar"] += 1
        out.samples_in += 1
    out.skipped = dict(skipped)
    return out


def _prepare_rows(
    row: dict[str, Any], *, image_size: int, center_crop: bool, chunk: int
) -> list[dict[str, Any]]:
    """Ray Data ``flat_map``: one shard path -> its chunk rows (always at least one, even if empty)."""
    prepared = prepare_shard(row["url"], image_size=image_size, center_crop=center_crop)
    n = len(prepared.keys)
    starts = list(range(0, n, chunk)) or [0]
    stats = json.dumps({"samples_in": prepared.samples_in, "skipped": prepared.skipped})
    return [
        {
            "shard": row["name"],
            "chunk": i,
            "n_chunks": len(starts),
            "stats": stats,
            "keys": prepared.keys[s : s + chunk],
            "jpg": prepared.jpgs[s : s + chunk],
            "txt": prepared.txts[s : s + chunk],
            "json": prepared.metas[s : s + chunk],
        }
        for i, s in enumerate(starts)
    ]


def _chunk_seed(seed: int, shard: str, chunk: int) -> int:
    # crc32, not hash(): Python salts str hashes per process, and every actor is its own process.
    return zlib.crc32(f"{seed}:{shard}:{chunk}".encode()) & 0x7FFFFFFF


def _decode_images(jpgs: list[bytes]) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in jpgs]


# ------------------------------------------------------------------------------------------- actors
class CaptionerActor:
    """Ray Data callable class: adds ``syn`` (a ``{"syn_text": [...]}`` JSON string per sample) to a chunk."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        import torch

        from siclip.data.captioner import Captioner

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.cfg = from_dict(cfg)
        c = self.cfg.caption
        self.captioner = Captioner(
            c.model,
            c.source,
            num_captions=c.num_captions,
            method=c.method,
            top_p=c.top_p,
            max_length=c.max_length,
            batch_size=c.batch_size,
            seed=c.seed,
        )

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        images = _decode_images(list(row["jpg"]))
        seed = _chunk_seed(self.cfg.caption.seed, row["shard"], row["chunk"])
        captions = self.captioner.caption(images, seed=seed)
        row["syn"] = [json.dumps({"syn_text": caps}) for caps in captions]
        return row


class TeacherActor:
    """Ray Data callable class: adds ``npz`` = ``{"image_emb": [D], "text_emb": [1 + k, D]}`` (float16).

    The text embeddings are of the real caption then the k synthetic ones, MobileCLIP's reinforced layout.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        import torch

        self.cfg = from_dict(cfg)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(self.cfg.caption.seed)  # a teacher without weights is then the same in every actor
        self.model, self.transform, self.tokenizer = _build_teacher_parts(self.cfg)
        self.model.to(self.device).eval().requires_grad_(False)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch
        import torch.nn.functional as F

        n = len(row["keys"])
        if n == 0:
            row["npz"] = []
            return row
        images = _decode_images(list(row["jpg"]))
        texts = [[txt, *json.loads(syn)["syn_text"]] for txt, syn in zip(row["txt"], row["syn"], strict=True)]
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
        row["npz"] = out
        return row


def _check_teacher_available() -> None:
    """Fail in the driver, before Ray starts actors, when the models package lacks the teacher builder."""
    try:
        from siclip.models.inherit import build_teacher  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"caption.teacher_embeddings=true needs siclip.models.inherit.build_teacher ({exc})"
        ) from exc


def _build_teacher_parts(cfg: SiclipCfg) -> tuple[Any, Any, Any]:
    """The frozen teacher, its own eval transform and tokenizer (a siclip preset's, else open_clip's)."""
    from siclip.models.inherit import build_teacher
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
    """Fail before starting when the actor pool can never be scheduled (Ray Data would wait silently)."""
    import ray

    c = cfg.caption
    res = ray.cluster_resources()
    gpus, cpus = float(res.get("GPU", 0.0)), float(res.get("CPU", 0.0))
    if c.num_gpus_per_actor > 0 and gpus < c.num_gpus_per_actor:
        raise RuntimeError(
            f"caption.num_gpus_per_actor={c.num_gpus_per_actor:g} but the Ray cluster has {gpus:g} GPUs; "
            "the captioner actors could never start. Set caption.num_gpus_per_actor=0 to caption on CPUs, "
            "or connect to a cluster with GPUs (ray.address / RAY_ADDRESS)."
        )
    need = c.num_cpus_per_actor * (2 if c.teacher_embeddings else 1)
    if need + prepare_cpus > cpus + 1e-9:
        raise RuntimeError(
            f"caption.num_cpus_per_actor={c.num_cpus_per_actor:g} leaves no CPU for reading shards: the "
            f"cluster has {cpus:g} CPUs, one captioner (and teacher) actor needs {need:g} and a read task "
            f"{prepare_cpus:g}. Lower caption.num_cpus_per_actor."
        )


def _output_name(url: str) -> str:
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


def _join(out_dir: str, name: str) -> str:
    return out_dir.rstrip("/") + "/" + name


def _load_previous(out_dir: str, cfg: SiclipCfg) -> dict[str, dict[str, Any]]:
    """Per-shard records of an earlier run into the same folder (refusing one made differently)."""
    try:
        previous = read_manifest(out_dir)
    except ManifestError:
        return {}
    before = previous.config.get("caption", {})
    now = to_dict(cfg.caption)
    changed = [k for k in (*_OUTPUT_KEYS, "teacher_embeddings") if k in before and before[k] != now[k]]
    if changed:
        key = changed[0]
        raise ConfigError(
            f"caption.{key}: got {now[key]!r} but {out_dir} was built with {before[key]!r}; "
            "use a new caption.output_dir (or delete the old one) rather than mixing two datasets"
        )
    return {s["name"]: s for s in previous.shards}


def _build_manifest(
    cfg: SiclipCfg, order: list[str], records: dict[str, dict[str, Any]], producer: dict[str, Any]
) -> Manifest:
    shards = [records[n] for n in order if n in records]
    skipped: Counter[str] = Counter()
    for s in shards:
        skipped.update(s.get("skipped", {}))
    config = {"caption": to_dict(cfg.caption)}
    if cfg.caption.teacher_embeddings:
        config["teacher"] = to_dict(cfg.teacher)
    return Manifest(
        kind="cc12m-syn",
        shards=shards,
        samples_in=sum(int(s.get("samples_in", s["samples"])) for s in shards),
        samples_out=sum(int(s["samples"]) for s in shards),
        samples_skipped=sum(skipped.values()),
        skipped=dict(sorted(skipped.items())),
        producer=producer,
        config=config,
    )


def _write_shard(path: str, chunks: list[dict[str, Any]], *, with_npz: bool) -> int:
    count = 0
    with AtomicShardWriter(path) as writer:
        for row in chunks:
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
                count += 1
    return count


def run_pipeline(
    cfg: SiclipCfg, *, progress: bool = True, center_crop: bool = False, chunk_size: int = 0
) -> Manifest:
    """Caption ``caption.input_shards`` into ``caption.output_dir``; returns the written manifest.

    Finished output shards (present under their final name and listed in the manifest) are not redone;
    a half-written ``.tmp`` from a killed run is overwritten. ``chunk_size`` (default
    ``caption.batch_size``) is how many samples one captioning call receives. Raises ConfigError when no
    input matches, RuntimeError when the actors could never be scheduled, and Ray Data's
    ``ExecutionTimeoutError`` after ``ray.data_timeout_s`` seconds without progress.
    """
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    started = time.perf_counter()
    c = cfg.caption
    inputs = _resolve_inputs(cfg)
    out_dir = c.output_dir
    if not is_uri(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    records = _load_previous(out_dir, cfg)
    order = [name for _, name in inputs]
    # A shard on disk but not in the manifest was renamed just before a kill; redo it (same bytes).
    pending = [(u, n) for u, n in inputs if not (n in records and finished(_join(out_dir, n)))]
    records = {n: r for n, r in records.items() if n in order and finished(_join(out_dir, n))}
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
    if not pending:
        manifest = _build_manifest(cfg, order, records, producer)
        write_manifest(out_dir, manifest)
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
    _check_resources(cfg, prepare_cpus)
    if c.teacher_embeddings:
        _check_teacher_available()
    cfg_dict = to_dict(cfg)
    chunk = chunk_size or c.batch_size

    ds = ray.data.from_items(
        [{"url": u, "name": n} for u, n in pending], override_num_blocks=len(pending)
    ).flat_map(
        _prepare_rows,  # type: ignore[arg-type]
        fn_kwargs={"image_size": c.image_size, "center_crop": center_crop, "chunk": chunk},
        num_cpus=prepare_cpus,
        # A read task holds one shard in memory; the reservation also keeps Ray Data from fusing the read
        # tasks into the captioner actors, which would serialise decoding with captioning.
        memory=_PREPARE_MEMORY,
    )
    ds = ds.map(
        CaptionerActor,  # type: ignore[arg-type]
        fn_constructor_kwargs={"cfg": cfg_dict},
        compute=ActorPoolStrategy(size=c.num_actors),
        num_gpus=c.num_gpus_per_actor,
        num_cpus=c.num_cpus_per_actor,
    )
    if c.teacher_embeddings:
        ds = ds.map(
            TeacherActor,  # type: ignore[arg-type]
            fn_constructor_kwargs={"cfg": cfg_dict},
            compute=ActorPoolStrategy(size=c.num_actors),
            num_gpus=c.num_gpus_per_actor,
            num_cpus=c.num_cpus_per_actor,
        )

    # This dataset's own context: the process-wide one (and later datasets, e.g. training's) stay as they are.
    ds.context.execution_no_progress_timeout_s = float(cfg.ray.data_timeout_s)
    ds.context.enable_progress_bars = progress

    buffers: dict[str, dict[int, dict[str, Any]]] = {}
    written = 0
    for row in ds.iter_rows():
        name = row["shard"]
        parts = buffers.setdefault(name, {})
        parts[int(row["chunk"])] = row
        if len(parts) < int(row["n_chunks"]):
            continue
        chunks = [parts[i] for i in sorted(parts)]
        del buffers[name]
        samples = _write_shard(_join(out_dir, name), chunks, with_npz=c.teacher_embeddings)
        written += samples
        stats = json.loads(chunks[0]["stats"])
        records[name] = {
            "name": name,
            "samples": samples,
            "samples_in": int(stats["samples_in"]),
            "skipped": dict(sorted(stats["skipped"].items())),
        }
        # Rewritten after every shard, so a killed run still knows what it finished.
        write_manifest(out_dir, _build_manifest(cfg, order, records, producer))
    if buffers:
        raise RuntimeError(f"incomplete shards after the pipeline ended: {sorted(buffers)}")
    manifest = _build_manifest(cfg, order, records, producer)
    write_manifest(out_dir, manifest)
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
