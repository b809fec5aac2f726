"""The loader across epochs: shard order reshuffled every epoch, ``epoch_offset`` honoured, resume semantics.

Six one-batch shards and no shuffle buffer, so each batch is one whole shard and the batch sequence *is* the
shard order. Resume (``train_worker``): the checkpoint stores no position inside the stream; the resumed
loader is built with ``epoch_offset = step``, so it starts the shard order of epoch ``step`` from its first
sample. Pinned below: the rest of the interrupted epoch is skipped, every sample comes again in the new
epoch (a full epoch, nothing lost for good), and the resumed stream is a pure function of the step.
"""

from __future__ import annotations

import itertools

import pytest

from tests.data_fixtures import batch_ids, make_loader, write_id_shard

SHARDS, PER_SHARD = 6, 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("epochs")
    return [write_id_shard(d / f"e-{s:06d}.tar", range(10 * s, 10 * s + PER_SHARD)) for s in range(SHARDS)]


def shard_orders(urls: list[str], epochs: int, **kw) -> list[tuple[int, ...]]:
    """The shard (by its first sample id // 10) of each batch, one tuple per epoch."""
    it = make_loader(urls, batch_size=PER_SHARD, shuffle_buffer=0, **kw)
    firsts = [batch_ids(b)[0] // 10 for b in itertools.islice(it, epochs * SHARDS)]
    return [tuple(firsts[e * SHARDS : (e + 1) * SHARDS]) for e in range(epochs)]


def test_every_epoch_reads_every_shard_once_in_a_new_order(shards) -> None:
    orders = shard_orders(shards, 5)
    for order in orders:
        assert sorted(order) == list(range(SHARDS))
    for previous, current in itertools.pairwise(orders):
        assert previous != current, orders  # a loader that reuses epoch 0's order fails here


def test_epoch_offset_starts_at_that_epoch_of_the_same_sequence(shards) -> None:
    from_zero = shard_orders(shards, 4)
    assert shard_orders(shards, 2, epoch_offset=2) == from_zero[2:4]
    assert shard_orders(shards, 1, epoch_offset=3) == from_zero[3:4]


def test_resume_skips_the_rest_of_the_epoch_and_replays_a_full_one(shards) -> None:
    seen_before_kill = 3  # batches (= shards) trained on in epoch 0 before the run stopped at step 3
    uninterrupted = [
        batch_ids(b) for b in itertools.islice(make_loader(shards, batch_size=2, shuffle_buffer=0), 12)
    ]
    resumed = [
        batch_ids(b)
        for b in itertools.islice(
            make_loader(shards, batch_size=2, shuffle_buffer=0, epoch_offset=seen_before_kill), 6
        )
    ]
    # what a resumed run reads is decided by the step alone
    again = [
        batch_ids(b)
        for b in itertools.islice(
            make_loader(shards, batch_size=2, shuffle_buffer=0, epoch_offset=seen_before_kill), 6
        )
    ]
    assert resumed == again
    # not the continuation of the interrupted epoch ...
    assert resumed[:3] != uninterrupted[seen_before_kill:6]
    # ... but a full epoch: every sample again, each once (the 3 shards already seen are replayed)
    assert sorted(i for b in resumed for i in b) == sorted(
        10 * s + j for s in range(SHARDS) for j in range(PER_SHARD)
    )
