"""The data build's output folder, without Ray: committing shards, the manifest, resuming an earlier build.

This module owns what ``siclip data build`` (``siclip/data/pipeline.py``) decides about its output:
:func:`resolve_inputs` (each input shard and the output shard it becomes), :func:`write_shard` /
:func:`commit_shard` (one captioned shard written atomically, retried, and its manifest entry),
:func:`probe_output` (can this process write there), :func:`load_previous` and :func:`is_intact` (what an
earlier build into the same folder finished, refusing a folder built with other settings),
:func:`build_manifest` / :func:`try_write_manifest` (the folder's record, its totals checked) and the
:class:`ShardBuildError` naming what is left unfinished.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from typing import Any

from siclip.config import ConfigError, SiclipCfg, expand_shards, is_uri, to_dict
from siclip.data.shards import (
    AtomicShardWriter,
    Manifest,
    ManifestError,
    ManifestNotFoundError,
    read_manifest,
    write_manifest,
)

__all__ = [
    "ShardBuildError",
    "build_manifest",
    "check_output_writable",
    "commit_shard",
    "is_intact",
    "load_previous",
    "output_name",
    "probe_output",
    "resolve_inputs",
    "shard_path",
    "try_write_manifest",
    "unfinished_error",
    "write_shard",
]

log = logging.getLogger(__name__)

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
_NEW_FOLDER = "use a new caption.output_dir (or delete the old one) rather than mixing two datasets"
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class ShardBuildError(RuntimeError):
    """The build could not finish: some shards could not be built or recorded (the message names them; rerun
    to finish), or the output folder's manifest exists but cannot be read (the message names it)."""


# ------------------------------------------------------------------------------------------- inputs
def output_name(url: str) -> str:
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


def resolve_inputs(cfg: SiclipCfg) -> list[tuple[str, str]]:
    """``(input url, output shard name)`` for every shard ``caption.input_shards`` matches, in order.

    Raises ConfigError when nothing matches, a local input is missing, or two inputs would give one name.
    """
    patterns = cfg.caption.input_shards
    urls = expand_shards(patterns)
    if not urls:
        raise ConfigError(f"caption.input_shards: got {list(patterns)!r}; no input shards matched")
    missing = [u for u in urls if not is_uri(u) and not os.path.isfile(u)]
    if missing:
        raise ConfigError(f"caption.input_shards: no such shard file {missing[0]!r} ({len(missing)} missing)")
    names = [output_name(u) for u in urls]
    dupes = sorted(n for n, k in Counter(names).items() if k > 1)
    if dupes:
        raise ConfigError(
            f"caption.input_shards: two inputs share the shard name {dupes[0]!r}; output shards keep the "
            "input's base name, so names must be unique"
        )
    return list(zip(urls, names, strict=True))


# ------------------------------------------------------------------------------------------- output
def shard_path(out_dir: str, name: str) -> str:
    """The path of shard ``name`` in ``out_dir`` (a local folder or a URI, with or without a final slash)."""
    return out_dir.rstrip("/") + "/" + name


def probe_output(out_dir: str) -> str:
    """Write a small file into ``out_dir`` and delete it; returns "" or what failed (one line)."""
    import uuid

    path = shard_path(out_dir, f".siclip-write-probe-{uuid.uuid4().hex}")
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


def check_output_writable(out_dir: str, error: str, where: str) -> None:
    """Raise ConfigError naming ``out_dir`` and ``where`` when :func:`probe_output` there gave ``error``."""
    if error:
        raise ConfigError(
            f"caption.output_dir: got {out_dir!r}; cannot write there from {where} ({error}); nothing was "
            "captioned: allowed: a folder or bucket every node can write (check the path, its permissions "
            "and the credentials, e.g. ray.env_vars)"
        )


# ------------------------------------------------------------------- an earlier build, the manifest
def load_previous(
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


def is_intact(record: dict[str, Any], sizes: dict[str, int], out_dir: str) -> bool:
    """A recorded shard is finished when its file is there with the size recorded (when one was)."""
    name = record["name"]
    if name not in sizes:
        return False
    want = record.get("bytes")
    if isinstance(want, int) and sizes[name] != want:
        log.warning(
            "%s: %d bytes but the manifest recorded %d; building it again",
            shard_path(out_dir, name),
            sizes[name],
            want,
        )
        return False
    return True


def build_manifest(
    cfg: SiclipCfg,
    order: list[str],
    records: dict[str, dict[str, Any]],
    producer: dict[str, Any],
    build: dict[str, Any] | None = None,
) -> Manifest:
    """The folder's manifest: the records of ``order``'s finished shards (in that order) and their totals.

    Raises RuntimeError when the totals do not add up (in != out + skipped): a bug, never bad data.
    """
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


def try_write_manifest(out_dir: str, manifest: Manifest, *, attempts: int, delay_s: float) -> bool:
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


def unfinished_error(out_dir: str, failed: list[str], unrecorded: list[str]) -> ShardBuildError:
    """The error naming (up to five of each) the shards not built and those built but not recorded."""
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


# ------------------------------------------------------------------------------------------ writing
def write_shard(path: str, row: dict[str, Any], *, with_npz: bool) -> dict[str, Any]:
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


def commit_shard(
    out_dir: str, row: dict[str, Any], *, with_npz: bool, max_retries: int, retry_delay_s: float
) -> dict[str, Any]:
    """Write the shard (retrying failed writes with growing waits).

    Returns the row ``{"name": shard, "entry": JSON, "error": ""}``, or, once the retries are spent,
    ``{"name": shard, "entry": "", "error": what failed}``: the driver counts failed writes to stop a build
    whose output cannot be written. A counts bug (RuntimeError) still raises.
    """
    path = shard_path(out_dir, row["shard"])
    for attempt in range(max_retries + 1):
        try:
            entry = write_shard(path, row, with_npz=with_npz)
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
