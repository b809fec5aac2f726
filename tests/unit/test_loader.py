"""Training loader: equal steps across ranks, every sample once per epoch across (rank, worker) slots,
synthetic-caption sampling, teacher embeddings from npz (and the layouts that are used or ignored), skipping
bad samples and cut shards, the shuffle buffer, determinism, argument errors. No Ray."""

from __future__ import annotations

import io
import itertools
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from siclip.config import TeacherCfg
from siclip.data.loader import shard_embeddings_usable, slot_shards
from siclip.data.shards import AtomicShardWriter, Manifest, write_manifest
from tests.data_fixtures import EMB_WIDTH as D
from tests.data_fixtures import SYN_CAPTIONS as K
from tests.data_fixtures import batch_ids, id_png, id_tokens, make_loader, to_tensor, write_id_shard


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    d = tmp_path_factory.mktemp("uneven")
    return [
        write_id_shard(d / "a-000000.tar", range(0, 10)),
        write_id_shard(d / "a-000001.tar", range(10, 13)),
        write_id_shard(d / "a-000002.tar", range(13, 20)),
    ]


@pytest.mark.parametrize("workers", [0, 2])
def test_equal_steps_across_two_ranks_with_uneven_shards(uneven, workers) -> None:
    steps = 25  # many epochs of the smaller rank's share
    counts = []
    for rank in range(2):
        it = make_loader(uneven, rank=rank, world_size=2, loader_workers=workers)
        batches = list(itertools.islice(it, steps))
        counts.append(len(batches))
        for b in batches:
            assert b["image"].shape == (4, 3, 4, 4) and b["image"].dtype == torch.float32
            assert b["text"].shape == (4, 2) and b["text"].dtype == torch.long
            assert "syn_text" not in b
            # the image really is the sample's: red channel encodes the id
            np.testing.assert_allclose(
                b["image"][:, 0, 0, 0].numpy(), np.array(batch_ids(b)) / 255, atol=1e-6
            )
    assert counts == [steps, steps]


def _kept_samples(slot: tuple[list[str], int, int], sizes: dict[str, int]) -> list[tuple[str, int]]:
    """The ``(shard, sample index)`` pairs one slot keeps, by ``slot_shards``' documented rule: the samples
    whose running index in the slot's stream of shards has ``i % modulus == remainder``."""
    shards, modulus, remainder = slot
    stream = [(u, j) for u in shards for j in range(sizes[u])]
    return [pair for i, pair in enumerate(stream) if i % modulus == remainder]


@pytest.mark.parametrize("n_shards", [1, 2, 3, 4, 5, 6, 8, 9])
def test_slot_shards_reads_every_sample_once_per_epoch(n_shards: int) -> None:
    """Whatever the shard count against ranks x workers: the slots of one epoch read every sample of every
    shard exactly once, no shard is read by two ranks when there are at least as many shards as ranks, no
    shard by two slots when there are at least as many as slots, the slots' loads differ by at most one
    shard's worth, and the split is a function of its arguments."""
    urls = [f"s{i}" for i in range(n_shards)]
    sizes = {u: 5 + (i % 3) for i, u in enumerate(urls)}  # uneven shards
    for world_size, num_workers, epoch, seed in itertools.product((1, 2, 3), (1, 2, 3), (0, 1), (0, 7)):
        case = (n_shards, world_size, num_workers, epoch, seed)
        slots = {
            (rank, worker): slot_shards(
                urls,
                epoch=epoch,
                seed=seed,
                rank=rank,
                world_size=world_size,
                worker=worker,
                num_workers=num_workers,
            )
            for rank, worker in itertools.product(range(world_size), range(num_workers))
        }
        args = {"epoch": epoch, "seed": seed, "rank": 0, "world_size": world_size, "num_workers": num_workers}
        assert slot_shards(urls, worker=0, **args) == slot_shards(list(urls), worker=0, **args), case
        kept = [pair for slot in slots.values() for pair in _kept_samples(slot, sizes)]
        assert sorted(kept) == sorted((u, j) for u in urls for j in range(sizes[u])), case
        if n_shards >= world_size:
            readers = {u: {r for (r, _), s in slots.items() if u in s[0]} for u in urls}
            assert all(len(ranks) == 1 for ranks in readers.values()), case
        if n_shards >= world_size * num_workers:
            assert all(s[1] == 1 for s in slots.values()), case  # whole shards: none read twice
            per_slot = [len(s[0]) for s in slots.values()]
            assert max(per_slot) - min(per_slot) <= 1, case
        # with shards of equal size, no slot reads more than one shard's worth of samples beyond another
        counts = [len(_kept_samples(s, dict.fromkeys(urls, 6))) for s in slots.values()]
        assert max(counts) - min(counts) <= 6, case


