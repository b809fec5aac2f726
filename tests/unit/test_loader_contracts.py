"""Training-loader contracts the behavioural tests in test_loader.py leave open.

Pinned here: the exact shard and sample split of every (rank, worker) slot against a reference written from the
docstring; the seeded random streams (shard order per epoch, caption draws per worker) that make a run
reproducible across siclip versions; the skip log (first 10, then every 100th, each naming the sample or shard
and the error); batches mixing samples with and without synthetic captions or teacher embeddings; the
``npz`` layouts that are used, converted or ignored; the reservoir shuffle's bounded delay; argument errors
and the documented defaults. No Ray.
"""

from __future__ import annotations

import itertools
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from siclip.config import TeacherCfg
from siclip.data.loader import build_train_loader, shard_embeddings_usable, slot_shards
from siclip.data.shards import AtomicShardWriter, Manifest, write_manifest
from tests.unit.test_loader import _ids, _jpeg, _loader, _tok, _transform, _write

K = 4  # synthetic captions per sample in _write


def _reference_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    order = list(urls)
    np.random.default_rng([seed, epoch, 0x5EED]).shuffle(order)
    return order


def _reference_slot(
    urls: list[str], *, epoch: int, seed: int, rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[list[str], int, int]:
    """The module docstring's three regimes, written out naively."""
    order = _reference_order(urls, seed, epoch)
    slots = world_size * num_workers
    slot = rank * num_workers + worker
    if len(order) >= slots:  # enough shards for every slot: shard i goes to slot i % slots
        return [u for i, u in enumerate(order) if i % slots == slot], 1, 0
    if len(order) >= world_size:  # enough for every rank: shards by rank, samples by index among workers
        return [u for i, u in enumerate(order) if i % world_size == rank], num_workers, worker
    return order, slots, slot  # fewer shards than ranks: everyone reads all, samples split across all slots


@pytest.mark.parametrize("n_shards", [1, 2, 3, 4, 5, 6, 8, 9])
def test_slot_shards_matches_the_reference_split(n_shards: int) -> None:
    urls = [f"s{i}" for i in range(n_shards)]
    for world_size, num_workers, epoch, seed in itertools.product((1, 2, 3), (1, 2, 3), (0, 1), (0, 7)):
        covered: list[tuple[str, int, int]] = []
        for rank, worker in itertools.product(range(world_size), range(num_workers)):
            args = {"epoch": epoch, "seed": seed, "rank": rank, "world_size": world_size}
            got = slot_shards(urls, worker=worker, num_workers=num_workers, **args)
            want = _reference_slot(urls, worker=worker, num_workers=num_workers, **args)
            assert got == want, (n_shards, world_size, num_workers, rank, worker)
            covered += [(u, got[1], got[2]) for u in got[0]]
        # every shard is read by some slot, and each (shard, kept residue) by exactly one
        assert {u for u, _, _ in covered} == set(urls)
        assert len(covered) == len(set(covered))


def test_epoch_shard_order_is_the_seeded_permutation() -> None:
    urls = [f"s{i}" for i in range(7)]
    for seed, epoch in itertools.product((0, 3), (0, 1, 5)):
        shards, _, _ = slot_shards(
            urls, epoch=epoch, seed=seed, rank=0, world_size=1, worker=0, num_workers=1
        )
        assert shards == _reference_order(urls, seed, epoch)


def test_samples_are_split_by_running_index_in_file_order(tmp_path) -> None:
    url = _write(tmp_path / "one-000000.tar", range(12))
    for rank in range(3):
        it = _loader([url], rank=rank, world_size=3, shuffle_buffer=0, batch_size=4)
        assert _ids(next(it)) == [i for i in range(12) if i % 3 == rank]  # one epoch of this slot
        assert _ids(next(it)) == [i for i in range(12) if i % 3 == rank]  # and the next epoch the same


def test_a_slot_with_one_sample_per_epoch_repeats_it(tmp_path) -> None:
    url = _write(tmp_path / "one-000000.tar", range(1))
    assert _ids(next(_loader([url], batch_size=3, shuffle_buffer=0))) == [0, 0, 0]


def test_an_empty_slot_names_the_numbers(tmp_path) -> None:
    url = _write(tmp_path / "tiny-000000.tar", range(1))
    msg = "rank 1 loader worker 0 got no samples in epoch 4 from 1 of 1 shards (modulus 2)"
    with pytest.raises(RuntimeError, match=re.escape(msg) + r".*loader_workers = 2\?$"):
        next(_loader([url], rank=1, world_size=2, epoch_offset=4))


def test_caption_draws_follow_the_seeded_per_worker_stream(tmp_path) -> None:
    # No shuffle buffer: the only draws are one caption index per sample, in file order, from the generator
    # seeded with (seed, epoch_offset, rank, worker); a resumed or re-run job draws the same captions.
    url = _write(tmp_path / "syn-000000.tar", range(24), syn=True)
    for seed, epoch_offset, rank in ((0, 0, 0), (5, 0, 0), (0, 3, 0), (0, 0, 1)):
        it = _loader([url], rank=rank, world_size=2, seed=seed, epoch_offset=epoch_offset, shuffle_buffer=0)
        rows = [r for b in itertools.islice(it, 6) for r in b["syn_text"][:, 1].tolist()]
        rng = np.random.default_rng([seed, epoch_offset, rank, 0, 0xBA7C4])
        assert rows == [1 + int(rng.integers(K)) for _ in rows]


def test_replace_draws_caption_then_coin_per_sample(tmp_path) -> None:
    url = _write(tmp_path / "rep-000000.tar", range(10), syn=True)
    it = _loader([url], shuffle_buffer=0, batch_size=10, synthetic="replace", synthetic_p=0.5)
    rows = [r for b in itertools.islice(it, 3) for r in b["text"][:, 1].tolist()]
    rng = np.random.default_rng([0, 0, 0, 0, 0xBA7C4])
    want = []
    for _ in rows:
        j = int(rng.integers(K))
        want.append(1 + j if rng.random() < 0.5 else 0)
    assert rows == want


def test_skips_are_logged_first_ten_then_every_hundredth(tmp_path, caplog) -> None:
    bad = 210
    url = _write(tmp_path / "bad-000000.tar", range(bad + 4), corrupt=set(range(bad)))
    with caplog.at_level(logging.WARNING, logger="siclip.data.loader"):
        batch = next(_loader([url], batch_size=4, shuffle_buffer=0))
    assert _ids(batch) == [bad, bad + 1, bad + 2, bad + 3]
    counts = [int(m) for m in re.findall(r"\((\d+) skipped so far", caplog.text)]
    assert counts == [*range(1, 11), 100, 200]
    assert f"skipping sample '000000' of {url}: UnidentifiedImageError" in caplog.text


def test_a_cut_shard_logs_the_rest_of_it_as_skipped(tmp_path, caplog) -> None:
    url = _write(tmp_path / "cut-000000.tar", range(8))
    data = Path(url).read_bytes()
    with tarfile.open(url) as tar:
        cut = tar.getmembers()[6].offset_data + 10  # inside the 4th sample's first member
    Path(url).write_bytes(data[:cut])
    with caplog.at_level(logging.WARNING, logger="siclip.data.loader"):
        list(itertools.islice(_loader([url], batch_size=2, shuffle_buffer=0), 6))  # into the 2nd epoch
    assert f"skipping the rest of shard {url}: ShardIOError" in caplog.text


def test_a_caption_that_is_not_utf8_is_skipped(tmp_path, caplog) -> None:
    with AtomicShardWriter(tmp_path / "u-000000.tar") as w:
        for i in range(3):
            w.write({"__key__": f"{i:06d}", "png": _jpeg(i), "txt": b"\xff" if i == 1 else f"cap {i} 0"})
    with caplog.at_level(logging.WARNING, logger="siclip.data.loader"):
        b = next(_loader([str(tmp_path / "u-000000.tar")], batch_size=4, shuffle_buffer=0))
    assert _ids(b) == [0, 2, 0, 2]
    assert "skipping sample '000001'" in caplog.text and "UnicodeDecodeError" in caplog.text


def _write_mixed(path: Path, npz: bool) -> str:
    """Samples 0-3 with synthetic captions, 4 with an empty list, 5 with no ``syn_text``, 6-7 without syn.json."""
    with AtomicShardWriter(path) as w:
        for i in range(8):
            sample: dict[str, object] = {"__key__": f"{i:06d}", "png": _jpeg(i), "txt": f"cap {i} 0"}
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
    ttok = lambda t: _tok(t) + 100  # noqa: E731
    for b in itertools.islice(_loader([url], batch_size=8, shuffle_buffer=0, teacher_tokenizer=ttok), 3):
        assert _ids(b) == list(range(8))  # no sample skipped for lacking synthetic captions
        syn = b["syn_text"]
        assert syn[:, 0].tolist() == list(range(8))
        assert (syn[:4, 1] >= 1).all() and (syn[4:, 1] == 0).all()  # the real caption stands in for 4-7
        assert torch.equal(b["teacher_syn_text"], syn + 100)
        # stored embeddings (any float dtype) come as float32, text rows matching the captions used
        assert b["teacher_image_emb"].dtype == b["teacher_text_emb"].dtype == torch.float32
        torch.testing.assert_close(b["teacher_image_emb"], -torch.arange(8.0)[:, None].expand(8, 3))
        torch.testing.assert_close(b["teacher_text_emb"], (1000.0 * torch.arange(8))[:, None].expand(8, 3))
        want_syn = (1000 * syn[:, 0] + syn[:, 1]).float()[:, None].expand(8, 3)
        assert b["teacher_syn_emb"].dtype == torch.float32
        torch.testing.assert_close(b["teacher_syn_emb"], want_syn)


def _write_npz(path: Path, npz_of) -> str:
    with AtomicShardWriter(path) as w:
        for i in range(4):
            sample = {"__key__": f"{i:06d}", "png": _jpeg(i), "txt": f"cap {i} 0", "npz": npz_of(i)}
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
    b = next(_loader([url], shuffle_buffer=0))
    torch.testing.assert_close(b["teacher_image_emb"], (10.0 * torch.arange(4))[:, None].expand(4, 3))
    torch.testing.assert_close(b["teacher_text_emb"], torch.arange(4.0)[:, None].expand(4, 3))


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
    b = next(_loader([url], shuffle_buffer=0))
    assert _ids(b) == [0, 1, 2, 3]
    assert not any(k.startswith("teacher_") for k in b)


def test_too_few_text_rows_for_the_drawn_caption_means_no_embeddings(tmp_path) -> None:
    # one text row (the real caption) but K synthetic captions: a drawn synthetic caption has no row
    with AtomicShardWriter(tmp_path / "few-000000.tar") as w:
        for i in range(4):
            w.write(
                {
                    "__key__": f"{i:06d}",
                    "png": _jpeg(i),
                    "txt": f"cap {i} 0",
                    "syn.json": {"syn_text": [f"syn {i} {j + 1}" for j in range(K)]},
                    "npz": {"image_emb": np.zeros(3, np.float32), "text_emb": np.zeros((1, 3), np.float32)},
                }
            )
    for b in itertools.islice(_loader([str(tmp_path / "few-000000.tar")], shuffle_buffer=0), 3):
        assert _ids(b) == [0, 1, 2, 3]
        assert not any(k.startswith("teacher_") for k in b)


def test_reservoir_shuffle_delays_a_sample_by_at_most_the_buffer(tmp_path) -> None:
    url = _write(tmp_path / "res-000000.tar", range(64))
    for size in (2, 5):
        out = [
            i for b in itertools.islice(_loader([url], shuffle_buffer=size, batch_size=8), 6) for i in _ids(b)
        ]
        assert out != sorted(out)  # it does shuffle
        # output k is one of the first k + size inputs (the buffer holds `size`, the newest is never
        # yielded at once), and the buffer is used to its full size
        assert max(i - k for k, i in enumerate(out)) == size - 1, out


def test_brace_patterns_are_expanded(tmp_path) -> None:
    for s in range(3):
        _write(tmp_path / f"p-{s:06d}.tar", range(10 * s, 10 * s + 2))
    it = _loader([str(tmp_path / "p-{000000..000002}.tar")], batch_size=6, shuffle_buffer=0)
    assert sorted(_ids(next(it))) == [0, 1, 10, 11, 20, 21]


def test_argument_errors_name_the_value(uneven) -> None:
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1, got 0$"):
        _loader(uneven, batch_size=0)
    with pytest.raises(ValueError, match=r"^no training shards in \[\]$"):
        _loader([])
    with pytest.raises(ValueError, match=r"rank -1 is not in \[0, world_size=2\)"):
        _loader(uneven, rank=-1, world_size=2)
    assert _ids(next(_loader(uneven, batch_size=1, shuffle_buffer=0)))  # batch_size 1 is allowed


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("uneven-contracts")
    return [_write(d / "a-000000.tar", range(0, 5)), _write(d / "a-000001.tar", range(5, 8))]


def test_defaults_are_the_documented_ones(tmp_path) -> None:
    # synthetic="sum", synthetic_p=0.5, loader_workers=2, shuffle_buffer=1000, seed=0, epoch_offset=0,
    # shard_embeddings=True: the defaults give exactly the batches of those values spelled out.
    urls = [
        _write(tmp_path / "d-000000.tar", range(0, 6), syn=True, npz=True),
        _write(tmp_path / "d-000001.tar", range(6, 12), syn=True, npz=True),
        _write(tmp_path / "d-000002.tar", range(12, 18), syn=True, npz=True),
    ]
    base = {
        "urls": urls,
        "batch_size": 4,
        "rank": 0,
        "world_size": 1,
        "transform": _transform,
        "tokenizer": _tok,
    }
    spelled = {
        "synthetic": "sum",
        "synthetic_p": 0.5,
        "loader_workers": 2,
        "shuffle_buffer": 1000,
        "seed": 0,
        "epoch_offset": 0,
        "shard_embeddings": True,
    }

    def first(**kw: object) -> list[dict[str, torch.Tensor]]:
        it = build_train_loader(**base, **kw)  # type: ignore[arg-type]
        out = list(itertools.islice(it, 3))
        del it
        return out

    default, explicit = first(), first(**spelled)
    for a, b in zip(default, explicit, strict=True):
        assert a.keys() == b.keys() and "teacher_syn_emb" in a
        assert all(torch.equal(a[k], b[k]) for k in a)
    # replace's default probability is 0.5
    replace = {**spelled, "synthetic": "replace", "loader_workers": 0}
    del replace["synthetic_p"]
    it = build_train_loader(**base, **replace)  # type: ignore[arg-type]
    rows = torch.cat([b["text"][:, 1] for b in itertools.islice(it, 100)])
    assert abs((rows > 0).float().mean().item() - 0.5) < 0.06  # 400 draws: standard error 0.025


def _made_by(folder: Path, shards: list[str], config: dict) -> None:
    write_manifest(
        folder, Manifest(kind="cc12m-syn", shards=[{"name": s, "samples": 4} for s in shards], config=config)
    )


def test_shard_embeddings_usable_checks_every_folder(tmp_path, monkeypatch) -> None:
    teacher = TeacherCfg(name="mobileclip-s0", source="/w/teacher.pt")
    good = {
        "caption": {"teacher_embeddings": True},
        "teacher": {"name": "mobileclip-s0", "source": "/w/teacher.pt"},
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _made_by(tmp_path / "a", ["x-000000.tar"], good)
    _made_by(tmp_path / "b", ["y-000000.tar"], {"teacher": good["teacher"]})  # no caption section at all
    a, b = str(tmp_path / "a" / "x-000000.tar"), str(tmp_path / "b" / "y-000000.tar")
    assert shard_embeddings_usable([a], teacher)
    assert not shard_embeddings_usable([b], teacher)
    assert not shard_embeddings_usable([a, b], teacher)
    # a bare file name means the current folder
    monkeypatch.chdir(tmp_path / "a")
    assert shard_embeddings_usable(["x-000000.tar"], teacher)
