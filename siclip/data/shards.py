"""The shard format every siclip stage shares: WebDataset tars, their ``manifest.json``, safe decoding.

A shard holds one sample per key in img2dataset layout (``jpg``/``png``/``webp``, ``txt``, ``json``);
CC12M-SYN adds ``syn.json`` = ``{"syn_text": [k captions]}`` and optionally ``npz`` with teacher embeddings
(MobileCLIP's reinforced layout: ``image_emb`` [N, D] or [D], ``text_emb`` [1 + k, D]).

This module owns:
- :class:`Manifest` and its JSON file (:func:`write_manifest`, :func:`read_manifest`): what a folder of
  shards holds, how many samples went in, out and were skipped (with reasons), and who made them;
- :class:`AtomicShardWriter`: a shard is written to ``<name>.tmp`` and renamed only on a clean close, so a
  rerun can skip finished shards and no reader ever sees a half-written one;
- :func:`decode_sample` / :func:`iter_samples`: decoding that never unpickles (``.pkl``/``.pyd`` members
  are dropped; ``npz`` loads with ``allow_pickle=False``), safe to run with ``WDS_SECURE=1``;
- :func:`open_url`: local paths, ``pipe:`` and webdataset's own schemes, and any fsspec URI (``s3://``...);
- the line between bad data and failed I/O: :func:`iter_tar_members` raises ``tarfile.TarError`` (or
  ``EOFError``/``zlib.error``) only for damaged content (bytes that are there but are no tar) and
  :class:`ShardIOError` for everything else (a missing object, a refused connection, missing credentials,
  data that ends before the tar's end-of-archive marker or the object's size, streamed or at rest), so
  callers count the first and retry the second; :func:`img2dataset_count` reads how many samples
  img2dataset put in a tar.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from siclip.storage import is_remote

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "AtomicShardWriter",
    "DamagedTarError",
    "Manifest",
    "ManifestError",
    "ManifestNotFoundError",
    "ShardIOError",
    "decode_sample",
    "encode_sample",
    "finished",
    "image_of",
    "img2dataset_count",
    "iter_raw_samples",
    "iter_samples",
    "iter_tar_members",
    "list_shards",
    "list_sizes",
    "manifest_sample_count",
    "open_url",
    "read_manifest",
    "register_fsspec_schemes",
    "shard_name",
    "write_manifest",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Members whose decoding would run arbitrary code: never read, never written.
_UNSAFE_EXTENSIONS = ("pkl", "pickle", "pyd", "pth", "pt")
# Object stores whose objects appear only once complete: AtomicShardWriter writes their final key directly.
_DIRECT_PUT_PROTOCOLS = {"s3", "s3a"}
# Exceptions that mean the tar's bytes are damaged (anything else while reading is an I/O failure).
_CONTENT_ERRORS = (tarfile.TarError, EOFError, zlib.error)


class ManifestError(ValueError):
    """A manifest file is missing, unreadable or malformed; the message names the file."""


class ManifestNotFoundError(ManifestError):
    """There is no manifest file (the folder holds no finished shards): the one case that means "empty"."""


class ShardIOError(OSError):
    """Reading or writing a shard failed for a reason other than its content (the message names the URL).

    A missing file or object, a refused or dropped connection, missing credentials: trying again later may
    succeed, so the work is retried and, failing that, reported as unfinished, never counted as bad data.
    """


# ------------------------------------------------------------------------------------------ manifest
@dataclass
class Manifest:
    """What a folder of shards holds and how it was made."""

    schema_version: int = SCHEMA_VERSION
    kind: str = ""
    """What the shards are: ``demo-web``, ``demo-clean``, ``demo-retrieval``, ``cc12m-syn``, ..."""
    shards: list[dict[str, Any]] = field(default_factory=list)
    """One ``{"name": file name relative to the folder, "samples": int}`` per finished shard; a builder may
    add more (the data build: ``samples_in``, ``skipped``, ``bytes`` and ``sha256`` of the file)."""
    samples_in: int = 0
    samples_out: int = 0
    samples_skipped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    """Reason -> count for the skipped samples."""
    producer: dict[str, Any] = field(default_factory=dict)
    """Who made the shards: captioner name/tag, siclip version, ..."""
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "manifest") -> Manifest:
        """Build from a dict, checking keys and types; ``source`` names the file in error messages."""
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(
                f"{source}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}"
            )
        if "schema_version" not in data:
            raise ManifestError(f"{source}: missing 'schema_version'")
        version = data["schema_version"]
        if not _is_count(version) or version > SCHEMA_VERSION or version < 1:
            raise ManifestError(
                f"{source}: schema_version {version!r} is not supported (this siclip reads <= {SCHEMA_VERSION})"
            )
        if not isinstance(data.get("kind", ""), str):
            raise ManifestError(f"{source}: 'kind' must be a string, got {data['kind']!r}")
        shards = data.get("shards", [])
        if not isinstance(shards, list):
            raise ManifestError(f"{source}: 'shards' must be a list")
        for i, shard in enumerate(shards):
            if not (
                isinstance(shard, dict)
                and isinstance(shard.get("name"), str)
                and _is_count(shard.get("samples"))
            ):
                raise ManifestError(
                    f"{source}: shards[{i}] must be {{'name': str, 'samples': int >= 0}}, got {shard!r}"
                )
        for key in ("samples_in", "samples_out", "samples_skipped"):
            if not _is_count(data.get(key, 0)):
                raise ManifestError(f"{source}: {key!r} must be an integer >= 0, got {data[key]!r}")
        for key in ("skipped", "producer", "config"):
            if not isinstance(data.get(key, {}), dict):
                raise ManifestError(f"{source}: {key!r} must be a mapping, got {data[key]!r}")
        for reason, count in data.get("skipped", {}).items():
            if not _is_count(count):
                raise ManifestError(f"{source}: skipped[{reason!r}] must be an integer >= 0, got {count!r}")
        return cls(**data)


def _is_count(value: Any) -> bool:
    """A non-negative int; ``True``/``False`` are ints to Python but never a count in a manifest."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _manifest_path(dir_or_file: str | os.PathLike[str]) -> str:
    path = os.fspath(dir_or_file)
    if path.endswith(".json"):
        return path
    return path.rstrip("/") + "/" + MANIFEST_NAME