@pytest.mark.parametrize("world_size", [2, 3])
def test_one_shard_is_split_by_sample_across_ranks(tmp_path, world_size: int) -> None:
    url = write_id_shard(tmp_path / "one-000000.tar", range(12))
    seen = []
    for rank in range(world_size):
        it = make_loader(
            [url], rank=rank, world_size=world_size, shuffle_buffer=0, batch_size=12 // world_size
        )
        first = set(batch_ids(next(it)))  # one epoch of this rank's share
        assert len(first) == 12 // world_size
        seen.append(first)
    assert set().union(*seen) == set(range(12)) and sum(map(len, seen)) == 12  # disjoint, complete


def test_a_slot_with_one_sample_per_epoch_repeats_it(tmp_path) -> None:
    url = write_id_shard(tmp_path / "one-000000.tar", range(1))
    assert batch_ids(next(make_loader([url], batch_size=3, shuffle_buffer=0))) == [0, 0, 0]


def test_deterministic_and_epoch_offset_changes_order(uneven) -> None:
    def first(n, **kw):
        return [batch_ids(b) for b in itertools.islice(make_loader(uneven, **kw), n)]

    assert first(6) == first(6)
    assert first(6, loader_workers=2) == first(6, loader_workers=2)
    assert first(6) != first(6, epoch_offset=1)
    assert first(6) != first(6, seed=1)
    # without a shuffle buffer, the first 5 batches of 4 are exactly one epoch of the 20 samples
    assert sorted(itertools.chain(*first(5, shuffle_buffer=0))) == list(range(20))


def test_loader_workers_split_an_epoch_without_repeats(tmp_path) -> None:
    """Each DataLoader worker reads its own slot: two shards of 8, two workers, so the first 4 batches of 4
    (2 per worker) are the epoch's 16 samples once each (a worker that ignored its id would repeat them)."""
    urls = [write_id_shard(tmp_path / f"w-{i:06d}.tar", range(8 * i, 8 * i + 8)) for i in range(2)]
    # workers=0 too: it runs the stream in this process, where mutation testing's coverage map can see it
    for workers in (0, 2):
        loader = make_loader(urls, loader_workers=workers, shuffle_buffer=0)
        ids = [i for b in itertools.islice(loader, 4) for i in batch_ids(b)]
        assert sorted(ids) == list(range(16)), workers


def test_synthetic_sum_draws_each_caption_uniformly(tmp_path) -> None:
    url = write_id_shard(tmp_path / "syn-000000.tar", range(50), syn=True)
    counts = np.zeros(K + 1, int)
    n = 0
    for b in itertools.islice(make_loader([url], batch_size=10), 120):
        assert (b["text"][:, 1] == 0).all()  # the real caption stays
        assert (b["syn_text"][:, 0] == b["text"][:, 0]).all()  # the same sample's synthetic caption
        counts += np.bincount(b["syn_text"][:, 1].numpy(), minlength=K + 1)
        n += 10
    assert counts[0] == 0
    freq = counts[1:] / n
    # 1200 draws: the standard error of each 0.25 is 0.0125; allow 4 of them
    assert np.all(np.abs(freq - 1 / K) < 0.05), freq


