"""A cached decoder for open_clip's CoCa: the same captions as ``CoCa.generate`` at a fraction of the cost.

open_clip 3.3.0's ``generate`` (top-p / top-k) re-runs the unimodal text tower and the multimodal decoder
over the whole prefix at every token, re-projects the cross-attention keys/values of every image token in
every layer at every step, and is fed images repeated ``k`` times for ``k`` captions. This module reads the
same weights and does each piece of work once:

- each image is encoded once; its tokens' cross-attention keys/values are projected once per layer and
  shared by its ``k`` caption rows (gathered per row, not recomputed);
- the self-attention keys/values of the text tower and of the decoder are cached per layer, so a step runs
  one new token per row through both towers;
- rows that produced EOS (or pad) leave the active batch, so finished captions cost nothing more;
- no host synchronisation per token: finished rows are masked on the device and the active batch is
  compacted only every ``sync_every`` tokens (on CPU, where there is no device to wait for, every token).

The maths is open_clip's (``TextTransformer``, ``MultimodalTransformer``, ``CoCa.generate``): the text tower
appends a CLS embedding *after* the text tokens, so under its causal mask it never affects them and is
skipped; the text tower's token outputs go to the decoder without ``ln_final``; logits are
``ln_final(x) @ text_projection`` of the last position. Sampling follows ``generate`` step for step:
``MinLengthLogitsProcessor`` (EOS is banned while the prefix is shorter than ``min_seq_len``), the top-p /
top-k warper of ``transformers`` (the same classes ``generate`` uses), ``softmax(logits / temperature)``,
``torch.multinomial(probs, 1)`` on the rows still running, and a forced EOS at the last position.

Equality with ``generate`` (tested in tests/unit/test_coca_decode.py, CPU, fp32):

- greedy (``generation_type='greedy'``) gives the tokens of ``generate(generation_type='top_k', top_k=1)``;
- with ``sync_every=1`` (the CPU default) the rows passed to each sampling call are exactly the rows
  ``generate`` samples, in the same order, so a seeded top-p run draws the same random numbers and gives the
  same tokens. With ``sync_every > 1`` finished rows stay in the batch (masked) until the next compaction
  and still take part in the sampling call, so the random stream, and therefore the sampled captions, differ
  from ``generate``'s (they are still reproducible for a seed and batch layout).
- "Identical" holds up to floating-point rounding: the cached path adds the same terms in a different order
  (one token against a cache instead of the full prefix under a mask), so a near-tie between two tokens could
  in principle resolve differently. No such case was seen in the tests.
- open_clip masks text-tower keys after a token equal to the text tower's ``pad_id`` (shifted by one
  position, its legacy CLS mask). Rows stop at ``pad_token_id`` so that mask never matters when the two ids
  are equal (always so in the Captioner); when they differ it is reproduced here too.

Beam search is not implemented here (the Captioner keeps open_clip's for ``method='beam'``).
No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

__all__ = ["CachedCoCaDecoder", "DecodeStats", "GenerationType"]

GenerationType = Literal["top_p", "top_k", "greedy"]
# Compacting the batch needs the number of finished rows on the host; on a GPU that stalls the queue of
# kernels, so it is done every few tokens and finished rows are masked in between.
_GPU_SYNC_EVERY = 8


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) on int64 tensors holding values below 2**32.

    The multipliers are below 2**31, so every product fits in int64 and CPU and GPU give the same bits.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


@dataclass
class DecodeStats:
    """What the last :meth:`CachedCoCaDecoder.generate` call did (for tests and benchmarks)."""

    images_encoded: int = 0
    rows: int = 0
    steps: int = 0
    syncs: int = 0
    active_rows: list[int] = field(default_factory=list)
    """Rows in the batch at each decoding step (shrinks as captions finish)."""


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[R, L, D]`` -> ``[R, H, L, D / H]``."""
    r, length, d = x.shape
    return x.view(r, length, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``[R, H, L, d]`` -> ``[R, L, H * d]``."""
    r, h, length, d = x.shape
    return x.transpose(1, 2).reshape(r, length, h * d)


def _check_block(block: Any, where: str) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    if not isinstance(block, ResidualAttentionBlock) or not block.attn.batch_first:
        raise ValueError(
            f"CachedCoCaDecoder: {where} is a {type(block).__name__}; only open_clip's default batch-first "
            "ResidualAttentionBlock is supported (use caption.decoder=open_clip for this model)"
        )


class CachedCoCaDecoder:
    """Captions from an open_clip ``CoCa`` (eval mode), with cached keys/values and shrinking batches.

    The model's own parameters are used as they are: put the model in bf16 on a GPU (the Captioner does) and
    the decoder computes in bf16, with logits and sampling in fp32.
    """

    def __init__(self, net: Any, *, sync_every: int = 0) -> None:
        text, dec = getattr(net, "text", None), getattr(net, "text_decoder", None)
        if text is None or dec is None or getattr(text, "cls_emb", None) is None:
            raise ValueError(
                "CachedCoCaDecoder: expected an open_clip CoCa (text tower with a CLS embedding and a "
                f"text_decoder), got {type(net).__name__}"
            )
        if getattr(text, "attn_mask", None) is None:
            raise ValueError("CachedCoCaDecoder: the CoCa text tower has no causal mask; cannot cache it")
        for i, blk in enumerate(text.transformer.resblocks):
            _check_block(blk, f"text.transformer.resblocks[{i}]")
        for i, (blk, xblk) in enumerate(zip(dec.resblocks, dec.cross_attn, strict=True)):
            _check_block(blk, f"text_decoder.resblocks[{i}]")
            _check_block(xblk, f"text_decoder.cross_attn[{i}]")
        if sync_every < 0:
            raise ValueError(
                f"sync_every: got {sync_every}; allowed: 0 (auto) or a positive number of tokens"
            )
        self.net, self.text, self.dec = net, text, dec
        self.sync_every = sync_every
        self.stats = DecodeStats()
        # Positions a caption may use: the text tower's (without its CLS slot) and the decoder's mask.
        self.max_positions = min(int(text.num_pos) - 1, int(dec.context_length))

    @property
    def device(self) -> torch.device:
        return self.text.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.token_embedding.weight.dtype

    # ------------------------------------------------------------------------------------- image side
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The decoder's image tokens ``[B, N, D]``, one forward pass of the image tower per image."""
        _, embs = self.net.visual(
            pixels.to(self.device, self.dtype)
        )  # (pooled, tokens), as CoCa.encode_image
        self.stats.images_encoded += int(pixels.shape[0])
        return embs

    def cross_keys_values(self, image_embs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per decoder layer, the cross-attention keys and values ``[B, H, N, d]`` of each image, once."""
        out = []
        for blk in self.dec.cross_attn:
            d, h = blk.attn.embed_dim, blk.attn.num_heads
            kv_in = blk.ln_1_kv(image_embs)
            w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
            k = F.linear(kv_in, w[d : 2 * d], b[d : 2 * d] if b is not None else None)
            v = F.linear(kv_in, w[2 * d :], b[2 * d :] if b is not None else None)
            out.append((_heads(k, h), _heads(v, h)))
        return out

    # ----------------------------------------------------------------------------------- text side
    @staticmethod
    def _self_block(
        blk: Any, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], t: int, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One causal self-attention block for the token at position ``t``, its key/value added to ``cache``."""
        h = blk.attn.num_heads
        q, k, v = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
        keys, values = cache
        keys[:, :, t : t + 1] = _heads(k, h)
        values[:, :, t : t + 1] = _heads(v, h)
        attn = F.scaled_dot_product_attention(
            _heads(q, h), keys[:, :, : t + 1], values[:, :, : t + 1], attn_mask=mask
        )
        x = x + blk.ls_1(blk.attn.out_proj(_merge(attn)))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    @staticmethod
    def _cross_block(blk: Any, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        d, h = blk.attn.embed_dim, blk.attn.num_heads
        b = blk.attn.in_proj_bias
        q = F.linear(blk.ln_1(x), blk.attn.in_proj_weight[:d], b[:d] if b is not None else None)
        attn = F.scaled_dot_product_attention(_heads(q, h), kv[0], kv[1])
        x = x + blk.ls_1(blk.attn.out_proj(_merge(attn)))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def _step(
        self,
        tokens: torch.Tensor,
        t: int,
        caches: list[tuple[torch.Tensor, torch.Tensor]],
        cross: list[tuple[torch.Tensor, torch.Tensor]],
        key_ok: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits ``[R, V]`` (fp32) for the token after ``tokens`` (``[R]``, at position ``t``)."""
        text = self.text
        x = text.token_embedding(tokens[:, None]).to(self.dtype)
        x = x + text.positional_embedding[t : t + 1].to(self.dtype)
        mask = key_ok[:, None, None, : t + 1] if key_ok is not None else None
        n_text = len(text.transformer.resblocks)
        for i, blk in enumerate(text.transformer.resblocks):
            x = self._self_block(blk, x, caches[i], t, mask)
        # The text tower's token outputs feed the decoder as they are (its ln_final is for the CLS only).
        for i, (blk, xblk) in enumerate(zip(self.dec.resblocks, self.dec.cross_attn, strict=True)):
            x = self._self_block(blk, x, caches[n_text + i], t, None)
            x = self._cross_block(xblk, x, cross[i])
        x = self.dec.ln_final(x)
        return (x[:, 0] @ self.dec.text_projection).float()

    # ------------------------------------------------------------------------------------ sampling
    @staticmethod
    def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if probs.device.type == "cpu":
            # generate()'s own call, so a seeded run draws the same numbers in the same order.
            return torch.multinomial(probs, 1, generator=generator)[:, 0]
        # torch.multinomial checks its input with .item() (a host sync per token on a GPU); this is the
        # same exponential race it runs for one sample, without the check.
        race = torch.empty_like(probs).exponential_(1, generator=generator)
        return (probs / race).argmax(dim=-1)

    @staticmethod
    def _sample_rows(probs: torch.Tensor, row_seeds: torch.Tensor, step: int) -> torch.Tensor:
        """One token per row from noise that depends only on (the row's seed, the step, the token).

        The exponential race ``argmax(p / E)`` with ``E ~ Exp(1)`` draws from ``p``; here ``E`` comes from a
        counter-based hash instead of a shared random stream, so a row's tokens are the same whatever other
        rows are in the batch, in which order, or whether finished rows are still in it.
        """
        vocab = torch.arange(probs.shape[-1], device=probs.device, dtype=torch.int64)
        h = _mix32((row_seeds[:, None] + _mix32(torch.tensor(step + 1, device=probs.device)) * 2) & _M32)
        h = _mix32((h + vocab[None, :]) & _M32)
        uniform = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1), never 0
        race = -torch.log(uniform)
        return (probs.float() / race).argmax(dim=-1)

    # ------------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(
        self,
        pixels: torch.Tensor,
        *,
        num_captions: int = 1,
        seq_len: int = 30,
        generation_type: GenerationType = "top_p",
        top_p: float = 0.1,
        top_k: int = 1,
        temperature: float = 1.0,
        min_seq_len: int = 5,
        sot_token_id: int = 49406,
        eos_token_id: int = 49407,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        row_seeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids ``[B * num_captions, L]`` like ``CoCa.generate`` on the images repeated ``num_captions``
        times (``repeat_interleave``): each row starts with ``sot_token_id``, ends with ``eos_token_id``
        (forced at position ``seq_len - 1``) and is padded with ``pad_token_id`` to the longest row.

        Defaults are ``generate``'s. ``generator`` defaults to torch's global one, as in ``generate``.
        ``row_seeds`` (``[B * num_captions]`` integers) replaces the random stream by per-row noise: each row's
        tokens then depend only on its image and its seed, not on the batch it is sampled in (no longer
        ``generate``'s tokens for a global seed).
        """
        if seq_len <= min_seq_len:
            raise ValueError(f"seq_len: got {seq_len}; must be larger than min_seq_len={min_seq_len}")
        if seq_len - 1 > self.max_positions:
            raise ValueError(
                f"seq_len: got {seq_len}; this CoCa has {self.max_positions} text positions "
                f"(at most seq_len={self.max_positions + 1})"
            )
        if num_captions < 1:
            raise ValueError(f"num_captions: got {num_captions}; must be at least 1")
        if generation_type not in ("top_p", "top_k", "greedy"):
            raise ValueError(f"generation_type: got {generation_type!r}; allowed: 'top_p', 'top_k', 'greedy'")
        warper: Any = None
        if generation_type == "top_p":
            from transformers import TopPLogitsWarper

            warper = TopPLogitsWarper(top_p)
        elif generation_type == "top_k":
            from transformers import TopKLogitsWarper

            warper = TopKLogitsWarper(top_k)
        pad = int(self.net.pad_id if pad_token_id is None else pad_token_id)
        sync_every = self.sync_every or (1 if self.device.type == "cpu" else _GPU_SYNC_EVERY)
        dev = self.device
        self.stats = DecodeStats()

        image_embs = self.encode_images(pixels)
        n_images = image_embs.shape[0]
        rows = n_images * num_captions
        # Rows are image-major (each image's captions in a row), as generate() sees repeat_interleave'd images.
        row_image = torch.arange(n_images, device=dev).repeat_interleave(num_captions)
        cross = [
            (k.index_select(0, row_image), v.index_select(0, row_image))
            for k, v in self.cross_keys_values(image_embs)
        ]
        steps = seq_len - 1  # positions 0 .. seq_len - 2 are fed; each step emits the next token
        caches = []
        for blk in [*self.text.transformer.resblocks, *self.dec.resblocks]:
            h, d = blk.attn.num_heads, blk.attn.embed_dim
            shape = (rows, h, steps, d // h)
            caches.append(
                (
                    torch.empty(shape, device=dev, dtype=self.dtype),
                    torch.empty(shape, device=dev, dtype=self.dtype),
                )
            )
        # open_clip's text tower hides the keys of its pad id (one position late, in its legacy CLS mode);
        # this matters only when rows do not stop at that id.
        text_pad = int(self.text.pad_id)
        key_ok = torch.ones(rows, steps, dtype=torch.bool, device=dev) if pad != text_pad else None

        out = torch.full((rows, seq_len), pad, dtype=torch.long, device=dev)
        out[:, 0] = sot_token_id
        active = torch.arange(rows, device=dev)  # original row of each row in the batch
        seeds: torch.Tensor | None = None
        if row_seeds is not None:
            if row_seeds.shape != (rows,):
                raise ValueError(
                    f"row_seeds: got shape {tuple(row_seeds.shape)}; need ({rows},), one per row"
                )
            seeds = row_seeds.to(device=dev, dtype=torch.int64) & _M32
        tokens = torch.full((rows,), sot_token_id, dtype=torch.long, device=dev)
        finished = torch.zeros(rows, dtype=torch.bool, device=dev)
        for t in range(steps):
            cur_len = t + 1
            self.stats.active_rows.append(int(active.numel()))
            logits = self._step(tokens, t, caches, cross, key_ok)
            if cur_len + 1 == seq_len:
                nxt = torch.full_like(tokens, eos_token_id)
            else:
                if cur_len < min_seq_len:  # MinLengthLogitsProcessor (a fill, not a host-to-device index)
                    logits[:, eos_token_id] = -float("inf")
                if warper is None:
                    nxt = logits.argmax(dim=-1)
                else:
                    probs = F.softmax(warper(None, logits) / temperature, dim=-1)
                    if seeds is None:
                        nxt = self._sample(probs, generator)
                    else:
                        nxt = self._sample_rows(probs, seeds.index_select(0, active), t)
            nxt = torch.where(finished, pad, nxt)
            out[active, cur_len] = nxt
            finished = finished | (nxt == eos_token_id) | (nxt == pad)
            if cur_len + 1 == seq_len:
                break
            if key_ok is not None:
                # Legacy mode: the pad test of the token at position p decides key p + 1; corrected: key p.
                pos = cur_len if self.text.correct_cls_mask else cur_len + 1
                if pos < steps:
                    key_ok[:, pos] = nxt != text_pad
            # Finished rows are fed a valid token until they leave the batch; their outputs are discarded.
            tokens = torch.where(finished, sot_token_id, nxt)
            if cur_len % sync_every == 0:
                self.stats.syncs += 1
                keep = (~finished).nonzero()[:, 0]
                if keep.numel() == 0:
                    break
                if keep.numel() < active.numel():
                    active, tokens, finished = active[keep], tokens[keep], finished[keep]
                    caches = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in caches]
                    cross = [(k.index_select(0, keep), v.index_select(0, keep)) for k, v in cross]
                    if key_ok is not None:
                        key_ok = key_ok.index_select(0, keep)
        self.stats.rows, self.stats.steps = rows, len(self.stats.active_rows)
        # Like generate(), the output is as wide as the longest caption (its EOS included).
        ended = (out[:, 1:] == eos_token_id) | (out[:, 1:] == pad)
        width = int(ended.int().argmax(dim=1).max()) + 2
        return out[:, :width]