def write_manifest(out_dir: str | os.PathLike[str], manifest: Manifest) -> str:
    """Write ``out_dir/manifest.json`` atomically (temp file + rename); returns its path."""
    path = _manifest_path(out_dir)
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n"
    if is_remote(path):
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(path)
        with fs.open(fs_path + ".tmp", "w") as f:
            f.write(text)
        fs.mv(fs_path + ".tmp", fs_path)
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))
    return path


def read_manifest(dir_or_file: str | os.PathLike[str]) -> Manifest:
    """Read a folder's ``manifest.json`` (or the given ``.json`` file).

    Raises :class:`ManifestNotFoundError` when there is none, :class:`ManifestError` when it cannot be read
    (permissions, the store failing) or is not a valid manifest (truncated, not JSON, wrong keys).
    """
    path = _manifest_path(dir_or_file)
    try:
        with open_url(path, "rb") as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError as e:
        raise ManifestNotFoundError(f"{path}: cannot read the shard manifest ({e})") from e
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    except Exception as e:  # permissions, an expired token, a store that answers 503: not "no manifest"
        raise ManifestError(f"{path}: cannot read the shard manifest ({type(e).__name__}: {e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from e
    return Manifest.from_dict(data, source=path)


def manifest_sample_count(urls_or_dir: str | os.PathLike[str] | Iterable[str]) -> int | None:
    """Total samples of the given shards per the ``manifest.json`` beside them, or None if unknown.

    Given a folder, the manifest's ``samples_out``. Given shard URLs, the manifest entries of exactly those
    shards (from one or several folders); None when a folder has no manifest or a shard is not listed.
    """
    if isinstance(urls_or_dir, str | os.PathLike):
        path = os.fspath(urls_or_dir)
        if not path.endswith((".tar", ".tar.gz", ".tgz")):
            try:
                return read_manifest(path).samples_out
            except ManifestError:
                return None
        urls: list[str] = [path]
    else:
        urls = list(urls_or_dir)
    by_dir: dict[str, list[str]] = {}
    for url in urls:
        folder, _, name = url.rpartition("/")
        by_dir.setdefault(folder or ".", []).append(name)
    total = 0
    for folder, names in by_dir.items():
        try:
            manifest = read_manifest(folder)
        except ManifestError:
            return None
        counts = {s["name"]: s["samples"] for s in manifest.shards}
        if any(n not in counts for n in names):
            return None
        total += sum(counts[n] for n in names)
    return total


def shard_name(prefix: str, index: int) -> str:
    """``prefix-000007.tar``: the shard file name for ``index``."""
    return f"{prefix}-{index:06d}.tar"


# ------------------------------------------------------------------------------------------- writing
def _encode_value(ext: str, value: Any) -> bytes:
    last = ext.rsplit(".", 1)[-1].lower()
    if last in _UNSAFE_EXTENSIONS:
        raise ValueError(f"refusing to write {ext!r}: pickled members are not allowed in siclip shards")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if last == "json":
        return json.dumps(value, sort_keys=True).encode("utf-8")
    if last == "npz":
        if not isinstance(value, dict):
            raise ValueError(f"{ext!r}: expected bytes or a dict of arrays, got {type(value).__name__}")
        arrays: dict[str, Any] = {k: np.asarray(v) for k, v in value.items()}
        if any(a.dtype == object for a in arrays.values()):
            raise ValueError(f"{ext!r}: object arrays would need pickle; store numeric arrays only")
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()
    if last in IMAGE_EXTENSIONS:
        from PIL import Image

        image = value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value))
        buf = io.BytesIO()
        image.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(last, last.upper()), quality=90)
        return buf.getvalue()
    if last in ("cls", "id", "index"):
        return str(value).encode("ascii")
    raise ValueError(f"{ext!r}: no encoder for {type(value).__name__}")