def test_synthetic_replace_probability(tmp_path) -> None:
    url = write_id_shard(tmp_path / "rep-000000.tar", range(50), syn=True)
    replaced: list[int] = []
    n = 0
    for b in itertools.islice(make_loader([url], batch_size=10, synthetic="replace", synthetic_p=0.3), 150):
        assert "syn_text" not in b
        assert (b["text"][:, 0] == torch.tensor(batch_ids(b))).all()  # the same sample's caption
        replaced += [int(r) for r in b["text"][:, 1] if r > 0]
        n += 10
    assert abs(len(replaced) / n - 0.3) < 0.04  # 1500 draws, standard error 0.012
    assert set(replaced) == set(range(1, K + 1))  # any of the synthetic captions replaces the real one
    b = next(make_loader([url], synthetic="off"))
    assert "syn_text" not in b and (b["text"][:, 1] == 0).all()


def test_caption_draws_are_reproducible(tmp_path) -> None:
    """A re-run (or a resumed run at the same step) draws the same synthetic captions; another seed others."""
    url = write_id_shard(tmp_path / "syn-000000.tar", range(24), syn=True)

    def draws(**kw: object) -> list[list[int]]:
        it = make_loader([url], rank=1, world_size=2, epoch_offset=3, **kw)
        return [b["syn_text"].tolist() for b in itertools.islice(it, 6)]

    assert draws() == draws()
    assert draws() != draws(seed=5)


def test_npz_teacher_embeddings_follow_the_drawn_caption(tmp_path) -> None:
    url = write_id_shard(tmp_path / "emb-000000.tar", range(12), syn=True, npz=True)
    for b in itertools.islice(make_loader([url]), 6):
        ids = b["text"][:, 0]
        assert b["teacher_image_emb"].shape == (4, D)
        torch.testing.assert_close(b["teacher_image_emb"], -ids[:, None].float().expand(4, D))
        # text_emb row r of sample i holds 1000*i + r: row 0 for the real caption, 1+j for syn caption j
        torch.testing.assert_close(b["teacher_text_emb"], (1000 * ids)[:, None].float().expand(4, D))
        syn_row = b["syn_text"][:, 1]
        torch.testing.assert_close(b["teacher_syn_emb"], (1000 * ids + syn_row)[:, None].float().expand(4, D))
    for b in itertools.islice(make_loader([url], synthetic="replace", synthetic_p=0.5), 6):
        row = b["text"][:, 1]
        torch.testing.assert_close(
            b["teacher_text_emb"], (1000 * b["text"][:, 0] + row)[:, None].float().expand(4, D)
        )
        assert "teacher_syn_emb" not in b


def test_stored_embeddings_off_are_not_passed_on(tmp_path) -> None:
    url = write_id_shard(tmp_path / "emb-000000.tar", range(8), syn=True, npz=True)
    b = next(make_loader([url], shard_embeddings=False))
    assert not any(k.startswith("teacher_") for k in b)


def test_shard_embeddings_usable_only_for_the_configured_teacher(tmp_path, caplog) -> None:
    url = write_id_shard(tmp_path / "emb-000000.tar", range(4), npz=True)
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
    url = write_id_shard(tmp_path / "t-000000.tar", range(8), syn=True)
    b = next(
        make_loader(
            [url],
            teacher_transform=lambda im: to_tensor(im) * 2,
            teacher_tokenizer=lambda t: id_tokens(t) + 100,
        )
    )
    torch.testing.assert_close(b["teacher_image"], b["image"] * 2)
    assert torch.equal(b["teacher_text"], b["text"] + 100)
    assert torch.equal(b["teacher_syn_text"], b["syn_text"] + 100)
    assert "teacher_image_emb" not in b


