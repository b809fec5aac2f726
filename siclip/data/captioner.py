"""The CoCa captioner of the data stage (CC12M -> CC12M-SYN) and the tiny demo CoCa it is tested with.

This module owns:
- :class:`Captioner`: an open_clip CoCa (``coca_ViT-L-14`` + ``mscoco_finetuned_laion2B-s13B-b90k`` in the
  production recipe; a pretrained tag, a ``.pt``/``.safetensors`` file, ``local-dir:PATH``, or random init)
  that gives ``k`` captions per image by top-p sampling (or one by beam search), batched and cleaned the
  DataCompDR way (special tokens dropped, cut at the first period);
- :func:`clean_caption`: that cleaning, on its own so it can be tested;
- :func:`generate_tokens`: one captioning call through either decoder, the cached one of
  ``siclip.data.coca_decode`` (default: each image encoded once, keys/values cached, same tokens) or
  open_clip's ``generate``;
- :func:`train_captioner` / :func:`captioner_loss`: the tiny demo CoCa (``siclip-tiny-coca``) trained on
  the demo world's clean subset with open_clip's ``CoCaLoss`` in a plain CPU torch loop;
- :class:`CompactVocab`: the tiny CoCa tokenises with open_clip's ``SimpleTokenizer`` but predicts over
  a 512-entry table of the token ids its training captions use (49,408 output classes per token would
  cost ~100x more compute than the rest of the model, and the demo must train in minutes on 2 cores).

No Ray here: the Ray Data actors that wrap :class:`Captioner` live in ``siclip.data.pipeline``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "TINY_COCA",
    "Captioner",
    "CompactVocab",
    "build_captioner_model",
    "captioner_loss",
    "clean_caption",
    "generate_tokens",
    "register_model_configs",
    "special_token_ids",
    "train_captioner",
]

log = logging.getLogger(__name__)

TINY_COCA = "siclip-tiny-coca"
# CaptionCfg.model documents the short name; both spellings mean the same registered config.
_ALIASES = {"tiny-coca": TINY_COCA}
_CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"
_SOT, _EOT = "<start_of_text>", "<end_of_text>"
_registered = False


def register_model_configs() -> None:
    """Register siclip's open_clip model configs (the tiny CoCa among them) once per process."""
    global _registered
    if _registered:
        return
    import open_clip

    path = _CONFIG_DIR / f"{TINY_COCA}.json"
    if TINY_COCA not in open_clip.list_models():
        open_clip.add_model_config(str(path))
    _registered = True


def clean_caption(text: str) -> str:
    """Drop the start token and everything from the end token on, cut at the first period, tidy spaces.

    Everything after ``<end_of_text>`` is padding (token 0 decodes to ``!``), so it is cut before the
    period rule; the period rule is DataCompDR's (one sentence per caption).
    """
    text = text.replace(_SOT, "")
    text = text.split(_EOT, 1)[0]
    text = text.split(".", 1)[0]
    return " ".join(text.split())


_SOT_ID, _EOT_ID = 49406, 49407  # SimpleTokenizer's start/end ids


