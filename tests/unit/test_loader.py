"""Training loader: equal steps across ranks, rank/worker splits, synthetic-caption sampling, teacher
embeddings from npz, skipping bad samples, determinism."""

from __future__ import annotations

import io
import itertools
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siclip.config import TeacherCfg
from siclip.data.loader import build_train_loader, shard_embeddings_usable, slot_shards
from siclip.data.shards import AtomicShardWriter, Manifest, write_manifest

K = 4  # synthetic captions per sample
D = 3  # teacher embedding width


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _write(path, ids, *, syn=False, npz=False, corrupt=()):
    with AtomicShardWriter(path) as w:
        for i in ids:
            sample: dict[str, object] = {"__key__": f"{i:06d}", "png": _jpeg(i), "txt": f"cap {i} 0"}
            if i in corrupt:
                sample["png"] = b"not an image"
            if syn:
                sample["syn.json"] = {"syn_text": [f"syn {i} {j + 1}" for j in range(K)]}
            if npz:
                text_emb = np.stack([np.full(D, 1000 * i + r, np.float32) for r in range(1 + K)])
                sample["npz"] = {"image_emb": np.full((2, D), -i, np.float32), "text_emb": text_emb}
            w.write(sample)
    return str(path)


def _tok(texts: list[str]) -> torch.Tensor:
    # "cap 17 0" -> [17, 0], "syn 17 3" -> [17, 3]: the tokens say which sample and which caption.
    return torch.tensor([[int(t.split()[1]), int(t.split()[2])] for t in texts])