def test_shard_embeddings_usable_checks_every_folder(tmp_path, monkeypatch) -> None:
    teacher = TeacherCfg(name="mobileclip-s0", source="/w/teacher.pt")
    good = {
        "caption": {"teacher_embeddings": True},
        "teacher": {"name": "mobileclip-s0", "source": "/w/teacher.pt"},
    }

    def made_by(folder: Path, shard: str, config: dict) -> None:
        folder.mkdir()
        write_manifest(
            folder, Manifest(kind="cc12m-syn", shards=[{"name": shard, "samples": 4}], config=config)
        )

    made_by(tmp_path / "a", "x-000000.tar", good)
    made_by(tmp_path / "b", "y-000000.tar", {"teacher": good["teacher"]})  # no caption section at all
    a, b = str(tmp_path / "a" / "x-000000.tar"), str(tmp_path / "b" / "y-000000.tar")
    assert shard_embeddings_usable([a], teacher)
    assert not shard_embeddings_usable([b], teacher)
    assert not shard_embeddings_usable([a, b], teacher)
    # a bare file name means the current folder
    monkeypatch.chdir(tmp_path / "a")
    assert shard_embeddings_usable(["x-000000.tar"], teacher)


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog) -> None:
    url = write_id_shard(tmp_path / "bad-000000.tar", range(20), corrupt={3, 7, 11})
    with caplog.at_level(logging.WARNING, logger="siclip.data.loader"):
        batches = list(itertools.islice(make_loader([url], batch_size=5, shuffle_buffer=0), 6))
    ids = [i for b in batches for i in batch_ids(b)]
    assert not {3, 7, 11} & set(ids)
    assert set(ids) == set(range(20)) - {3, 7, 11}
    assert "skipping sample '000003'" in caplog.text and "3 skipped" in caplog.text


def test_many_bad_samples_are_logged_sparingly(tmp_path, caplog) -> None:
    """210 undecodable images: the good samples still come, the first skip names the sample, the shard and
    the error, and the log does not get one warning per skipped sample."""
    bad = 210
    url = write_id_shard(tmp_path / "bad-000000.tar", range(bad + 4), corrupt=set(range(bad)))
    with caplog.at_level(logging.WARNING, logger="siclip.data.loader"):
        batch = next(make_loader([url], batch_size=4, shuffle_buffer=0))
    assert sorted(batch_ids(batch)) == [bad, bad + 1, bad + 2, bad + 3]
    warnings = [r.getMessage() for r in caplog.records]
    assert "'000000'" in warnings[0] and url in warnings[0] and "UnidentifiedImageError" in warnings[0]
    assert len(warnings) < bad // 10


def test_a_caption_that_is_not_utf8_is_skipped(tmp_path, caplog) -> None:
    with AtomicShardWriter(tmp_path / "u-000000.tar") as w:
        for i in range(3):
            w.write({"__key__": f"{i:06d}", "png": id_png(i), "txt": b"\xff" if i == 1 else f"cap {i} 0"})
    with caplog.at_level(logging.WARNING, logger="siclip.data.loader"):
        b = next(make_loader([str(tmp_path / "u-000000.tar")], batch_size=4, shuffle_buffer=0))
    assert set(batch_ids(b)) == {0, 2}
    assert "'000001'" in caplog.text and "UnicodeDecodeError" in caplog.text


def test_truncated_shard_keeps_going(tmp_path, caplog) -> None:
    good = write_id_shard(tmp_path / "g-000000.tar", range(8))
    broken = write_id_shard(tmp_path / "g-000001.tar", range(100, 108))
    data = Path(broken).read_bytes()
    Path(broken).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="siclip.data.loader"):
        batches = itertools.islice(make_loader([good, broken], shuffle_buffer=0), 10)
        ids = {i for b in batches for i in batch_ids(b)}
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
    assert broken in caplog.text and "ShardIOError" in caplog.text  # the warning names the cut shard