@dataclass(frozen=True)
class CompactVocab:
    """A table from compact token ids to ``SimpleTokenizer`` ids: 0 pad, 1 start, 2 end, 3 unknown.

    Ids 4.. are the training captions' tokens, most frequent first; tokens beyond the table become
    "unknown", which is dropped when decoding.
    """

    ids: tuple[int, ...]

    PAD, SOT, EOT, UNK = 0, 1, 2, 3

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, *, size: int) -> CompactVocab:
        """The table for a batch of ``SimpleTokenizer`` outputs (``[N, L]``), at most ``size`` entries."""
        counts = Counter(int(t) for t in tokens.flatten().tolist() if t not in (0, _SOT_ID, _EOT_ID))
        common = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][: size - 4]
        return cls((0, _SOT_ID, _EOT_ID, -1, *common))

    @classmethod
    def default(cls, size: int) -> CompactVocab:
        """The table of an untrained tiny CoCa: the first ``size - 4`` byte-level tokens."""
        return cls((0, _SOT_ID, _EOT_ID, -1, *range(1, size - 3)))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """``SimpleTokenizer`` ids -> compact ids (same shape)."""
        table = torch.full((max(_EOT_ID, *self.ids) + 1,), self.UNK, dtype=torch.long)
        for compact, original in enumerate(self.ids):
            if original >= 0:
                table[original] = compact
        return table[tokens.clamp(min=0, max=table.numel() - 1)]

    def decode_ids(self, compact: Sequence[int]) -> list[int]:
        """Compact ids -> ``SimpleTokenizer`` ids, dropping unknowns and padding."""
        out = [self.ids[i] for i in compact if 0 < i < len(self.ids)]
        return [t for t in out if t > 0]

    def to_json(self) -> str:
        return json.dumps(list(self.ids))

    @classmethod
    def from_json(cls, text: str) -> CompactVocab:
        return cls(tuple(int(t) for t in json.loads(text)))


def special_token_ids(vocab: CompactVocab | None) -> dict[str, int]:
    """``sot_token_id``, ``eos_token_id``, ``pad_token_id`` for ``generate``: SimpleTokenizer's, or the tiny
    CoCa's compact ones."""
    if vocab is None:
        return {"sot_token_id": _SOT_ID, "eos_token_id": _EOT_ID, "pad_token_id": 0}
    return {
        "sot_token_id": CompactVocab.SOT,
        "eos_token_id": CompactVocab.EOT,
        "pad_token_id": CompactVocab.PAD,
    }


def generate_tokens(
    net: Any, pixels: torch.Tensor, *, num_captions: int, decoder: Any = None, **kwargs: Any
) -> torch.Tensor:
    """Token ids ``[B * num_captions, L]`` for images ``[B, 3, H, W]`` (each image's captions in a row).

    ``decoder`` (a :class:`~siclip.data.coca_decode.CachedCoCaDecoder` over ``net``) encodes each image once;
    without it, open_clip's ``generate`` runs on the images repeated ``num_captions`` times, under bf16
    autocast on a GPU. ``kwargs`` are ``generate``'s (``seq_len``, ``generation_type``, ``top_p``, ids ...).
    """
    if decoder is not None:
        return decoder.generate(pixels, num_captions=num_captions, **kwargs)  # type: ignore[no-any-return]
    device = pixels.device
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        return net.generate(pixels.repeat_interleave(num_captions, dim=0), **kwargs)  # type: ignore[no-any-return]


def _safetensors_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def _init_decoder_projection(net: Any) -> None:
    """Initialise the CoCa decoder's output projection, which open_clip 3.3.0 leaves as ``torch.empty``.

    Its ``MultimodalTransformer.init_parameters`` refers to a missing attribute and is never called, so a
    CoCa built without pretrained weights holds whatever memory was there (NaN here, for the tiny CoCa).
    """
    proj = getattr(getattr(net, "text_decoder", None), "text_projection", None)
    if isinstance(proj, torch.nn.Parameter):
        with torch.no_grad():
            torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)


@dataclass
class CaptionModel:
    """An open_clip CoCa with its eval transform, tokenizer and (tiny CoCa only) compact vocabulary."""

    net: Any
    preprocess: Any
    tokenizer: Any
    vocab: CompactVocab | None
    name: str