def _transform(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255


def _loader(urls, **kw):
    args = {
        "urls": urls,
        "batch_size": 4,
        "rank": 0,
        "world_size": 1,
        "transform": _transform,
        "tokenizer": _tok,
        "loader_workers": 0,
        "shuffle_buffer": 8,
        "seed": 0,
    }
    args.update(kw)
    return build_train_loader(**args)


def _ids(batch) -> list[int]:
    return batch["text"][:, 0].tolist()


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    d = tmp_path_factory.mktemp("uneven")
    return [
        _write(d / "a-000000.tar", range(0, 10)),
        _write(d / "a-000001.tar", range(10, 13)),
        _write(d / "a-000002.tar", range(13, 20)),
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_equal_steps_across_two_ranks_with_uneven_shards(uneven, workers) -> None:
    steps = 25  # many epochs of the smaller rank's share
    counts = []
    for rank in range(2):
        it = _loader(uneven, rank=rank, world_size=2, loader_workers=workers)
        batches = list(itertools.islice(it, steps))
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (4, 3, 4, 4) and b["image"].dtype == torch.float32
            assert b["text"].shape == (4, 2) and b["text"].dtype == torch.long
            assert "syn_text" not in b
            # the image really is the sample's: red channel encodes the id
            np.testing.assert_allclose(b["image"][:, 0, 0, 0].numpy(), np.array(_ids(b)) / 255, atol=1e-6)
    assert counts == [steps, steps]


def test_slot_split_partitions_every_epoch() -> None:
    urls = [f"s{i}" for i in range(3)]
    for epoch in range(3):
        # 3 shards, 2 ranks x 1 worker: shards split by rank, disjoint and complete
        parts = [
            slot_shards(urls, epoch=epoch, seed=0, rank=r, world_size=2, worker=0, num_workers=1)
            for r in range(2)
        ]
        assert sorted(parts[0][0] + parts[1][0]) == urls and all(p[1:] == (1, 0) for p in parts)
        # 3 shards, 2 ranks x 2 workers: per rank its shards, samples split by index among its workers
        parts = [
            slot_shards(urls, epoch=epoch, seed=0, rank=r, world_size=2, worker=w, num_workers=2)
            for r in range(2)
            for w in range(2)
        ]
        assert parts[0][0] == parts[1][0] and {parts[0][1:], parts[1][1:]} == {(2, 0), (2, 1)}
        # 1 shard, 2 ranks: everyone reads it, samples split by index across the 2 slots
        one = [
            slot_shards(urls[:1], epoch=epoch, seed=0, rank=r, world_size=2, worker=0, num_workers=1)
            for r in range(2)
        ]
        assert one[0][0] == one[1][0] == urls[:1] and {one[0][1:], one[1][1:]} == {(2, 0), (2, 1)}


def test_one_shard_two_ranks_split_samples(tmp_path) -> None:
    url = _write(tmp_path / "one-000000.tar", range(16))
    seen = []
    for rank in range(2):
        it = _loader([url], rank=rank, world_size=2, shuffle_buffer=0, batch_size=8)
        seen.append(set(_ids(next(it))))  # one epoch of this rank's half
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(16))


def test_deterministic_and_epoch_offset_changes_order(uneven) -> None:
    def first(n, **kw):
        return [_ids(b) for b in itertools.islice(_loader(uneven, **kw), n)]

    assert first(6) == first(6)
    assert first(6, loader_workers=2) == first(6, loader_workers=2)
    assert first(6) != first(6, epoch_offset=1)
    assert first(6) != first(6, seed=1)
    # without a shuffle buffer, the first 5 batches of 4 are exactly one epoch of the 20 samples
    assert sorted(itertools.chain(*first(5, shuffle_buffer=0))) == list(range(20))


def test_loader_workers_split_an_epoch_without_repeats(tmp_path) -> None:
    """Each DataLoader worker reads its own slot: two shards of 8, two workers, so the first 4 batches of 4
    (2 per worker) are the epoch's 16 samples once each (a worker that ignored its id would repeat them)."""
    urls = [_write(tmp_path / f"w-{i:06d}.tar", range(8 * i, 8 * i + 8)) for i in range(2)]
    # workers=0 too: it runs the stream in this process, where mutation testing's coverage map can see it
    for workers in (0, 2):
        loader = _loader(urls, loader_workers=workers, shuffle_buffer=0)
        ids = [i for b in itertools.islice(loader, 4) for i in _ids(b)]
        assert sorted(ids) == list(range(16)), workers


def test_synthetic_sum_draws_each_caption_uniformly(tmp_path) -> None:
    url = _write(tmp_path / "syn-000000.tar", range(50), syn=True)
    counts = np.zeros(K + 1, int)
    n = 0
    for b in itertools.islice(_loader([url], batch_size=10), 120):
        assert (b["text"][:, 1] == 0).all()  # the real caption stays
        assert (b["syn_text"][:, 0] == b["text"][:, 0]).all()  # the same sample's synthetic caption
        counts += np.bincount(b["syn_text"][:, 1].numpy(), minlength=K + 1)
        n += 10
    assert counts[0] == 0
    freq = counts[1:] / n
    # 1200 draws: the standard error of each 0.25 is 0.0125; allow 4 of them
    assert np.all(np.abs(freq - 1 / K) < 0.05), freq


def test_synthetic_replace_probability(tmp_path) -> None:
    url = _write(tmp_path / "rep-000000.tar", range(50), syn=True)
    replaced = n = 0
    for b in itertools.islice(_loader([url], batch_size=10, synthetic="replace", synthetic_p=0.3), 150):
        assert "syn_text" not in b
        replaced += int((b["text"][:, 1] > 0).sum())
        n += 10
    assert abs(replaced / n - 0.3) < 0.04  # 1500 draws, standard error 0.012
    b = next(_loader([url], synthetic="off"))
    assert "syn_text" not in b and (b["text"][:, 1] == 0).all()


def test_npz_teacher_embeddings_follow_the_drawn_caption(tmp_path) -> None:
    url = _write(tmp_path / "emb-000000.tar", range(12), syn=True, npz=True)
    for b in itertools.islice(_loader([url]), 6):
        ids = b["text"][:, 0]
        assert b["teacher_image_emb"].shape == (4, D)
        torch.testing.assert_close(b["teacher_image_emb"], -ids[:, None].float().expand(4, D))
        # text_emb row r of sample i holds 1000*i + r: row 0 for the real caption, 1+j for syn caption j
        torch.testing.assert_close(b["teacher_text_emb"], (1000 * ids)[:, None].float().expand(4, D))
        syn_row = b["syn_text"][:, 1]
        torch.testing.assert_close(b["teacher_syn_emb"], (1000 * ids + syn_row)[:, None].float().expand(4, D))
    for b in itertools.islice(_loader([url], synthetic="replace", synthetic_p=0.5), 6):
        row = b["text"][:, 1]
        torch.testing.assert_close(
            b["teacher_text_emb"], (1000 * b["text"][:, 0] + row)[:, None].float().expand(4, D)
        )
        assert "teacher_syn_emb" not in b


def test_stored_embeddings_off_are_not_passed_on(tmp_path) -> None:
    url = _write(tmp_path / "emb-000000.tar", range(8), syn=True, npz=True)
    b = next(_loader([url], shard_embeddings=False))
    assert not any(k.startswith("teacher_") for k in b)


def test_shard_embeddings_usable_only_for_the_configured_teacher(tmp_path, caplog) -> None:
    url = _write(tmp_path / "emb-000000.tar", range(4), npz=True)
    teacher = TeacherCfg(name="mobileclip-s0", source="/w/teacher.pt")
    with caplog.at_level(logging.INFO, logger="siclip.data.loader"):
        assert not shard_embeddings_usable([url], teacher)  # no manifest: cannot know whose they are
    assert "manifest" in caplog.text

    def made_by(name: str, source: str, embeddings: bool = True) -> None:
        config = {"caption": {"teacher_embeddings": embeddings}, "teacher": {"name": name, "source": source}}
        write_manifest(
            tmp_path,
            Manifest(kind="cc12m-syn", shards=[{"name": "emb-000000.tar", "samples": 4}], config=config),
        )

    made_by("mobileclip-s0", "/w/teacher.pt")
    assert shard_embeddings_usable([url], teacher)
    assert shard_embeddings_usable([str(tmp_path / "emb-*.tar")], teacher)  # patterns too
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="siclip.data.loader"):
        assert not shard_embeddings_usable([url], TeacherCfg(name="mobileclip-s0", source="/w/other.pt"))
        assert not shard_embeddings_usable(
            [url], TeacherCfg(name="mobileclip-s0", source="/w/teacher.pt", use_shard_embeddings=False)
        )
    assert "/w/teacher.pt but teacher.* is mobileclip-s0:/w/other.pt" in caplog.text
    assert "use_shard_embeddings=false" in caplog.text
    made_by("mobileclip-s0", "/w/teacher.pt", embeddings=False)
    assert not shard_embeddings_usable([url], teacher)