def _write_mixed(path: Path, npz: bool) -> str:
    """Samples 0-3 with synthetic captions, 4 with an empty list, 5 with no ``syn_text``, 6-7 without syn.json."""
    with AtomicShardWriter(path) as w:
        for i in range(8):
            sample: dict[str, object] = {"__key__": f"{i:06d}", "png": id_png(i), "txt": f"cap {i} 0"}
            if i < 4:
                sample["syn.json"] = {"syn_text": [f"syn {i} {j + 1}" for j in range(K)]}
            elif i == 4:
                sample["syn.json"] = {"syn_text": []}
            elif i == 5:
                sample["syn.json"] = {"other": ["x"]}
            if npz:
                rows = np.stack([np.full(3, 1000 * i + r, np.float64) for r in range(1 + K)])
                sample["npz"] = {"image_emb": np.full(3, -i, np.float16), "text_emb": rows}
            w.write(sample)
    return str(path)


def test_batches_mixing_samples_with_and_without_synthetic_captions(tmp_path) -> None:
    url = _write_mixed(tmp_path / "mix-000000.tar", npz=True)
    ttok = lambda t: id_tokens(t) + 100  # noqa: E731
    for b in itertools.islice(make_loader([url], batch_size=8, shuffle_buffer=0, teacher_tokenizer=ttok), 3):
        assert sorted(batch_ids(b)) == list(range(8))  # no sample skipped for lacking synthetic captions
        syn = b["syn_text"]
        assert syn[:, 0].tolist() == batch_ids(b)
        has_syn = syn[:, 0] < 4
        assert (syn[has_syn, 1] >= 1).all() and (syn[~has_syn, 1] == 0).all()  # the real caption stands in
        assert torch.equal(b["teacher_syn_text"], syn + 100)
        # stored embeddings (any float dtype) come as float32, text rows matching the captions used
        ids = torch.tensor(batch_ids(b), dtype=torch.float32)
        assert b["teacher_image_emb"].dtype == b["teacher_text_emb"].dtype == torch.float32
        torch.testing.assert_close(b["teacher_image_emb"], -ids[:, None].expand(8, 3))
        torch.testing.assert_close(b["teacher_text_emb"], (1000.0 * ids)[:, None].expand(8, 3))
        want_syn = (1000 * syn[:, 0] + syn[:, 1]).float()[:, None].expand(8, 3)
        assert b["teacher_syn_emb"].dtype == torch.float32
        torch.testing.assert_close(b["teacher_syn_emb"], want_syn)


def _write_npz(path: Path, npz_of) -> str:
    with AtomicShardWriter(path) as w:
        for i in range(4):
            sample = {"__key__": f"{i:06d}", "png": id_png(i), "txt": f"cap {i} 0", "npz": npz_of(i)}
            w.write(sample)
    return str(path)


def test_augmented_image_embeddings_use_row_zero(tmp_path) -> None:
    url = _write_npz(
        tmp_path / "aug-000000.tar",
        lambda i: {
            "image_emb": np.stack([np.full(3, 10 * i + a, np.float32) for a in range(3)]),
            "text_emb": np.full((1, 3), i, np.float32),
        },
    )
    b = next(make_loader([url], shuffle_buffer=0))
    ids = torch.tensor(batch_ids(b), dtype=torch.float32)
    torch.testing.assert_close(b["teacher_image_emb"], (10.0 * ids)[:, None].expand(4, 3))
    torch.testing.assert_close(b["teacher_text_emb"], ids[:, None].expand(4, 3))


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda i: {"text_emb": np.zeros((1, 3), np.float32)}, id="no image_emb"),
        pytest.param(lambda i: {"image_emb": np.zeros(3, np.float32)}, id="no text_emb"),
        pytest.param(
            lambda i: {
                "image_emb": np.zeros((1, 1, 3), np.float32),
                "text_emb": np.zeros((1, 3), np.float32),
            },
            id="3-d image_emb",
        ),
        pytest.param(
            lambda i: {"image_emb": np.zeros(3, np.float32), "text_emb": np.zeros(3, np.float32)},
            id="1-d text_emb",
        ),
    ],
)
def test_unusable_embedding_layouts_are_ignored_not_fatal(tmp_path, layout) -> None:
    url = _write_npz(tmp_path / "odd-000000.tar", layout)
    b = next(make_loader([url], shuffle_buffer=0))
    assert sorted(batch_ids(b)) == [0, 1, 2, 3]
    assert not any(k.startswith("teacher_") for k in b)


