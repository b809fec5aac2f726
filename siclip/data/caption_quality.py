"""How well captions describe their images in the demo world, where every image's true attributes are known.

This module owns the demo's caption check: :func:`attribute_accuracy` counts how often a caption names an
image's true shape, colour, size and position (and how often it names a wrong one), and
:func:`compare_captions` runs it on the web alt-text and on the synthetic (CoCa) captions of CC12M-SYN
shards, which is what the CC12M -> CC12M-SYN step is meant to improve.

A value counts as named when its canonical words appear as whole words, case-insensitively ("top left",
"red"); synonyms ("ball" for circle, "big" for large) do not count, since the question is whether a
caption uses the words a text encoder is later asked about (zero-shot prompts use canonical names).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["attribute_accuracy", "compare_captions", "default_vocabulary"]


def default_vocabulary() -> dict[str, list[str]]:
    """The demo world's attribute vocabulary (``siclip.data.demo_world.ATTRIBUTES``)."""
    from siclip.data.demo_world import ATTRIBUTES

    return {k: list(v) for k, v in ATTRIBUTES.items()}


def _pattern(value: str) -> re.Pattern[str]:
    words = r"\s+".join(re.escape(w) for w in value.lower().split())
    return re.compile(rf"(?<![a-z0-9]){words}(?![a-z0-9])")


def attribute_accuracy(
    captions: Sequence[str],
    attributes: Sequence[Mapping[str, str]],
    *,
    vocabulary: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, float]:
    """Per attribute, the fraction of captions naming the image's true value; plus summaries.

    Returns ``{<attribute>: accuracy, ..., "overall": mean over every (caption, attribute) pair,
    "all": fraction of captions naming every attribute, "wrong": fraction of pairs where a caption names
    another value of that attribute and not the true one, "n": number of captions}``.
    ``vocabulary`` (attribute -> values) defaults to the demo world's; it is needed only for ``wrong``.
    """
    if len(captions) != len(attributes):
        raise ValueError(f"{len(captions)} captions but {len(attributes)} attribute records")
    vocab = {k: list(v) for k, v in (vocabulary if vocabulary is not None else default_vocabulary()).items()}
    patterns = {v: _pattern(v) for values in vocab.values() for v in values}
    names = sorted({k for a in attributes for k in a})
    hits = dict.fromkeys(names, 0)
    totals = dict.fromkeys(names, 0)
    wrong = pairs = all_named = 0
    for caption, attrs in zip(captions, attributes, strict=True):
        text = caption.lower()
        named_all = True
        for name, value in attrs.items():
            pat = patterns.get(value) or _pattern(value)
            ok = bool(pat.search(text))
            totals[name] += 1
            pairs += 1
            hits[name] += ok
            named_all &= ok
            if not ok and any(
                patterns[other].search(text) for other in vocab.get(name, []) if other != value
            ):
                wrong += 1
        all_named += named_all
    out: dict[str, float] = {name: hits[name] / totals[name] for name in names if totals[name]}
    out["overall"] = sum(hits.values()) / pairs if pairs else 0.0
    out["all"] = all_named / len(captions) if captions else 0.0
    out["wrong"] = wrong / pairs if pairs else 0.0
    out["n"] = float(len(captions))
    return out


def _read(urls: Sequence[str], *, synthetic: bool) -> tuple[list[str], list[dict[str, str]]]:
    from siclip.data.shards import iter_samples

    captions: list[str] = []
    attributes: list[dict[str, str]] = []
    for sample in iter_samples(list(urls), images=False):
        meta: Any = sample.get("json", {})
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        if not attrs:
            continue
        texts = sample.get("syn.json", {}).get("syn_text", []) if synthetic else [sample.get("txt", "")]
        captions.extend(texts)
        attributes.extend([attrs] * len(texts))
    return captions, attributes


def compare_captions(web_urls: Sequence[str], syn_urls: Sequence[str]) -> dict[str, dict[str, float]]:
    """Attribute accuracy of the web captions (``txt`` of ``web_urls``) vs the synthetic captions (every
    ``syn.json`` caption of ``syn_urls``); samples without ``json["attributes"]`` are ignored."""
    web = attribute_accuracy(*_read(web_urls, synthetic=False))
    syn = attribute_accuracy(*_read(syn_urls, synthetic=True))
    return {"web": web, "synthetic": syn}