def build_captioner_model(
    model: str, source: str = "", *, device: str | torch.device = "cpu"
) -> CaptionModel:
    """Build an open_clip CoCa (eval mode, frozen) and what captioning with it needs.

    ``source`` is an open_clip pretrained tag, a ``.pt``/``.pth``/``.bin``/``.safetensors`` file (a file
    written by :func:`train_captioner` carries its model name, image size and vocabulary), ``local-dir:PATH``
    (an open_clip folder with its own config; ``model`` is then ignored), or empty for random init.
    """
    import open_clip

    register_model_configs()
    name = _ALIASES.get(model, model)
    kwargs: dict[str, Any] = {}
    pretrained: str | None = source or None
    meta: dict[str, str] = {}
    if source.startswith("local-dir:"):
        name, pretrained = source, None
    elif source.endswith(".safetensors") and os.path.isfile(source):
        meta = _safetensors_metadata(source)
        name = _ALIASES.get(meta.get("model", name), meta.get("model", name))
        if "image_size" in meta:
            kwargs["force_image_size"] = int(meta["image_size"])
    net, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device, **kwargs
    )
    if not hasattr(net, "generate"):
        raise ValueError(f"caption.model: {model!r} is not a CoCa model (it has no generate())")
    if pretrained is None and not name.startswith("local-dir:"):
        _init_decoder_projection(net)
    vocab: CompactVocab | None = None
    if name == TINY_COCA:
        size = int(net.text.vocab_size) if hasattr(net.text, "vocab_size") else 512
        vocab = CompactVocab.from_json(meta["vocab"]) if "vocab" in meta else CompactVocab.default(size)
    net.eval().requires_grad_(False)
    return CaptionModel(net, preprocess, open_clip.get_tokenizer(name), vocab, name)


