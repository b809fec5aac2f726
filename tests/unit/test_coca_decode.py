"""The cached CoCa decoder against open_clip's ``generate`` on a tiny random CoCa (CPU, fp32).

Greedy and seeded top-p tokens must be identical to ``generate``'s on the images repeated k times, each image
must be encoded once for its k captions, and finished rows must leave the batch.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from PIL import Image

from siclip.data.captioner import Captioner, CompactVocab, build_captioner_model
from siclip.data.coca_decode import CachedCoCaDecoder

IDS = {"sot_token_id": CompactVocab.SOT, "eos_token_id": CompactVocab.EOT, "pad_token_id": CompactVocab.PAD}
K = 4


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def net() -> Any:
    torch.manual_seed(0)
    return build_captioner_model("siclip-tiny-coca", "").net


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _reference(net: Any, pixels: torch.Tensor, seed: int, **kwargs: Any) -> torch.Tensor:
    torch.manual_seed(seed)
    return net.generate(pixels.repeat_interleave(K, dim=0), **kwargs)


def _cached(dec: CachedCoCaDecoder, pixels: torch.Tensor, seed: int, **kwargs: Any) -> torch.Tensor:
    torch.manual_seed(seed)
    return dec.generate(pixels, num_captions=K, **kwargs)


def _frequent_token(tokens: torch.Tensor) -> int:
    """The sampled token that most rows use after the minimum length (a stand-in EOS that ends rows early)."""
    counts: dict[int, int] = {}
    for row in tokens[:, 5:-1].tolist():
        for t in set(row) - {CompactVocab.PAD, CompactVocab.EOT}:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=lambda t: (counts[t], -t))


@pytest.mark.parametrize("case", ["early_eos", "pad_inside"])
def test_greedy_tokens_equal_generate(net: Any, pixels: torch.Tensor, case: str) -> None:
    kwargs: dict[str, Any] = {"seq_len": 24, **IDS}
    frequent = _frequent_token(_reference(net, pixels, 0, generation_type="top_k", top_k=1, **kwargs))
    if case == "early_eos":  # an EOS the captions reach at different steps
        kwargs["eos_token_id"] = frequent
    else:
        # Rows that do not stop at the text tower's pad id: open_clip then masks text-tower keys after it
        # (one position late, its legacy CLS mask), and so must the cached decoder.
        net = copy.deepcopy(net)
        net.text.pad_id = frequent
        kwargs["pad_token_id"] = -1
    ref = _reference(net, pixels, 0, generation_type="top_k", top_k=1, **kwargs)
    for sync_every in (1, 4):
        dec = CachedCoCaDecoder(net, sync_every=sync_every)
        got = _cached(dec, pixels, 0, generation_type="greedy", **kwargs)
        assert torch.equal(got, ref), (sync_every, got, ref)
    if case == "early_eos":
        assert (ref[:, -1] == kwargs["pad_token_id"]).any() and ref.shape[1] == 24  # some ended early
    else:
        assert (ref[:, 1:-1] == frequent).any()


def test_seeded_top_p_equals_generate_and_drops_finished_rows(net: Any, pixels: torch.Tensor) -> None:
    dec = CachedCoCaDecoder(net)
    kwargs: dict[str, Any] = {"seq_len": 24, "generation_type": "top_p", "top_p": 0.9, **IDS}
    ref = _reference(net, pixels, 7, **kwargs)
    got = _cached(dec, pixels, 7, **kwargs)
    assert torch.equal(got, ref)
    assert _cached(dec, pixels, 8, **kwargs).tolist() != got.tolist()  # the seed matters

    # With an EOS that rows sample at different steps, finished rows leave the batch at once (CPU: every
    # token), and the captions are still generate()'s: the same rows go to each sampling call.
    kwargs.update(
        top_p=0.5, eos_token_id=_frequent_token(_reference(net, pixels, 3, **{**kwargs, "top_p": 0.5}))
    )
    ref = _reference(net, pixels, 3, **kwargs)
    got = _cached(dec, pixels, 3, **kwargs)
    assert torch.equal(got, ref)
    active = dec.stats.active_rows
    ended = (ref[:, 1:] == kwargs["eos_token_id"]) | (ref[:, 1:] == CompactVocab.PAD)
    ends = [int(e) + 1 for e in ended.int().argmax(dim=1)]  # position of each row's last token
    assert len(set(ends)) > 1, ends  # rows finished at different steps
    # Rows in the batch at step t (which emits position t + 1) = rows not finished before position t + 1.
    assert active == [sum(e >= t + 1 for e in ends) for t in range(len(active))]
    assert active[-1] < active[0] == 3 * K

    # Compacting every 4 tokens: rows leave only at those steps; greedy-free sampling is still seeded.
    lazy = CachedCoCaDecoder(net, sync_every=4)
    first = _cached(lazy, pixels, 3, **kwargs)
    assert torch.equal(_cached(lazy, pixels, 3, **kwargs), first)
    shrink_steps = [
        t
        for t in range(1, len(lazy.stats.active_rows))
        if lazy.stats.active_rows[t] < lazy.stats.active_rows[t - 1]
    ]
    assert shrink_steps and all(t % 4 == 0 for t in shrink_steps), lazy.stats.active_rows
    assert lazy.stats.syncs < dec.stats.syncs


def test_each_image_encoded_once(net: Any, pixels: torch.Tensor) -> None:
    seen: list[int] = []
    hook = net.visual.register_forward_hook(lambda _m, args, _out: seen.append(int(args[0].shape[0])))
    try:
        dec = CachedCoCaDecoder(net)
        out = _cached(dec, pixels, 0, seq_len=12, generation_type="top_p", top_p=0.9, **IDS)
        assert seen == [3] and dec.stats.images_encoded == 3
        assert out.shape[0] == 3 * K and dec.stats.rows == 3 * K
        seen.clear()
        _reference(net, pixels, 0, seq_len=12, generation_type="top_p", top_p=0.9, **IDS)
        assert seen == [3 * K]  # open_clip encodes each image once per caption
    finally:
        hook.remove()


def test_captioner_decoders_give_the_same_captions() -> None:
    images = [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "green")]
    kwargs: dict[str, Any] = {"num_captions": 3, "max_length": 12, "batch_size": 2, "seed": 0}
    cached = Captioner("tiny-coca", "", decoder="cached", **kwargs)
    plain = Captioner("tiny-coca", "", decoder="open_clip", **kwargs)
    assert cached.decoder is not None and plain.decoder is None
    got = cached.caption(images, seed=5)
    assert got == plain.caption(images, seed=5)
    assert [len(c) for c in got] == [3, 3, 3] and any(t for c in got for t in c)
    with pytest.raises(ValueError, match=r"caption\.decoder: got 'fast'"):
        Captioner("tiny-coca", "", decoder="fast", **kwargs)


def test_device_sampler_draws_like_multinomial() -> None:
    # On a GPU the decoder samples by the exponential race torch.multinomial runs for one sample, minus its
    # host-syncing input check; on CPU the two must agree draw for draw.
    probs = torch.softmax(torch.randn(6, 50, generator=torch.Generator().manual_seed(0)), dim=-1)
    probs[:, 30:] = 0  # as after top-p filtering
    want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(4))[:, 0]
    race = torch.empty_like(probs).exponential_(1, generator=torch.Generator().manual_seed(4))
    assert torch.equal((probs / race).argmax(dim=-1), want)
    assert torch.equal(CachedCoCaDecoder._sample(probs, torch.Generator().manual_seed(4)), want)


def test_bf16_weights_decode(net: Any, pixels: torch.Tensor) -> None:
    # The GPU recipe (bf16 weights, lazy compaction), run on CPU: valid captions, fp32 logits for sampling.
    dec = CachedCoCaDecoder(copy.deepcopy(net).to(torch.bfloat16), sync_every=3)
    assert dec.dtype == torch.bfloat16
    out = _cached(dec, pixels, 0, seq_len=10, generation_type="top_p", top_p=0.9, **IDS)
    assert out.shape[0] == 3 * K and out.shape[1] <= 10
    assert (out[:, 0] == CompactVocab.SOT).all() and int(out.max()) < 512 and int(out.min()) >= 0
    assert ((out == CompactVocab.EOT) | (out == CompactVocab.PAD)).any(dim=1).all()  # every caption ended


def test_refuses_what_it_cannot_do(net: Any, pixels: torch.Tensor) -> None:
    dec = CachedCoCaDecoder(net)
    with pytest.raises(ValueError, match="seq_len: got 40; this CoCa has 32 text positions"):
        dec.generate(pixels, seq_len=40, **IDS)
    with pytest.raises(ValueError, match="generation_type: got 'beam_search'"):
        dec.generate(pixels, generation_type="beam_search", **IDS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected an open_clip CoCa"):
        CachedCoCaDecoder(torch.nn.Linear(2, 2))