def encode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Encode a sample's values to bytes by extension (bytes pass through; pickles are refused)."""
    if "__key__" not in sample:
        raise ValueError("a sample needs a '__key__'")
    out: dict[str, Any] = {"__key__": str(sample["__key__"])}
    for ext, value in sample.items():
        if ext.startswith("__"):
            continue
        out[ext] = _encode_value(ext, value)
    return out


class _DigestingStream:
    """A write-only stream that counts and hashes (sha256) what it passes on."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.size = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()


def _fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse a directory fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(path or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicShardWriter:
    """Write one WebDataset shard to ``<path>.tmp`` and rename it to ``path`` only on a clean close.

    Use as a context manager; an exception inside the block deletes the temporary file and leaves no
    final file, so a rerun that finds ``path`` can trust it is complete. ``mtime`` is fixed by default so
    the same samples give the same bytes. Local paths use ``os.replace``; other fsspec URIs write the
    temporary object and move it.

    S3 is the exception: an object only appears when its upload completes (one PUT, or the multipart
    upload's final call), so the shard is written straight to its final key and an abort discards the
    upload instead. A temporary key would cost a server-side copy and a delete per shard (S3 has no
    rename), for no gain in safety; callers still record completion only afterwards (the manifest).
    """

    def __init__(self, path: str | os.PathLike[str], *, mtime: int = 0) -> None:
        import webdataset as wds

        self.path = os.fspath(path)
        self.tmp_path = self.path + ".tmp"
        self._remote = is_remote(self.path)
        self._direct = False
        if self._remote:
            import fsspec

            self._fs, self._fs_path = fsspec.core.url_to_fs(self.path)
            protocols = self._fs.protocol if isinstance(self._fs.protocol, tuple) else (self._fs.protocol,)
            self._direct = bool(set(protocols) & _DIRECT_PUT_PROTOCOLS)
            if self._direct:
                self.tmp_path = self.path
            target = self._fs_path if self._direct else self._fs_path + ".tmp"
            self._stream: IO[bytes] = self._fs.open(target, "wb")
        else:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._stream = open(self.tmp_path, "wb")  # noqa: SIM115 -- closed in close()/abort()
        self._digesting = _DigestingStream(self._stream)
        # An integer mtime keeps tar headers plain ustar (a float forces a pax header per member).
        self._writer = wds.TarWriter(self._digesting, encoder=False, mtime=int(mtime), mode=0o644)
        self._count = 0
        self._closed = False

    @property
    def count(self) -> int:
        """Samples written so far."""
        return self._count

    @property
    def size(self) -> int:
        """Bytes written so far (the whole file's size once closed)."""
        return self._digesting.size

    @property
    def sha256(self) -> str:
        """The hex SHA-256 of the bytes written so far (of the whole file once closed)."""
        return self._digesting.digest.hexdigest()

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample: ``__key__`` plus extension keys (``jpg`` bytes, ``txt`` str, ``json`` dict, ...)."""
        if self._closed:
            raise RuntimeError(f"{self.path}: writer is closed")
        self._writer.write(encode_sample(sample))
        self._count += 1

    def close(self) -> None:
        """Finish the tar and rename it to its final name."""
        if self._closed:
            return
        self._closed = True
        try:
            self._writer.close()
            if not self._remote:
                # On disk before the rename: a node crash after it must not leave a short "finished" file.
                self._stream.flush()
                os.fsync(self._stream.fileno())
            self._stream.close()
        except BaseException:
            self._closed = False
            self.abort()
            raise
        if self._direct:
            return
        if self._remote:
            self._fs.mv(self._fs_path + ".tmp", self._fs_path)
        else:
            os.replace(self.tmp_path, self.path)
            _fsync_dir(os.path.dirname(self.path))

    def abort(self) -> None:
        """Drop the partial shard: no final file is left behind."""
        if self._closed:
            return
        self._closed = True
        if self._direct:
            # Closing the stream would complete the upload: throw it away instead (aborts a multipart
            # upload; one the store cannot abort now stays invisible). The tar is closed first so nothing
            # writes into the discarded stream at exit.
            with contextlib.suppress(Exception):
                self._writer.close()
            with contextlib.suppress(Exception):
                self._stream.discard()  # type: ignore[attr-defined]
            self._stream.closed = True  # type: ignore[misc]  # nothing left to flush, even at exit
            return
        try:
            # Close the tar first (it flushes into the doomed temp file) so nothing writes at exit.
            with contextlib.suppress(Exception):
                self._writer.close()
            self._stream.close()
        finally:
            if self._remote:
                if self._fs.exists(self._fs_path + ".tmp"):
                    self._fs.rm(self._fs_path + ".tmp")
            elif os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)

    def __enter__(self) -> AtomicShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ------------------------------------------------------------------------------------------- reading
def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    import fsspec

    return fsspec.open(url, mode).open()  # type: ignore[no-any-return]


def register_fsspec_schemes(
    schemes: Iterable[str] = ("s3", "gcs", "gs", "az", "abfs", "abfss", "hdfs"),
) -> None:
    """Let webdataset open these URI schemes through fsspec (webdataset itself knows pipe:, http(s), gs)."""
    # The module's table (``from webdataset import gopen`` is webdataset's gopen *function*, not the module).
    from webdataset.gopen import gopen_schemes

    for scheme in schemes:
        if scheme == "gs" and "gs" in gopen_schemes:
            continue  # webdataset's gsutil handler works where gsutil exists; keep it
        gopen_schemes[scheme] = _fsspec_gopen


def open_url(url: str, mode: str = "rb") -> IO[bytes]:
    """Open a local path, ``file://``, ``pipe:CMD`` or any fsspec URI for binary reading."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, mode)  # type: ignore[no-any-return]
    if is_remote(url) and not url.startswith("file://"):
        return _fsspec_gopen(url, mode)
    return open(url.removeprefix("file://"), mode)


def _decode_image(data: bytes) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def decode_sample(raw: dict[str, Any], *, images: bool = True) -> dict[str, Any]:
    """Decode a raw sample (extension -> bytes) without ever unpickling.

    Images become RGB PIL images (or stay bytes with ``images=False``), ``txt`` a str, ``*.json`` a dict,
    ``npz`` a dict of arrays (``allow_pickle=False``). Pickle members are dropped; other members stay bytes.
    Raises on corrupt data; callers that must not crash catch and count.
    """
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("__"):
            out[key] = value
            continue
        last = key.rsplit(".", 1)[-1].lower()
        if last in _UNSAFE_EXTENSIONS:
            continue
        if not isinstance(value, bytes | bytearray):
            out[key] = value
        elif last in IMAGE_EXTENSIONS:
            out[key] = _decode_image(bytes(value)) if images else bytes(value)
        elif last in ("txt", "text"):
            out[key] = value.decode("utf-8")
        elif last == "json":
            out[key] = json.loads(value)
        elif last == "npz":
            with np.load(io.BytesIO(value), allow_pickle=False) as npz:
                out[key] = {k: npz[k] for k in npz.files}
        else:
            out[key] = bytes(value)
    return out


def image_of(sample: dict[str, Any]) -> Any:
    """The sample's image, whichever extension holds it; KeyError naming the key if none."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample {sample.get('__key__')!r} has no image ({', '.join(IMAGE_EXTENSIONS)})")


class DamagedTarError(tarfile.ReadError):
    """A member header in the middle of a tar is not valid although the bytes go on: damaged content.

    Every member before it was read whole (``iter_tar_members`` yielded them); what follows is lost.
    """


class _CountingReader:
    """A read-only stream that counts the bytes it hands on and notes when it reached the end of its data."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.position = 0
        self.at_eof = False
        self.size = _known_size(stream)

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.position += len(data)
        if not data or (n is not None and n > 0 and len(data) < n):
            self.at_eof = True
        return data

    def drain(self) -> None:
        """Read what is left, so ``position`` says where the data really ended."""
        while self.read(1 << 20):
            pass


def _known_size(stream: Any) -> int | None:
    size = getattr(stream, "size", None)  # fsspec files know their object's size
    if isinstance(size, int):
        return size
    try:
        return os.fstat(stream.fileno()).st_size if os.path.isfile(getattr(stream, "name", "")) else None
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return None


class _Cut(Exception):
    """The tar's data ran out before its end-of-archive marker (internal: becomes a ShardIOError)."""


def _header_log(failures: list[tuple[int, int, Exception]]) -> type[tarfile.TarInfo]:
    """A TarInfo class that notes every header read that fails: (offset, bytes it got, error).

    In stream mode ``tarfile`` ends the archive silently at an empty, partial or invalid header past the
    first; the note says which of these it was (the data ran out, or the bytes are not a header).
    """

    class _LoggedTarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar: tarfile.TarFile) -> Any:
            start = tar.fileobj.tell()  # type: ignore[union-attr]
            try:
                return super().fromtarfile(tar)
            except tarfile.HeaderError as exc:
                failures.append((start, tar.fileobj.tell() - start, exc))  # type: ignore[union-attr]
                raise

    return _LoggedTarInfo


def _check_archive_end(tar: tarfile.TarFile, failures: list[tuple[int, int, Exception]]) -> None:
    """After the last member: the archive must end with its two zero blocks, else it was cut or damaged."""
    if not failures:
        raise _Cut("the data ends without an end-of-archive marker")
    offset, got, exc = failures[-1]
    if got < tarfile.BLOCKSIZE:
        where = "at" if got == 0 else f"{got} bytes into"
        raise _Cut(f"the data ends {where} the member header at byte {offset}")
    if not isinstance(exc, tarfile.EOFHeaderError):  # type: ignore[attr-defined]  # a zero block
        raise DamagedTarError(f"byte {offset}: not a valid member header ({exc})")
    second = tar.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
    if len(second) < tarfile.BLOCKSIZE:
        raise _Cut(f"the data ends inside the end-of-archive marker at byte {offset}")
    if second.count(0) != tarfile.BLOCKSIZE:
        raise DamagedTarError(f"byte {offset}: a lone zero block followed by data")


def _ran_out(
    reader: _CountingReader, tar: tarfile.TarFile | None, failures: list[tuple[int, int, Exception]]
) -> bool:
    """Whether a content error came from the data running out (a cut) rather than from bad bytes.

    The input must have reached its end (bad compressed data mid-stream also stops a member short), and the
    tar must have wanted more: a header (first, or one after a long-name header) came back short, or the
    data stopped before the next header's offset (inside a member or its padding).
    """
    if not reader.at_eof:
        return False
    if failures and failures[-1][1] < tarfile.BLOCKSIZE:
        return True
    return tar is not None and tar.fileobj is not None and tar.fileobj.tell() < tar.offset


def iter_tar_members(url: str, *, expected_samples: int | None = None) -> Iterator[tuple[str, str, bytes]]:
    """``(sample key, extension, bytes)`` for each file member of one tar, in file order.

    The key is the member name up to the first dot of its base name, like webdataset; members without an
    extension are skipped. The tar counts as read only when it was read to its end-of-archive marker, the
    stream gave as many bytes as the object's known size, and (``expected_samples``, e.g. img2dataset's
    ``successes``) it held at least that many samples. Damaged content (bytes present but not a tar)
    raises ``tarfile.TarError`` (:class:`DamagedTarError` for a bad header past the first),
    ``EOFError`` or ``zlib.error``; data that ends early anywhere (at or inside a header, inside a member
    or its padding, inside the end marker), in a stream or in a file at rest, and any other failure raise
    :class:`ShardIOError`: the tar is incomplete, not bad, so the read is retried and never finished.
    """
    reader: _CountingReader | None = None
    try:
        with open_url(url, "rb") as stream:
            reader = _CountingReader(stream)
            failures: list[tuple[int, int, Exception]] = []
            tar: tarfile.TarFile | None = None
            error: Exception | None = None
            keys: set[str] = set()
            try:
                # Not closed: closing a stream-mode TarFile closes nothing of ours (open_url's stream is).
                tar = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115
                    fileobj=reader, mode="r|*", tarinfo=_header_log(failures)
                )
                for member in tar:
                    if not member.isfile():
                        continue
                    dirname, _, base = member.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not dot:
                        continue
                    key = f"{dirname}/{stem}" if dirname else stem
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise _Cut(
                            f"the data ends {len(data)} bytes into {member.name} ({member.size} bytes)"
                        )
                    keys.add(key)
                    yield key, ext, data
                _check_archive_end(tar, failures)
            except _Cut as exc:
                error = exc
            except _CONTENT_ERRORS as exc:
                if _ran_out(reader, tar, failures):
                    at = (
                        f" at byte {tar.fileobj.tell()}"
                        if tar is not None and tar.fileobj is not None
                        else ""
                    )
                    error = _Cut(f"the data ends early{at} ({exc})")
                else:
                    error = exc
            reader.drain()
            if reader.size is not None and reader.position < reader.size:
                # The bytes stopped coming before the object ended: the transport failed, not the tar.
                raise ShardIOError(
                    f"{url}: the stream ended after {reader.position} of {reader.size} bytes"
                    + (f" ({error})" if error is not None else "")
                )
            if isinstance(error, _Cut):
                raise ShardIOError(
                    f"{url}: incomplete tar, {error}; a download or copy cut short (get the file again)"
                )
            if error is not None:
                raise error
            if expected_samples is not None and len(keys) < expected_samples:
                raise ShardIOError(
                    f"{url}: incomplete tar, {len(keys)} samples where img2dataset's stats say it wrote "
                    f"{expected_samples} (get the file again)"
                )
    except _CONTENT_ERRORS:
        raise
    except ShardIOError:
        raise
    except Exception as exc:  # missing object, connection, credentials, a failing pipe: not the data's fault
        raise ShardIOError(f"{url}: cannot read ({type(exc).__name__}: {exc})") from exc


