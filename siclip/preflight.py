"""Before a cluster run does any work: every path it names must be one the cluster can see.

A job submitted with ``ray job submit --working-dir .`` runs in Ray's *uploaded copy* of the working dir:
git-ignored files and the runtime env's ``excludes`` (``*.pt``, ``runs/``, ...) are not in it, and what the
job writes there is lost when the job ends and never seen by the other nodes. Absolute paths are checked
on the node running the job's driver (the head), and on a cluster of several nodes the run folder must be
shared storage. Each rule fails with one line naming the key, the path, and what to set instead. No Ray
here: callers pass in what they know about the job and the cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

from siclip.config import ConfigError, SiclipCfg, expand_shards, is_uri, is_weights_file, walk_fields

__all__ = [
    "LOCAL_FS_TYPES",
    "check_job_paths",
    "check_shared_folder",
    "check_shared_run_folder",
    "filesystem_type",
]

OUTPUT_KEYS = ("train.runs_dir", "caption.output_dir")
"""Folders a run writes: relative ones would land in the job's temporary copy of the working dir."""

LOCAL_FS_TYPES = ("ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "vfat", "overlay", "tmpfs", "ramfs")
"""Filesystem types (``/proc/mounts``) that live on one machine; anything else (nfs, cifs, lustre, ceph,
fuse.*, ...) is taken to be storage other nodes can mount too."""

_SHARED_HINT = "a path every node mounts (e.g. /data/... on KubeRay, /mnt/efs/... on AWS) or s3://BUCKET/..."


def _local_paths(cfg: SiclipCfg, sections: tuple[str, ...] | None) -> list[tuple[str, str]]:
    """(key, value) of every configured local path (inputs and outputs), shard patterns one by one."""
    found = []
    for key, value, f in walk_fields(cfg):
        if sections and key.split(".")[0] not in sections:
            continue
        kind = f.metadata.get("path")
        values = value if kind == "shards" else [value]
        is_path = kind in ("file", "dir", "shards") or key in OUTPUT_KEYS
        if kind == "source":
            is_path = is_weights_file(str(value))
        for v in values if is_path else []:
            if v and not is_uri(str(v)):
                found.append((key, str(v)))
    return found


def check_job_paths(
    cfg: SiclipCfg,
    *,
    job_working_dir: str | None,
    sections: tuple[str, ...] | None = None,
    cwd: str | None = None,
) -> None:
    """Inside a submitted job with an uploaded working dir: refuse paths the cluster cannot see.

    Relative outputs always fail (the upload is temporary and per node); relative inputs fail when the
    upload lacks them (git-ignored or excluded); absolute inputs fail when the head does not see them.
    Outside a job (``job_working_dir`` None) nothing is checked here. ``sections`` limits the check to the
    stages a command uses (``train`` writes ``train.runs_dir``, ``data build`` ``caption.output_dir``).
    """
    if not job_working_dir:
        return
    base = Path(cwd or os.getcwd())
    for key, value in _local_paths(cfg, sections):
        relative = not os.path.isabs(value)
        if key in OUTPUT_KEYS:
            if relative:
                raise ConfigError(
                    f"{key}: got {value!r}, a folder inside this job's temporary copy of the working dir "
                    f"(lost when the job ends, unseen by other nodes); allowed: {_SHARED_HINT}"
                )
            continue
        full = base / value
        found = expand_shards([str(full)]) if any(c in value for c in "*?[{") else [str(full)]
        if found and all(os.path.exists(u) for u in found):
            continue
        if relative:
            raise ConfigError(
                f"{key}: got {value!r}, not in the job's upload of the working dir (git-ignored files and "
                f"cluster/runtime_env.yaml excludes such as *.pt, *.tar, runs/ are not uploaded); allowed: "
                f"{_SHARED_HINT}"
            )
        raise ConfigError(
            f"{key}: got {value!r}; not there on the node running the job's driver, and every node must see "
            f"the same path; allowed: {_SHARED_HINT}"
        )


def filesystem_type(path: str, mounts: str | None = None) -> str:
    """The filesystem type of the mount holding ``path`` (longest ``/proc/mounts`` prefix; "" if unknown)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    best, kind = "", ""
    target = os.path.abspath(path)
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, parts[2]
    return kind


def check_shared_run_folder(
    cfg: SiclipCfg, *, nodes: int, can_add_nodes: bool, mounts: str | None = None
) -> None:
    """On a cluster of several nodes (or one that can grow), ``train.runs_dir`` must be shared storage.

    A URI always is. A path on a machine-local filesystem (ext4, xfs, overlay, tmpfs, ...) is refused: Ray
    Train's workers on other nodes write checkpoints there, and a resume after a node loss reads them.
    """
    check_shared_folder(
        "train.runs_dir", cfg.train.runs_dir, nodes=nodes, can_add_nodes=can_add_nodes, mounts=mounts
    )


def check_shared_folder(
    key: str, folder: str, *, nodes: int, can_add_nodes: bool, mounts: str | None = None
) -> None:
    """On a cluster of several nodes (or one that can grow), the folder ``key`` names must be shared storage.

    A URI always is; a path on a machine-local filesystem (``LOCAL_FS_TYPES``) is refused with one line: what
    workers on other nodes write there is not where the driver (and a rerun) looks.
    """
    if is_uri(folder) or (nodes <= 1 and not can_add_nodes):
        return
    kind = filesystem_type(folder, mounts)
    if kind not in LOCAL_FS_TYPES:
        return
    raise ConfigError(
        f"{key}: got {folder!r}, on a node-local {kind} disk of a cluster with "
        f"{nodes} node(s){' that can grow' if can_add_nodes else ''}; allowed: {_SHARED_HINT}"
    )
