"""Training input: an infinite, deterministic, per-rank stream of batches from WebDataset shards.

Every rank can draw as many steps as the loop asks for, however uneven the shard counts and sizes, so DDP
never waits on a rank that ran out of data: the stream repeats epoch after epoch (each epoch reshuffles
the shard order with a seed shared by all ranks) and never ends. Within an epoch the shards are split
across (rank, loader worker) slots when there are enough of them, across ranks only (samples split by
index among a rank's workers) when there are at least ``world_size``, and otherwise the samples of all
shards are split by index across every slot.

Per sample: the image goes through the student transform (and the teacher's, when given); the real
caption, and with ``synthetic="sum"`` one of the sample's ``syn.json`` captions drawn uniformly at random
per sample per draw, are tokenised per batch; ``synthetic="replace"`` swaps the real caption for a
synthetic one with probability ``synthetic_p``. With ``shard_embeddings`` on and every sample of a batch
carrying an ``npz`` with teacher embeddings (MobileCLIP's reinforced layout), the rows matching the captions
used are passed on; :func:`shard_embeddings_usable` decides whether they may be (the shards' manifest must
name the configured teacher).
Samples that fail to decode are skipped, counted and logged.

URLs: local paths, ``file://``, ``pipe:CMD`` (e.g. ``pipe:aws s3 cp s3://b/x.tar -``) and any fsspec URI
(``s3://``, ``gs://``, ``https://``; the matching fsspec backend must be installed). No Ray here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from siclip.data.shards import ManifestError, decode_sample, image_of, iter_raw_samples, read_manifest

__all__ = ["build_train_loader", "shard_embeddings_usable", "slot_shards"]

log = logging.getLogger(__name__)

Transform = Callable[[Any], torch.Tensor]
Tokenizer = Callable[[list[str]], torch.Tensor]
_LOG_FIRST = 10
_LOG_EVERY = 100


def slot_shards(
    urls: Sequence[str], *, epoch: int, seed: int, rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[list[str], int, int]:
    """Which shards one (rank, worker) slot reads in an epoch, and which of their samples it keeps.

    Returns ``(shards, modulus, remainder)``: the slot keeps the samples whose running index ``i`` in its
    shard stream has ``i % modulus == remainder`` (``modulus == 1`` keeps all).
    """
    order = list(urls)
    np.random.default_rng([seed, epoch, 0x5EED]).shuffle(order)  # same order on every rank and worker
    slots = world_size * num_workers
    if len(order) >= slots:
        return order[rank * num_workers + worker :: slots], 1, 0
    if len(order) >= world_size:
        return order[rank::world_size], num_workers, worker
    return order, slots, rank * num_workers + worker


@dataclass
class _Counters:
    skipped: int = 0

    def skip(self, what: str, err: BaseException) -> None:
        self.skipped += 1
        if self.skipped <= _LOG_FIRST or self.skipped % _LOG_EVERY == 0:
            log.warning(
                "skipping %s: %s: %s (%d skipped so far in this loader worker)",
                what,
                type(err).__name__,
                err,
                self.skipped,
            )


class _ShardStream(IterableDataset):  # type: ignore[type-arg]
    """The per-worker pipeline: shards -> raw samples -> shuffle buffer -> decode -> batches (infinite)."""

    def __init__(self, urls: list[str], **kw: Any) -> None:
        self.urls = urls
        self.kw = kw

    def _raw_epochs(self, worker: int, num_workers: int, counters: _Counters) -> Iterator[dict[str, Any]]:
        kw = self.kw
        epoch = kw["epoch_offset"]
        while True:
            shards, modulus, remainder = slot_shards(
                self.urls,
                epoch=epoch,
                seed=kw["seed"],
                rank=kw["rank"],
                world_size=kw["world_size"],
                worker=worker,
                num_workers=num_workers,
            )
            index, kept = 0, False
            for url in shards:
                try:
                    for raw in iter_raw_samples(url):
                        if index % modulus == remainder:
                            kept = True
                            yield raw
                        index += 1
                except Exception as err:  # a truncated or unreadable shard: keep what was read, go on
                    counters.skip(f"the rest of shard {url}", err)
            if not kept:
                raise RuntimeError(
                    f"rank {kw['rank']} loader worker {worker} got no samples in epoch {epoch} from "
                    f"{len(shards)} of {len(self.urls)} shards (modulus {modulus}): fewer usable samples than "
                    f"world_size x loader_workers = {kw['world_size'] * num_workers}?"
                )
            epoch += 1

    def _sample(self, raw: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        kw = self.kw
        s = decode_sample(raw)
        image = image_of(s)
        caption: str = s["txt"]  # decode_sample makes every txt member a str (invalid UTF-8 raises there)
        syn: list[str] | None = None
        if kw["synthetic"] != "off" and isinstance(s.get("syn.json"), dict):
            syn = [str(t) for t in s["syn.json"].get("syn_text", [])] or None
        out: dict[str, Any] = {"image": kw["transform"](image), "text_row": 0, "syn": None, "syn_row": 0}
        if kw["teacher_transform"] is not None:
            out["teacher_image"] = kw["teacher_transform"](image)
        if syn is not None:
            j = int(rng.integers(len(syn)))
            if kw["synthetic"] == "replace":
                if rng.random() < kw["synthetic_p"]:
                    caption, out["text_row"] = syn[j], 1 + j
            else:
                out["syn"], out["syn_row"] = syn[j], 1 + j
        out["caption"] = caption
        npz = s.get("npz") if kw["shard_embeddings"] else None
        if isinstance(npz, dict) and "image_emb" in npz and "text_emb" in npz:
            image_emb = np.asarray(npz["image_emb"], dtype=np.float32)
            text_emb = np.asarray(npz["text_emb"], dtype=np.float32)
            # [N, D]: one row per stored augmentation (MobileCLIP); we do not replay those augmentations, so
            # row 0 stands for the image.
            image_emb = image_emb[0] if image_emb.ndim == 2 else image_emb
            rows_needed = max(out["text_row"], out["syn_row"]) + 1
            if image_emb.ndim == 1 and text_emb.ndim == 2 and text_emb.shape[0] >= rows_needed:
                out["image_emb"] = torch.from_numpy(image_emb)
                out["text_emb"] = torch.from_numpy(text_emb[out["text_row"]])
                out["syn_emb"] = torch.from_numpy(text_emb[out["syn_row"]])
        return out

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        kw = self.kw
        tok: Tokenizer = kw["tokenizer"]
        ttok: Tokenizer | None = kw["teacher_tokenizer"]
        captions = [it["caption"] for it in items]
        batch = {"image": torch.stack([it["image"] for it in items]), "text": tok(captions).long()}
        has_syn = [it["syn"] is not None for it in items]
        # A batch where only some samples have synthetic captions uses the real caption for the others,
        # so the batch keys depend only on whether any sample has them.
        syn_texts = (
            [it["syn"] if it["syn"] is not None else it["caption"] for it in items] if any(has_syn) else None
        )
        if syn_texts is not None:
            batch["syn_text"] = tok(syn_texts).long()
        if kw["teacher_transform"] is not None:
            batch["teacher_image"] = torch.stack([it["teacher_image"] for it in items])
        if ttok is not None:
            batch["teacher_text"] = ttok(captions).long()
            if syn_texts is not None:
                batch["teacher_syn_text"] = ttok(syn_texts).long()
        if all("image_emb" in it for it in items):
            batch["teacher_image_emb"] = torch.stack([it["image_emb"] for it in items])
            batch["teacher_text_emb"] = torch.stack([it["text_emb"] for it in items])
            if syn_texts is not None:
                batch["teacher_syn_emb"] = torch.stack([it["syn_emb"] for it in items])
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        kw = self.kw
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([kw["seed"], kw["epoch_offset"], kw["rank"], worker, 0xBA7C4])
        counters = _Counters()
        raws = _shuffled(self._raw_epochs(worker, num_workers, counters), kw["shuffle_buffer"], rng)
        items: list[dict[str, Any]] = []
        for raw in raws:
            try:
                items.append(self._sample(raw, rng))
            except Exception as err:  # corrupt image, missing caption, bad json/npz: skip, count, go on
                counters.skip(f"sample {raw.get('__key__')!r} of {raw.get('__url__')}", err)
                continue
            if len(items) == kw["batch_size"]:
                yield self._collate(items)
                items = []


def _shuffled(
    items: Iterator[dict[str, Any]], bufsize: int, rng: np.random.Generator
) -> Iterator[dict[str, Any]]:
    # A reservoir shuffle over raw (still encoded) samples, so the buffer costs bytes, not decoded images.
    if bufsize <= 1:
        yield from items
        return
    buf: list[dict[str, Any]] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    yield from buf  # only reached if the stream ends (it does not: epochs repeat)


def _expand(urls: Sequence[str]) -> list[str]:
    if any(c in u for u in urls for c in "{*?["):
        from siclip.config import expand_shards

        return expand_shards(list(urls))
    return list(urls)


def shard_embeddings_usable(urls: Sequence[str], teacher: Any) -> bool:
    """Whether the teacher embeddings stored in these shards may stand in for ``teacher`` (a TeacherCfg).

    Only with ``teacher.use_shard_embeddings`` on, and only when the manifest of every folder holding the
    shards says it was built with teacher embeddings of the same ``teacher.name`` and ``teacher.source``.
    Otherwise logs one line saying why the teacher runs on every batch instead, and returns False.
    """
    if not teacher.use_shard_embeddings:
        log.info(
            "teacher.use_shard_embeddings=false: stored teacher embeddings are ignored; the teacher runs"
        )
        return False
    wanted = {"name": teacher.name, "source": teacher.source}
    for folder in sorted({u.rpartition("/")[0] or "." for u in _expand(urls)}):
        try:
            config = read_manifest(folder).config
        except ManifestError as exc:
            log.info("stored teacher embeddings unused: %s; the teacher runs", exc)
            return False
        made = config.get("teacher") if config.get("caption", {}).get("teacher_embeddings") else None
        if not isinstance(made, dict):
            log.info("stored teacher embeddings unused: %s holds none; the teacher runs", folder)
            return False
        got = {k: made.get(k) for k in wanted}
        if got != wanted:
            log.warning(
                "stored teacher embeddings unused: %s was built with teacher %s:%s but teacher.* is %s:%s; "
                "the teacher runs",
                folder,
                got["name"],
                got["source"],
                wanted["name"],
                wanted["source"],
            )
            return False
    return True


def build_train_loader(
    *,
    urls: list[str],
    batch_size: int,
    rank: int,
    world_size: int,
    transform: Transform,
    tokenizer: Tokenizer,
    teacher_transform: Transform | None = None,
    teacher_tokenizer: Tokenizer | None = None,
    synthetic: Literal["sum", "replace", "off"] | str = "sum",
    synthetic_p: float = 0.5,
    loader_workers: int = 2,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch_offset: int = 0,
    shard_embeddings: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """An infinite iterator of this rank's batches (``batch_size`` is per rank).

    Keys: ``image``, ``text``; ``syn_text`` (``synthetic="sum"`` and synthetic captions present);
    ``teacher_image`` / ``teacher_text`` / ``teacher_syn_text`` with a teacher transform / tokenizer;
    ``teacher_image_emb`` / ``teacher_text_emb`` / ``teacher_syn_emb`` when every sample has teacher
    embeddings and ``shard_embeddings`` is on (see :func:`shard_embeddings_usable`). Deterministic given ``seed``, ``rank``, ``world_size``, ``loader_workers`` and
    ``epoch_offset``; pass a new ``epoch_offset`` on resume so a resumed run sees a fresh order.
    """
    if synthetic not in ("sum", "replace", "off"):
        raise ValueError(f"synthetic: got {synthetic!r}; allowed: 'sum', 'replace', 'off'")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shards = _expand(urls)
    if not shards:
        raise ValueError(f"no training shards in {urls!r}")
    dataset = _ShardStream(
        shards,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        transform=transform,
        tokenizer=tokenizer,
        teacher_transform=teacher_transform,
        teacher_tokenizer=teacher_tokenizer,
        synthetic=synthetic,
        synthetic_p=synthetic_p,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        epoch_offset=epoch_offset,
        shard_embeddings=shard_embeddings,
    )
    loader = DataLoader(
        dataset,
        batch_size=None,  # batches are built in the workers
        num_workers=loader_workers,
        persistent_workers=loader_workers > 0,
        prefetch_factor=2 if loader_workers > 0 else None,
    )
    return iter(loader)