class Captioner:
    """k captions per image from an open_clip CoCa, batched, cleaned, reproducible for a given seed.

    ``method='top_p'`` samples ``num_captions`` captions per image (nucleus ``top_p``); ``method='beam'``
    gives one caption per image, since beam search is deterministic and repeating it would only duplicate.
    ``decoder='cached'`` (default) samples with :class:`~siclip.data.coca_decode.CachedCoCaDecoder` (weights
    in bf16 on a GPU; on CPU the same captions as ``'open_clip'`` for a seed), ``'open_clip'`` with open_clip's
    ``generate``; beam search always uses open_clip's. ``sync_every``: see ``caption.sync_every``.
    """

    def __init__(
        self,
        model: str = "coca_ViT-L-14",
        source: str = "mscoco_finetuned_laion2B-s13B-b90k",
        *,
        num_captions: int = 5,
        method: str = "top_p",
        top_p: float = 0.9,
        max_length: int = 30,
        batch_size: int = 16,
        seed: int = 0,
        device: str = "auto",
        decoder: str = "cached",
        sync_every: int = 0,
    ) -> None:
        if method not in ("top_p", "beam"):
            raise ValueError(f"caption.method: got {method!r}; allowed: 'top_p', 'beam'")
        if decoder not in ("cached", "open_clip"):
            raise ValueError(f"caption.decoder: got {decoder!r}; allowed: 'cached', 'open_clip'")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model_name, self.source = model, source
        torch.manual_seed(seed)  # before building: a randomly initialised model is then the same everywhere
        built = build_captioner_model(model, source, device=self.device)
        self.model, self.preprocess, self.vocab = built.net, built.preprocess, built.vocab
        context = int(getattr(self.model, "context_length", max_length))
        # generate() needs seq_len > min_seq_len (5) and positions for every token it emits.
        self.max_length = max(6, min(max_length, context))
        self.num_captions = num_captions if method == "top_p" else 1
        self.method, self.top_p = method, top_p
        self.batch_size, self.seed = batch_size, seed
        self.decoder: Any = None
        if decoder == "cached" and method == "top_p":
            from siclip.data.coca_decode import CachedCoCaDecoder

            if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
                self.model.to(torch.bfloat16)
            self.decoder = CachedCoCaDecoder(self.model, sync_every=sync_every)

    @property
    def name(self) -> str:
        """``model:source``, recorded in the manifest as the producer."""
        return f"{self.model_name}:{self.source}" if self.source else self.model_name

    def _generate(self, pixels: torch.Tensor, k: int, seeds: Sequence[int] | None = None) -> list[str]:
        """``k`` cleaned captions for each image of ``pixels``, image by image (``seeds``: one per image)."""
        import open_clip

        kwargs: dict[str, Any] = {"seq_len": self.max_length}
        if self.vocab is not None:
            kwargs.update(special_token_ids(self.vocab))
        if self.method == "top_p":
            kwargs.update(generation_type="top_p", top_p=self.top_p)
        else:
            kwargs.update(generation_type="beam_search")
        if seeds is None or self.method != "top_p":  # beam search draws nothing: no seed to give
            tokens = generate_tokens(self.model, pixels, num_captions=k, decoder=self.decoder, **kwargs)
            rows = list(tokens.cpu())
        elif self.decoder is not None:
            row_seeds = torch.tensor([zlib.crc32(f"{s}:{j}".encode()) for s in seeds for j in range(k)])
            tokens = self.decoder.generate(pixels, num_captions=k, row_seeds=row_seeds, **kwargs)
            rows = list(tokens.cpu())
        else:  # open_clip's generate samples from the global stream: one image per call, seeded
            rows = []
            for i, s in enumerate(seeds):
                torch.manual_seed(s)
                rows.extend(generate_tokens(self.model, pixels[i : i + 1], num_captions=k, **kwargs).cpu())
        if self.vocab is not None:
            rows = [torch.tensor(self.vocab.decode_ids(r.tolist())) for r in rows]
        return [clean_caption(open_clip.decode(t)) for t in rows]

    def preprocess_images(self, images: Sequence[Any]) -> torch.Tensor:
        """The model's input ``[N, 3, H, W]`` for PIL images (its own eval transform), on the CPU.

        Safe to run in another thread while :meth:`caption` runs (the pipeline prepares the next chunk so).
        """
        return torch.stack([self.preprocess(im.convert("RGB")) for im in images])

    def caption(
        self,
        images: Sequence[Any],
        *,
        seed: int | None = None,
        sample_seeds: Sequence[int] | None = None,
        pixels: torch.Tensor | None = None,
    ) -> list[list[str]]:
        """``num_captions`` cleaned captions for each PIL image, in order.

        With ``seed``, the torch RNG is reset first, so the same images in the same order give the same
        captions whatever ran before. With ``sample_seeds`` (one per image) each image's captions depend only
        on the image and its seed, not on the images captioned with it nor on ``batch_size`` (the pipeline
        seeds each sample by its key, so a rebuilt shard is the same whatever the batching). The cached
        decoder then draws per-row noise in the batch; open_clip's decoder captions image by image.
        ``pixels``: the images already through :meth:`preprocess_images` (``images`` then only gives their
        number and may be empty).
        """
        if seed is not None:
            torch.manual_seed(seed)
        count = len(images) if pixels is None else int(pixels.shape[0])
        if sample_seeds is not None and len(sample_seeds) != count:
            raise ValueError(f"sample_seeds: got {len(sample_seeds)} for {count} images; need one each")
        if count == 0:
            return []
        k = self.num_captions
        if pixels is None:
            pixels = self.preprocess_images(images)
        # One call samples all k captions of batch_size images (rows image by image, as generate() sees
        # repeat_interleave'd images), so both decoders consume the random stream alike.
        per_call = max(1, self.batch_size)
        texts: list[str] = []
        for start in range(0, pixels.shape[0], per_call):
            seeds = None if sample_seeds is None else sample_seeds[start : start + per_call]
            texts.extend(self._generate(pixels[start : start + per_call].to(self.device), k, seeds))
        return [texts[i * k : (i + 1) * k] for i in range(count)]


# ------------------------------------------------------------------------------------ tiny CoCa training
def _load_clean_pairs(urls: Sequence[str]) -> tuple[list[Any], list[str]]:
    from PIL import Image

    from siclip.data.shards import image_of, iter_raw_samples

    images, texts = [], []
    for url in urls:
        for raw in iter_raw_samples(url):
            try:
                data = image_of(raw)
                text = raw["txt"].decode("utf-8").strip()
                image = Image.open(io.BytesIO(data)).convert("RGB")
            except (KeyError, OSError, UnicodeDecodeError):
                continue
            if text:
                images.append(image)
                texts.append(text)
    if not images:
        raise ValueError(f"no usable image-caption pairs in {len(urls)} shard(s): {list(urls)[:3]}")
    return images, texts


