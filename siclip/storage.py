"""A run's files wherever ``train.runs_dir`` points: a local or mounted folder, or a URI such as ``s3://``.

Everything a run or a sweep keeps (config.yaml, TensorBoard events, metrics.jsonl, final/, sweep tables,
best_config.yaml) goes through these few functions, so a run on a multi-node cluster keeps nothing on the
disk of whichever node wrote it. URIs go through ``pyarrow.fs``: the same filesystem layer (and so the
same credentials, e.g. ``AWS_*`` variables or an instance profile, and ``AWS_ENDPOINT_URL``) that Ray
Train uses for its checkpoints under the same ``storage_path``. Local paths are plain files, written
atomically (a temporary name, then a rename). No Ray here.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "download",
    "exists",
    "is_dir",
    "is_remote",
    "join",
    "list_dirs",
    "name",
    "parent",
    "read_text",
    "remove_dir",
    "upload",
    "write_text",
]


def is_remote(location: str | os.PathLike[str]) -> bool:
    """A URI (``s3://``, ``gs://``, ...) rather than a path on this machine's filesystem: the one place that
    decides it (``siclip.config.is_uri`` adds WebDataset's ``pipe:`` and open_clip's ``local-dir:`` sources)."""
    return "://" in str(location)


def join(location: str | os.PathLike[str], *parts: str) -> str:
    """``location/part/...`` for paths and URIs alike."""
    text = str(location)
    if is_remote(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return os.path.join(text, *parts)


def parent(location: str | os.PathLike[str]) -> str:
    """The folder holding ``location`` (a path or a URI)."""
    text = str(location)
    if is_remote(text):
        scheme, _, rest = text.rstrip("/").partition("://")
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(text))


def name(location: str | os.PathLike[str]) -> str:
    """The last part of ``location`` (a file's or a folder's name), for paths and URIs alike."""
    text = str(location)
    if is_remote(text):
        return posixpath.basename(text.rstrip("/"))
    return Path(text).name


def _resolve(location: str | os.PathLike[str]) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    text = str(location)
    if not is_remote(text):
        return pafs.LocalFileSystem(), os.path.abspath(text)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError by scheme
        raise ValueError(f"{text}: not a storage URI pyarrow.fs can open ({exc})") from exc
    return fs, path


def exists(location: str | os.PathLike[str]) -> bool:
    import pyarrow.fs as pafs

    fs, path = _resolve(location)
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def is_dir(location: str | os.PathLike[str]) -> bool:
    """A folder (on an object store: a prefix that holds objects)."""
    import pyarrow.fs as pafs

    fs, path = _resolve(location)
    return bool(fs.get_file_info(path).type == pafs.FileType.Directory)


def read_text(location: str | os.PathLike[str]) -> str:
    """The file's text; ``FileNotFoundError`` when there is none."""
    if not is_remote(location):
        return Path(location).read_text()
    fs, path = _resolve(location)
    try:
        with fs.open_input_stream(path) as f:
            return bytes(f.read()).decode()
    except FileNotFoundError:
        raise
    except OSError as exc:
        if not exists(location):
            raise FileNotFoundError(f"{location}: no such file") from exc
        raise


def write_text(location: str | os.PathLike[str], text: str) -> None:
    """Write (replace) a text file; local files appear whole or not at all, as remote objects do."""
    if not is_remote(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        return
    fs, path = _resolve(location)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def upload(local: str | os.PathLike[str], location: str | os.PathLike[str]) -> None:
    """Copy a local file or folder (recursively) to ``location``, replacing files of the same names."""
    import pyarrow.fs as pafs

    if not is_remote(location):
        if Path(local).is_dir():
            shutil.copytree(local, location, dirs_exist_ok=True)
        else:
            Path(location).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, location)
        return
    fs, path = _resolve(location)
    if Path(local).is_dir():
        fs.create_dir(path, recursive=True)
    pafs.copy_files(
        str(Path(local).resolve()), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def download(location: str | os.PathLike[str], local: str | os.PathLike[str]) -> Path:
    """Copy a file or folder at ``location`` to the local path ``local``; returns ``local``."""
    import pyarrow.fs as pafs

    fs, path = _resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{location}: no such file or folder")
    target = Path(local)
    if info.type == pafs.FileType.Directory:
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(
        path, str(target.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )
    return target


def list_dirs(location: str | os.PathLike[str]) -> list[str]:
    """Names of the folders directly in ``location`` ([] when it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = _resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def remove_dir(location: str | os.PathLike[str]) -> None:
    """Delete a folder and everything in it (nothing happens when it is not there)."""
    fs, path = _resolve(location)
    if exists(location):
        fs.delete_dir(path)
