"""``siclip data build``: CC12M (img2dataset shards) -> CC12M-SYN with Ray Data.

This module owns the Ray side of the data stage: :func:`run_pipeline` (the driver), the captioner and
teacher actors, and the checks that the cluster can run them. What needs no Ray lives beside it: one shard's
reading, validation and resizing in ``siclip/data/prepare.py``, writing shards, the manifest and resuming in
``siclip/data/commit.py``.

Design (one input shard -> one output shard with the same base name, so a rerun skips finished shards):

0. before any captioning: the earlier build's manifest is read (only a missing one means "nothing built";
   a rerun that would change an output byte is refused), the output is probed with a write and delete
   from the driver and from a Ray worker, a node-local output is refused on a multi-node or autoscaling
   cluster, and GPU workers at zero are requested from the autoscaler and waited for;
1. a dataset of the pending shard paths, one row each;
2. ``map(prepare_row)`` in CPU tasks, one per shard (memory reserved from the largest shard): read the tar
   to its end, validate every sample (unusable ones are skipped and counted by reason), resize (shorter side
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
   :func:`~siclip.data.commit.commit_shard`), and returns only its manifest entry; the driver
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
import os
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from siclip import ray_compat
from siclip.config import ConfigError, SiclipCfg, from_dict, is_uri, to_dict
from siclip.data.commit import (
    ShardBuildError,
    build_manifest,
    check_output_writable,
    commit_shard,
    is_intact,
    load_previous,
    probe_output,
    resolve_inputs,
    try_write_manifest,
    unfinished_error,
)
from siclip.data.prepare import JPEG_QUALITY, prepare_row, read_task_memory
from siclip.data.shards import Manifest, ShardIOError, list_sizes

__all__ = ["CaptionerActor", "ShardBuildError", "TeacherActor", "check_resources", "run_pipeline"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- actors
def _sample_seed(seed: int, shard: str, key: str) -> int:
    """The caption seed of one sample: its captions depend on it and the image only, never on the batch."""
    # crc32, not hash(): Python salts str hashes per process, and every actor is its own process.
    return zlib.crc32(f"{seed}:{shard}:{key}".encode()) & 0x7FFFFFFF


def _decode_images(jpgs: list[bytes]) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in jpgs]


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
        return commit_shard(
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
        return commit_shard(
            self.out_dir, row, with_npz=True, max_retries=c.max_retries, retry_delay_s=c.retry_delay_s
        )


def _check_teacher(cfg: SiclipCfg) -> None:
    """Fail in the driver, before Ray starts actors, when the teacher cannot give meaningful embeddings."""
    if not cfg.teacher.source:
        raise ConfigError(
            f"teacher.source: got ''; caption.teacher_embeddings=true needs {cfg.teacher.name!r}'s trained "
            "weights (a .pt/.safetensors file, local-dir:PATH or an open_clip pretrained tag), not random ones"
        )


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
def check_resources(cfg: SiclipCfg, prepare_cpus: float) -> None:
    """Fail before starting when the actor pools can never be scheduled (Ray Data would wait silently).

    Needs a connected Ray session; ``prepare_cpus`` is what one read task reserves. :func:`run_pipeline`
    calls it before any captioning.

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
    most = ray_compat.autoscaler().most  # unknown (None): the autoscaler may grow the pools, no warning
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
    scaler = ray_compat.autoscaler()  # read as train.use_gpu: auto reads it
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


def _check_cluster_storage(out_dir: str) -> None:
    """On a cluster of several nodes, or one an autoscaler can grow, the output must be shared storage.

    The actors write shards on whatever node they run; the manifest and a rerun's checks see the driver's.
    """
    import ray

    from siclip.preflight import check_shared_folder

    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    can_grow = ray_compat.autoscaler().present
    check_shared_folder("caption.output_dir", out_dir, nodes=nodes, can_add_nodes=can_grow)


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
    inputs = resolve_inputs(cfg)
    if c.teacher_embeddings:
        _check_teacher(cfg)
    out_dir = c.output_dir
    check_output_writable(out_dir, probe_output(out_dir), "this driver")
    # What else decides an output byte: the crop, and which inputs (the rerun guard compares both).
    build = {
        "center_crop": center_crop,
        "inputs": [u if is_uri(u) else os.path.abspath(u) for u, _ in inputs],
    }
    records = load_previous(out_dir, cfg, build)
    order = [name for _, name in inputs]
    # A shard on disk but not in the manifest was written just before a kill; redo it (same bytes). One
    # listing gives every file's size: a recorded shard whose size differs is not the file that was built.
    sizes = list_sizes(out_dir)
    done = {n for n in order if n in records and is_intact(records[n], sizes, out_dir)}
    pending = [(u, n) for u, n in inputs if n not in done]
    records = {n: r for n, r in records.items() if n in done}
    producer = {
        "captioner": f"{c.model}:{c.source}" if c.source else c.model,
        "model": c.model,
        "source": c.source,
        "center_crop": center_crop,
        "jpeg_quality": JPEG_QUALITY,
        "teacher": f"{cfg.teacher.name}:{cfg.teacher.source}" if c.teacher_embeddings else "",
        "tool": "siclip.data.pipeline",
    }
    done_before = len(inputs) - len(pending)
    attempts = c.max_retries + 1
    if not pending:
        manifest = build_manifest(cfg, order, records, producer, build)
        if not try_write_manifest(out_dir, manifest, attempts=attempts, delay_s=c.retry_delay_s):
            raise unfinished_error(out_dir, [], order)
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
    check_resources(cfg, prepare_cpus)
    cfg_dict = to_dict(cfg)
    chunk = chunk_size or c.batch_size
    # Tasks and actors get ray.env_vars (e.g. AWS_ENDPOINT_URL for an S3-compatible store).
    env_vars = {str(k): str(v) for k, v in cfg.ray.env_vars.items()}  # YAML may give numbers; Ray wants str
    env: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
    # The actors write the shards: check a worker can, before any GPU time is spent.
    probe = ray.remote(num_cpus=0, max_retries=0, **env)(probe_output)
    check_output_writable(
        out_dir, ray.get(probe.remote(out_dir), timeout=float(cfg.ray.data_timeout_s)), "a Ray worker"
    )

    ds = ray.data.from_items(
        [{"url": u, "name": n} for u, n in pending], override_num_blocks=len(pending)
    ).map(
        prepare_row,  # type: ignore[arg-type]
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
        if try_write_manifest(
            out_dir, build_manifest(cfg, order, records, producer, build), attempts=1, delay_s=0
        ):
            unrecorded = []
            if on_shard is not None:
                on_shard(entry)
        else:
            unrecorded.append(name)
    manifest = build_manifest(cfg, order, records, producer, build)
    recorded = unrecorded == [] or try_write_manifest(
        out_dir, manifest, attempts=attempts, delay_s=c.retry_delay_s
    )
    failed = [n for _, n in pending if n not in records]
    if failed or not recorded:
        raise unfinished_error(out_dir, failed, [] if recorded else unrecorded)
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
