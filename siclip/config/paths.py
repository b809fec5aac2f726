"""The paths a config names: what is a URI, shard patterns expanded, local paths made absolute and checked.

Each path field says what it holds in its ``metadata["path"]`` (:mod:`siclip.config.schema`): ``file``,
``dir``, ``shards`` (paths, brace patterns, globs or URIs), ``source`` (an open_clip tag, a weights file or
``local-dir:PATH``) or ``root`` (a dataset root, made absolute but never checked: a missing one is reported
absent). URIs are never checked here; :func:`check_paths` is the one step of loading a config that looks at
the file system (:func:`~siclip.config.loading.load_config` runs it).
"""

from __future__ import annotations

import dataclasses
import glob
import os
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from siclip.config.schema import ConfigError, SiclipCfg, walk_fields
from siclip.storage import is_remote

__all__ = ["TRAIN_SECTIONS", "absolutize", "check_paths", "expand_shards", "is_uri", "is_weights_file"]


def is_uri(path: str) -> bool:
    """Not a path on this machine: a storage URI (:func:`siclip.storage.is_remote`), a WebDataset ``pipe:``
    or an open_clip ``local-dir:`` source."""
    return is_remote(path) or path.startswith(("pipe:", "local-dir:"))


def expand_shards(patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Expand brace patterns and globs into a sorted-within-pattern list of shard URLs.

    Local globs use the local filesystem; a URI glob (``s3://bucket/cc12m/*.tar``, ``gs://...``, any fsspec
    filesystem) is listed through fsspec. ``pipe:`` commands and ``local-dir:`` sources are never globbed.
    """
    urls: list[str] = []
    for pattern in patterns:
        for item in braceexpand(pattern):
            if not any(c in item for c in "*?[") or item.startswith(("pipe:", "local-dir:")):
                urls.append(item)
            elif is_uri(item):
                urls.extend(_glob_uri(item))
            else:
                urls.extend(sorted(glob.glob(item)))
    return urls


def _glob_uri(pattern: str) -> list[str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(pattern)
    fs.invalidate_cache()  # the shards may have been written since this process last listed
    found = fs.glob(path, detail=True)  # one listing, with each entry's type: no request per object
    return sorted(fs.unstrip_protocol(p) for p, info in found.items() if info.get("type") == "file")


def is_weights_file(value: str) -> bool:
    """A local weights file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``), as a ``source`` key may name,
    rather than an open_clip tag or a URI."""
    return value.endswith((".pt", ".pth", ".bin", ".safetensors")) and not is_uri(value)


def _is_local_path_field(f: dataclasses.Field[Any], value: Any) -> bool:
    kind = f.metadata.get("path")
    if kind == "source":
        return is_weights_file(value)
    return kind in ("file", "dir", "root") or f.name in ("runs_dir", "output_dir")


def absolutize(cfg: SiclipCfg, base: str | os.PathLike[str] | None = None) -> SiclipCfg:
    """Make every local path absolute (Ray workers may run in another working directory)."""
    root = Path(base or Path.cwd())

    def fix(value: str) -> str:
        if not value or is_uri(value) or os.path.isabs(value):
            return value
        return str(root / value)

    def walk(node: Any) -> Any:
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                changes[f.name] = walk(value)
            elif f.metadata.get("path") == "shards":
                changes[f.name] = tuple(fix(v) for v in value)
            elif _is_local_path_field(f, value):
                changes[f.name] = fix(value)
        return dataclasses.replace(node, **changes)

    result: SiclipCfg = walk(cfg)
    return result


def _check_source(key: str, value: str, base: Path) -> None:
    if value.startswith("local-dir:"):
        local = Path(value[len("local-dir:") :])
        if not local.is_dir():
            raise ConfigError(f"{key}: got {value!r}; no such directory {str(local)!r}")
        return
    if is_weights_file(value) and not (base / value).is_file() and not Path(value).is_file():
        raise ConfigError(f"{key}: got {value!r}; no such checkpoint file")


TRAIN_SECTIONS = ("data", "model", "teacher", "eval")
"""The sections whose paths a training run reads (``siclip train``, the demo's and the ablation's stages)."""


def check_paths(cfg: SiclipCfg, *, sections: tuple[str, ...] | None = None) -> None:
    """Check that every configured local file, directory and shard pattern exists.

    ``sections`` limits the check to the stages a command uses (e.g. ``("data", "model")``).
    URIs (``s3://``, ``gs://``, ``pipe:``) are not checked.
    """
    base = Path.cwd()
    for key, value, f in walk_fields(cfg):
        kind = f.metadata.get("path")
        if not kind or not value or (sections and key.split(".")[0] not in sections):
            continue
        if kind == "shards":
            for pattern in value:
                if is_uri(pattern):
                    continue
                found = expand_shards([pattern])
                missing = [u for u in found if not os.path.isfile(u)]
                if not found or missing:
                    bad = missing[0] if missing else pattern
                    raise ConfigError(f"{key}: got {pattern!r}; no such shard file {bad!r}")
        elif kind == "source":
            _check_source(key, value, base)
        elif is_uri(value):
            continue
        elif kind == "file" and not os.path.isfile(value):
            raise ConfigError(f"{key}: got {value!r}; no such file")
        elif kind == "dir" and not os.path.isdir(value):
            raise ConfigError(f"{key}: got {value!r}; no such directory")