def test_teacher_transform_and_tokenizer(tmp_path) -> None:
    url = _write(tmp_path / "t-000000.tar", range(8), syn=True)
    b = next(
        _loader(
            [url], teacher_transform=lambda im: _transform(im) * 2, teacher_tokenizer=lambda t: _tok(t) + 100
        )
    )
    torch.testing.assert_close(b["teacher_image"], b["image"] * 2)
    assert torch.equal(b["teacher_text"], b["text"] + 100)
    assert torch.equal(b["teacher_syn_text"], b["syn_text"] + 100)
    assert "teacher_image_emb" not in b


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog) -> None:
    url = _write(tmp_path / "bad-000000.tar", range(20), corrupt={3, 7, 11})
    with caplog.at_level(logging.WARNING, logger="siclip.data.loader"):
        batches = list(itertools.islice(_loader([url], batch_size=5, shuffle_buffer=0), 6))
    ids = [i for b in batches for i in _ids(b)]
    assert not {3, 7, 11} & set(ids)
    assert set(ids) == set(range(20)) - {3, 7, 11}
    assert "skipping sample '000003'" in caplog.text and "3 skipped" in caplog.text


def test_truncated_shard_keeps_going(tmp_path) -> None:
    good = _write(tmp_path / "g-000000.tar", range(8))
    broken = _write(tmp_path / "g-000001.tar", range(100, 108))
    data = Path(broken).read_bytes()
    Path(broken).write_bytes(data[: len(data) // 2])
    ids = {i for b in itertools.islice(_loader([good, broken], shuffle_buffer=0), 10) for i in _ids(b)}
    # what survives the cut, by the tar headers: the samples whose image and caption are both whole
    whole: dict[str, set[str]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the uncut bytes: where each member ends
        for m in tar.getmembers():
            if m.offset_data + m.size <= len(data) // 2:
                key, ext = m.name.split(".", 1)
                whole.setdefault(key, set()).add(ext)
    kept = {int(k) for k, exts in whole.items() if {"png", "txt"} <= exts}
    assert 0 < len(kept) < 8  # the cut is mid-shard: some of it must be kept, not all
    assert ids == set(range(8)) | kept


def test_argument_errors(uneven) -> None:
    with pytest.raises(ValueError, match="synthetic"):
        _loader(uneven, synthetic="both")
    with pytest.raises(ValueError, match="rank 2"):
        _loader(uneven, rank=2, world_size=2)


def test_too_few_samples_fails_instead_of_hanging(tmp_path) -> None:
    url = _write(tmp_path / "tiny-000000.tar", range(1))
    with pytest.raises(RuntimeError, match="no samples"):
        next(_loader([url], rank=1, world_size=2))


def test_reads_fsspec_uris(tmp_path) -> None:
    import fsspec

    local = _write(tmp_path / "m-000000.tar", range(6))
    url = "memory://siclip-test-loader/m-000000.tar"
    with fsspec.open(url, "wb") as f:
        f.write(Path(local).read_bytes())
    b = next(_loader([url], batch_size=6, shuffle_buffer=0))
    assert sorted(_ids(b)) == list(range(6))