def img2dataset_count(url: str) -> int | None:
    """How many samples img2dataset wrote into the tar at ``url``, from the ``<shard>_stats.json`` beside it.

    img2dataset writes ``{"count": rows tried, "successes": samples written, ...}`` per shard; this returns
    ``successes``, or None when there is no such file or it does not say. Raises :class:`ShardIOError` when
    the file exists but cannot be read.
    """
    base = url[: -len(".tar")] if url.endswith(".tar") else url
    path = base + "_stats.json"
    if path.startswith("pipe:"):
        return None
    try:
        with open_url(path, "rb") as f:
            stats = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s: not valid JSON; the samples lost in a damaged tar are counted as one", path)
        return None
    except Exception as exc:
        raise ShardIOError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    value = stats.get("successes") if isinstance(stats, dict) else None
    return value if isinstance(value, int) and value >= 0 else None


def iter_raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (extension -> bytes, plus ``__key__``, ``__url__``) of one tar, in file order.

    When the tar fails part-way (damaged, or cut short), the members read before the failure still come
    out, each whole (the last sample may lack members that came after), then the error is raised.
    """
    current: dict[str, Any] | None = None
    try:
        for key, ext, data in iter_tar_members(url):
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext] = data
    except Exception:
        if current is not None:
            yield current
        raise
    if current is not None:
        yield current


def iter_samples(urls: str | Iterable[str], *, images: bool = True) -> Iterator[dict[str, Any]]:
    """Decoded samples of the given shards in order (for evaluation and tools, not training)."""
    for url in [urls] if isinstance(urls, str) else urls:
        for raw in iter_raw_samples(url):
            yield decode_sample(raw, images=images)


def list_shards(folder: str | os.PathLike[str]) -> list[str]:
    """The shard paths a folder's manifest lists, in manifest order (local folders and URIs)."""
    base = os.fspath(folder).rstrip("/")
    return [f"{base}/{s['name']}" for s in read_manifest(base).shards]


def list_sizes(folder: str | os.PathLike[str]) -> dict[str, int]:
    """File name -> size of every file directly in ``folder`` (local or any fsspec URI), in one listing.

    An absent folder lists as empty. Other processes (the actors) wrote it: no cached listing is used.
    """
    base = os.fspath(folder).rstrip("/")
    if is_remote(base):
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(base)
        fs.invalidate_cache(fs_path)
        try:
            entries = fs.ls(fs_path, detail=True)
        except FileNotFoundError:
            return {}
        return {
            str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries
            if e.get("type") == "file"
        }
    try:
        with os.scandir(base) as it:
            return {e.name: e.stat().st_size for e in it if e.is_file()}
    except FileNotFoundError:
        return {}


def finished(path: str | os.PathLike[str]) -> bool:
    """True if a final (renamed, hence complete) shard exists at ``path``."""
    p = os.fspath(path)
    if is_remote(p):
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(p)
        fs.invalidate_cache(fs_path)  # other processes (the actors) wrote it: no stale listing
        return bool(fs.exists(fs_path))
    return Path(p).is_file()