def test_too_few_text_rows_for_the_drawn_caption_means_no_embeddings(tmp_path) -> None:
    # one text row (the real caption) but K synthetic captions: a drawn synthetic caption has no row
    with AtomicShardWriter(tmp_path / "few-000000.tar") as w:
        for i in range(4):
            w.write(
                {
                    "__key__": f"{i:06d}",
                    "png": id_png(i),
                    "txt": f"cap {i} 0",
                    "syn.json": {"syn_text": [f"syn {i} {j + 1}" for j in range(K)]},
                    "npz": {"image_emb": np.zeros(3, np.float32), "text_emb": np.zeros((1, 3), np.float32)},
                }
            )
    for b in itertools.islice(make_loader([str(tmp_path / "few-000000.tar")], shuffle_buffer=0), 3):
        assert sorted(batch_ids(b)) == [0, 1, 2, 3]
        assert not any(k.startswith("teacher_") for k in b)


def test_reservoir_shuffle_delays_a_sample_by_at_most_the_buffer(tmp_path) -> None:
    url = write_id_shard(tmp_path / "res-000000.tar", range(64))
    for size in (2, 5):
        out = [
            i
            for b in itertools.islice(make_loader([url], shuffle_buffer=size, batch_size=8), 6)
            for i in batch_ids(b)
        ]
        assert out != sorted(out)  # it does shuffle
        # output k is one of the first k + size inputs (the buffer holds `size`, the newest is never
        # yielded at once), and the buffer is used to its full size
        assert max(i - k for k, i in enumerate(out)) == size - 1, out


def test_brace_patterns_are_expanded(tmp_path) -> None:
    for s in range(3):
        write_id_shard(tmp_path / f"p-{s:06d}.tar", range(10 * s, 10 * s + 2))
    it = make_loader([str(tmp_path / "p-{000000..000002}.tar")], batch_size=6, shuffle_buffer=0)
    assert sorted(batch_ids(next(it))) == [0, 1, 10, 11, 20, 21]


def test_argument_errors_name_the_bad_value(uneven) -> None:
    with pytest.raises(ValueError, match="synthetic"):
        make_loader(uneven, synthetic="both")
    with pytest.raises(ValueError, match="rank 2"):
        make_loader(uneven, rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank -1"):
        make_loader(uneven, rank=-1, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(uneven, batch_size=0)
    with pytest.raises(ValueError, match="no training shards"):
        make_loader([])
    assert batch_ids(next(make_loader(uneven, batch_size=1, shuffle_buffer=0)))  # batch_size 1 is allowed


def test_too_few_samples_fails_instead_of_hanging(tmp_path) -> None:
    """A slot with nothing to read raises, naming the rank and the epoch, instead of waiting forever."""
    url = write_id_shard(tmp_path / "tiny-000000.tar", range(1))
    with pytest.raises(RuntimeError, match="no samples") as info:
        next(make_loader([url], rank=1, world_size=2, epoch_offset=4))
    assert "rank 1" in str(info.value) and "epoch 4" in str(info.value)


def test_reads_fsspec_uris(tmp_path) -> None:
    import fsspec

    local = write_id_shard(tmp_path / "m-000000.tar", range(6))
    url = "memory://siclip-test-loader/m-000000.tar"
    with fsspec.open(url, "wb") as f:
        f.write(Path(local).read_bytes())
    b = next(make_loader([url], batch_size=6, shuffle_buffer=0))
    assert sorted(batch_ids(b)) == list(range(6))