def _trim(tokens: torch.Tensor) -> torch.Tensor:
    # Padding is ignored by the caption loss; cutting the batch to its longest caption saves compute.
    length = int((tokens != 0).sum(dim=1).max())
    return tokens[:, : max(length, 2)]


def _coca_loss(model: Any, loss_fn: Any, pixels: torch.Tensor, tokens: torch.Tensor) -> dict[str, Any]:
    out = model(pixels, _trim(tokens))
    losses = loss_fn(
        out["image_features"],
        out["text_features"],
        out["logits"],
        out["labels"],
        out["logit_scale"],
        output_dict=True,
    )
    losses["loss"] = losses["contrastive_loss"] + losses["caption_loss"]
    return losses


def train_captioner(
    clean_urls: Sequence[str],
    *,
    out_path: str,
    steps: int = 800,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    image_size: int = 64,
    progress: bool = True,
) -> str:
    """Train the tiny demo CoCa on clean image-caption shards; save safetensors; return ``out_path``.

    A plain CPU loop: all pairs are decoded and tokenised once, batches are sampled with replacement,
    AdamW with linear warm-up and cosine decay, open_clip's ``CoCaLoss`` (caption weight 2, contrastive 1,
    as in open_clip's CoCa recipe). ``steps=0`` saves the seeded initialisation (a baseline).
    On the demo world (1,000 clean pairs, 64 px) 800 steps took about 2 minutes on 2 shared cores and
    lifted the share of captions naming each true attribute from 0.29 (web alt-text) to 0.88; 400 steps
    learn colour and size but not yet shape and position.
    The file's metadata records the model name, image size, vocabulary and final loss, so
    ``Captioner("siclip-tiny-coca", out_path)`` rebuilds it.
    """
    import open_clip
    from safetensors.torch import save_file
    from tqdm import tqdm

    register_model_configs()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_COCA, force_image_size=image_size)
    _init_decoder_projection(model)
    tokenizer = open_clip.get_tokenizer(TINY_COCA)
    images, texts = _load_clean_pairs(clean_urls)
    pixels = torch.stack([preprocess(im) for im in images])
    raw_tokens = tokenizer(texts)
    vocab = CompactVocab.from_tokens(raw_tokens, size=int(model.text.vocab_size))
    tokens = vocab.encode(raw_tokens)
    loss_fn = open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    warmup = max(1, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    model.train()
    last = float("nan")
    bar = tqdm(range(steps), desc="tiny CoCa", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.tensor([rng.randrange(len(texts)) for _ in range(batch_size)])
        losses = _coca_loss(model, loss_fn, pixels[idx], tokens[idx])
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = float(losses["loss"].detach())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{last:.3f}", caption_loss=f"{float(losses['caption_loss'].detach()):.3f}")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "model": TINY_COCA,
        "image_size": str(image_size),
        "steps": str(steps),
        "final_loss": f"{last:.6f}",
        "seed": str(seed),
        "pairs": str(len(texts)),
        "vocab": vocab.to_json(),
    }
    tmp = out_path + ".tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, out_path)
    log.info("tiny CoCa: %s", json.dumps(meta))
    return out_path


def captioner_loss(path: str, urls: Sequence[str], *, batch_size: int = 64) -> dict[str, float]:
    """Mean CoCa losses (``caption_loss``, ``contrastive_loss``, ``loss``) of a saved tiny CoCa on shards."""
    import open_clip

    built = build_captioner_model(TINY_COCA, path)
    assert built.vocab is not None  # the tiny CoCa always has one
    images, texts = _load_clean_pairs(urls)
    loss_fn = open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    sums: dict[str, float] = {}
    batches = 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            pixels = torch.stack([built.preprocess(im) for im in images[start : start + batch_size]])
            tokens = built.vocab.encode(built.tokenizer(texts[start : start + batch_size]))
            losses = _coca_loss(built.net, loss_fn, pixels, tokens)
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            batches += 1
    return {key: value / batches for key, value in sums.items()}
