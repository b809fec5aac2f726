"""The embedded demo world: a seeded, generated image-text dataset that mirrors CC12M / COCO at toy scale.

Each image shows one object with four attributes (shape, colour, size, position) on a lightly textured,
noisy background. The splits mirror the real setting so every stage of the pipeline means something:

- ``web``: captions that are noisy and partial like CC12M alt-text (one or two attributes, synonyms,
  sometimes a wrong colour, filler words, sometimes nothing useful at all);
- ``clean``: a small subset with complete COCO-like descriptions (five per image), which the demo CoCa
  captioner is trained on before it captions the web split;
- ``retrieval``: held-out shards with five clean captions per image (``json["captions"]``);
- ``zeroshot``: a held-out ImageFolder whose classes are "<colour> <shape>" (folder ``red_circle``), with
  ``classnames.txt`` listing "red circle" per line in sorted folder order.

With ``held_out=True`` (the paper's data regime, docs/ablation-design.md) a third of the classes, chosen by
:func:`held_out_classes`, never occur in the ``web`` split (neither as images nor named by a caption), and an
extra ``teacher`` split (``n_teacher`` images over every class, clean captions) holds the teacher's data; the
zero-shot folder records the held-out classes in ``held_out_classes.txt`` (one folder name per line).

Pure numpy + PIL; one generator per image (seeded by split and index) makes the output byte-identical for
a seed and independent of the order of generation.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from siclip import __version__
from siclip.data.shards import AtomicShardWriter, Manifest, shard_name, write_manifest

__all__ = [
    "ATTRIBUTES",
    "CLEAN_TEMPLATES",
    "HELD_OUT_FILE",
    "DemoWorld",
    "clean_captions",
    "generate_demo_world",
    "held_out_classes",
    "names_a_class",
    "render_image",
    "sample_attributes",
    "web_caption",
    "zeroshot_classes",
]

ATTRIBUTES: dict[str, list[str]] = {
    "shape": ["circle", "square", "triangle", "star", "cross", "diamond"],
    "colour": ["red", "green", "blue", "yellow", "purple", "orange"],
    "size": ["small", "large"],
    "position": ["top left", "top right", "bottom left", "bottom right", "center"],
}

_RGB = {
    "red": (215, 30, 35),
    "green": (35, 165, 50),
    "blue": (35, 65, 215),
    "yellow": (240, 215, 30),
    "purple": (140, 45, 185),
    "orange": (245, 135, 20),
}
_CENTRES = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
_RADIUS = {"small": 0.12, "large": 0.24}

# Alt-text vocabulary: web captions say things the clean captions never do (synonyms, shop talk).
_SHAPE_SYNONYMS = {
    "circle": ["round", "ball", "dot", "disc"],
    "square": ["box", "block", "tile"],
    "triangle": ["pyramid", "wedge"],
    "star": ["starburst", "star shape"],
    "cross": ["plus sign", "plus"],
    "diamond": ["rhombus", "lozenge"],
}
_SIZE_WORDS = {"small": ["small", "tiny", "little", "mini"], "large": ["large", "big", "huge", "giant"]}
_POSITION_WEB = {
    "top left": ["top left", "upper left corner"],
    "top right": ["top right", "upper right corner"],
    "bottom left": ["bottom left", "lower left corner"],
    "bottom right": ["bottom right", "lower right corner"],
    "center": ["center", "middle"],
}
_NOUNS = ["icon", "shape", "thing", "graphic", "symbol", "design"]
_WEB_TEMPLATES = [
    "{core}",
    "{core} stock photo",
    "{core} on a textured background",
    "vector illustration of a {core}",
    "{core} - click here for more",
    "buy {core} online",
    "{core} icon",
    "{core} | free download",
    "cheap {core} for sale",
    "{core} #{n}",
    "image of {core}",
    "new arrivals: {core}",
]
_NOISE_CAPTIONS = [
    "click here for more",
    "image may contain: text",
    "untitled",
    "free download",
    "photo {n}",
    "view product details",
    "img_{n}.jpg",
    "see more at our website",
]
CLEAN_TEMPLATES = [
    "a {size} {colour} {shape} at the {position} of the picture",
    "a {size} {colour} {shape} in the {position} of the image",
    "there is a {size} {colour} {shape} in the {position}",
    "the picture shows a {size} {colour} {shape} at the {position}",
    "a {colour} {shape} that is {size}, located at the {position}",
]

_A_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")

# Split codes seed each image's generator, so splits never share an image.
_SPLIT_CODES = {"web": 1, "clean": 2, "retrieval": 3, "zeroshot": 4, "teacher": 5}
_PATH_FIELDS = (
    "web_shards",
    "clean_shards",
    "retrieval_shards",
    "teacher_shards",
    "zeroshot_dir",
    "classnames_file",
)

HELD_OUT_FILE = "held_out_classes.txt"
"""In a zero-shot ImageFolder: the class folders the student's training data lacks, one per line."""
HELD_OUT_RULE = "(colour index + shape index) mod 3 == 0, indices in ATTRIBUTES order"


@dataclass(frozen=True)
class DemoWorld:
    """Paths of a generated demo world."""

    root: str
    web_shards: list[str]
    clean_shards: list[str]
    retrieval_shards: list[str]
    zeroshot_dir: str
    classnames_file: str
    teacher_shards: list[str] = field(default_factory=list)
    """The ``teacher`` split (every class, clean captions); empty unless ``n_teacher`` was given."""
    held_out_classes: tuple[str, ...] = ()
    """Zero-shot class folders absent from the ``web`` split (``held_out=True``), sorted."""


# ----------------------------------------------------------------------------------------- content
def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    """One uniformly drawn value per attribute."""
    return {name: values[int(rng.integers(len(values)))] for name, values in ATTRIBUTES.items()}


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            ang = -np.pi / 2 + i * np.pi / 5
            pts.append((cx + rad * float(np.cos(ang)), cy + rad * float(np.sin(ang))))
        return pts
    if shape == "cross":
        a = r * 0.33
        return [
            (cx - a, cy - r),
            (cx + a, cy - r),
            (cx + a, cy - a),
            (cx + r, cy - a),
            (cx + r, cy + a),
            (cx + a, cy + a),
            (cx + a, cy + r),
            (cx - a, cy + r),
            (cx - a, cy + a),
            (cx - r, cy + a),
            (cx - r, cy - a),
            (cx - a, cy - a),
        ]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(ATTRIBUTES['shape'])}")


def render_image(attrs: dict[str, str], rng: np.random.Generator, *, size: int = 64) -> Image.Image:
    """Draw one object on a noisy, low-saturation background (jittered colour, size and position)."""
    # One draw of all the scalars this image needs (fewer small numpy calls: generation is call-bound).
    u = rng.random(10)
    # Background: a pale grey-ish tone and a random linear gradient; pixel noise lies over the object too,
    # so that colour and shape must be read from the object, not from the picture as a whole.
    base = 140 + 85 * u[0] + 24 * (u[1:4] - 0.5)
    gx, gy = 50 * (u[4:6] - 0.5)
    ramp = _ramp(size)
    cx0, cy0 = _CENTRES[attrs["position"]]
    cx = (cx0 + 0.08 * (u[6] - 0.5)) * size
    cy = (cy0 + 0.08 * (u[7] - 0.5)) * size
    r = _RADIUS[attrs["size"]] * (0.9 + 0.2 * u[8]) * size
    colour = np.clip(np.array(_RGB[attrs["colour"]]) + rng.integers(-18, 19, size=3), 0, 255)

    mask_image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_image)
    if attrs["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_shape_points(attrs["shape"], cx, cy, r), fill=255)
    mask = np.asarray(mask_image)[..., None] > 0

    bank = _noise_bank(size)
    ox, oy = int(u[9] * size), int(rng.integers(size))
    background = base + (gx * ramp[None, :] + gy * ramp[:, None])[..., None]
    pixels = np.where(mask, colour, background) + bank[oy : oy + size, ox : ox + size]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=8)
def _ramp(size: int) -> np.ndarray:
    return (np.arange(size, dtype=np.float32) / size - 0.5).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _noise_bank(size: int) -> np.ndarray:
    # Pixel noise (std 10) cropped at a random offset per image: drawing fresh Gaussian noise for every
    # pixel of every image was most of the generation time.
    return (10.0 * np.random.default_rng(12345).standard_normal((2 * size, 2 * size, 3))).astype(np.float32)


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def web_caption(
    attrs: dict[str, str], rng: np.random.Generator, *, avoid: frozenset[tuple[str, str]] = frozenset()
) -> tuple[str, dict[str, str]]:
    """A noisy, partial alt-text caption and the attribute values it mentions (colour may be wrong).

    About 10 % say nothing about the image; otherwise shape and colour are each mentioned with
    probability 0.65 (a shape by a synonym 30 % of the time), size 0.3 and position 0.15, at least one of
    them; a mentioned colour is wrong 10 % of the time. A wrong colour is never one that makes a
    ``(colour, shape)`` pair of ``avoid`` with the image's shape.
    """
    n = int(rng.integers(100, 9999))
    if rng.random() < 0.1:
        return _pick(rng, _NOISE_CAPTIONS).format(n=n), {}
    mention = {
        "shape": rng.random() < 0.65,
        "colour": rng.random() < 0.65,
        "size": rng.random() < 0.3,
        "position": rng.random() < 0.15,
    }
    if not any(mention.values()):
        mention[_pick(rng, ["shape", "colour"])] = True
    said: dict[str, str] = {}
    words: list[str] = []
    if mention["size"]:
        said["size"] = attrs["size"]
        words.append(_pick(rng, _SIZE_WORDS[attrs["size"]]))
    if mention["colour"]:
        colour = attrs["colour"]
        if rng.random() < 0.1:
            wrong = [c for c in ATTRIBUTES["colour"] if c != colour and (c, attrs["shape"]) not in avoid]
            colour = _pick(rng, wrong)
        said["colour"] = colour
        words.append(colour)
    if mention["shape"]:
        said["shape"] = attrs["shape"]
        use_synonym = rng.random() < 0.3
        words.append(_pick(rng, _SHAPE_SYNONYMS[attrs["shape"]]) if use_synonym else attrs["shape"])
    else:
        words.append(_pick(rng, _NOUNS))
    core = " ".join(words)
    if mention["position"]:
        said["position"] = attrs["position"]
        core += " in the " + _pick(rng, _POSITION_WEB[attrs["position"]])
    text = _articles(_pick(rng, _WEB_TEMPLATES).format(core=core, n=n))
    style = rng.random()
    if style < 0.25:
        text = text.title()
    elif style < 0.35:
        text = text.upper()
    elif style < 0.7:
        text = text[:1].upper() + text[1:]
    return text, said


def clean_captions(attrs: dict[str, str], rng: np.random.Generator, *, k: int = 5) -> list[str]:
    """``k`` complete COCO-like descriptions (every attribute, distinct templates in random order)."""
    order = rng.permutation(len(CLEAN_TEMPLATES))
    return [_articles(CLEAN_TEMPLATES[int(order[i % len(order)])].format(**attrs)) for i in range(k)]


def _articles(text: str) -> str:
    return _A_BEFORE_VOWEL.sub("an ", text)


def zeroshot_classes() -> list[tuple[str, str, str]]:
    """``(folder, colour, shape)`` per zero-shot class, in sorted folder order (``red_circle``, ...)."""
    pairs = [(f"{c}_{s}", c, s) for c in ATTRIBUTES["colour"] for s in ATTRIBUTES["shape"]]
    return sorted(pairs)


def held_out_classes() -> list[str]:
    """The classes the paper-regime world keeps out of the student's web split, as zero-shot folder names.

    The rule (docs/ablation-design.md): number colours and shapes in :data:`ATTRIBUTES` order; class
    (colour ``i``, shape ``j``) is held out iff ``(i + j) % 3 == 0``. 12 of the 36 classes; every colour and
    every shape is held out in exactly 2 of its 6 combinations.
    """
    colours, shapes = ATTRIBUTES["colour"], ATTRIBUTES["shape"]
    return sorted(f"{c}_{s}" for i, c in enumerate(colours) for j, s in enumerate(shapes) if (i + j) % 3 == 0)


def _pairs(folders: list[str] | tuple[str, ...]) -> frozenset[tuple[str, str]]:
    return frozenset((f.split("_", 1)[0], f.split("_", 1)[1]) for f in folders)


def names_a_class(text: str, folder: str) -> bool:
    """Whether ``text`` names the class ``folder`` (``red_circle``): its colour word directly followed by
    the shape's name or one of its web synonyms, case-insensitively (``"Red ball"``, ``"a red circle"``)."""
    colour, shape = folder.split("_", 1)
    words = sorted({shape, *(s.split()[0] for s in _SHAPE_SYNONYMS[shape])})
    pattern = rf"\b{re.escape(colour)}\s+(?:{'|'.join(map(re.escape, words))})\b"
    return re.search(pattern, text.lower()) is not None


# ---------------------------------------------------------------------------------------- writing
def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _rng_for(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def _write_split(
    root: str,
    split: str,
    n: int,
    *,
    seed: int,
    image_size: int,
    samples_per_shard: int,
    make_text: Callable[[dict[str, str], np.random.Generator], tuple[str, dict[str, Any]]],
    params: dict[str, Any],
    exclude: frozenset[tuple[str, str]] = frozenset(),
) -> list[str]:
    folder = os.path.join(root, split)
    os.makedirs(folder, exist_ok=True)
    shards: list[dict[str, Any]] = []
    paths: list[str] = []
    for shard_index, start in enumerate(range(0, n, samples_per_shard)):
        name = shard_name(split, shard_index)
        path = os.path.join(folder, name)
        with AtomicShardWriter(path) as writer:
            for i in range(start, min(n, start + samples_per_shard)):
                rng = _rng_for(seed, split, i)
                attrs = sample_attributes(rng)
                while (attrs["colour"], attrs["shape"]) in exclude:  # redrawn from the image's own generator
                    attrs = sample_attributes(rng)
                image = render_image(attrs, rng, size=image_size)
                text, extra = make_text(attrs, rng)
                key = f"{i:09d}"
                meta = {
                    "url": f"demo://{split}/{key}.jpg",
                    "key": key,
                    "status": "success",
                    "caption": text,
                    "width": image_size,
                    "height": image_size,
                    "attributes": attrs,
                    **extra,
                }
                writer.write({"__key__": key, "jpg": _jpeg(image), "txt": text, "json": meta})
        shards.append({"name": name, "samples": writer.count})
        paths.append(path)
    manifest = Manifest(
        kind=f"demo-{split}",
        shards=shards,
        samples_in=n,
        samples_out=n,
        producer={"name": "siclip.data.demo_world", "siclip": __version__},
        config=params,
    )
    write_manifest(folder, manifest)
    return paths


def _web_text(attrs: dict[str, str], rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    text, said = web_caption(attrs, rng)
    return text, {"mentioned": said}


def _web_text_avoiding(
    avoid: frozenset[tuple[str, str]],
) -> Callable[[dict[str, str], np.random.Generator], tuple[str, dict[str, Any]]]:
    def make(attrs: dict[str, str], rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
        text, said = web_caption(attrs, rng, avoid=avoid)
        return text, {"mentioned": said}

    return make


def _clean_text(attrs: dict[str, str], rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    captions = clean_captions(attrs, rng)
    return captions[0], {"captions": captions}


def _write_zeroshot(
    root: str, *, seed: int, per_class: int, image_size: int, held_out: tuple[str, ...] = ()
) -> tuple[str, str]:
    folder = os.path.join(root, "zeroshot")
    index = 0
    lines = []
    for name, colour, shape in zeroshot_classes():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        lines.append(f"{colour} {shape}")
        for j in range(per_class):
            rng = _rng_for(seed, "zeroshot", index)
            index += 1
            attrs = sample_attributes(rng)
            attrs.update(colour=colour, shape=shape)
            path = os.path.join(folder, name, f"{j:05d}.jpg")
            with open(path + ".tmp", "wb") as f:
                f.write(_jpeg(render_image(attrs, rng, size=image_size)))
            os.replace(path + ".tmp", path)
    if held_out:
        with open(os.path.join(folder, HELD_OUT_FILE), "w") as f:
            f.write("\n".join(held_out) + "\n")
    classnames = os.path.join(root, "classnames.txt")
    with open(classnames, "w") as f:
        f.write("\n".join(lines) + "\n")
    return folder, classnames


def _from_record(root: str, record: dict[str, Any]) -> DemoWorld:
    def full(p: str) -> str:
        return os.path.join(root, p)

    paths = record["paths"]
    return DemoWorld(
        root=root,
        web_shards=[full(p) for p in paths["web_shards"]],
        clean_shards=[full(p) for p in paths["clean_shards"]],
        retrieval_shards=[full(p) for p in paths["retrieval_shards"]],
        zeroshot_dir=full(paths["zeroshot_dir"]),
        classnames_file=full(paths["classnames_file"]),
        teacher_shards=[full(p) for p in paths.get("teacher_shards", [])],
        held_out_classes=tuple(record.get("held_out_classes", ())),
    )


def _complete(world: DemoWorld) -> bool:
    files = [
        *world.web_shards,
        *world.clean_shards,
        *world.retrieval_shards,
        *world.teacher_shards,
        world.classnames_file,
    ]
    if world.held_out_classes:
        files.append(os.path.join(world.zeroshot_dir, HELD_OUT_FILE))
    return all(os.path.isfile(p) for p in files) and os.path.isdir(world.zeroshot_dir)


def generate_demo_world(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    n_web: int = 6000,
    n_clean: int = 1000,
    n_retrieval: int = 500,
    n_zeroshot_per_class: int = 10,
    image_size: int = 64,
    samples_per_shard: int = 1000,
    held_out: bool = False,
    n_teacher: int = 0,
) -> DemoWorld:
    """Generate (or find) the demo world under ``out_dir``; returns its paths.

    ``held_out``: keep the classes of :func:`held_out_classes` out of the ``web`` split (the student's data)
    and record them (``demo_world.json``, ``zeroshot/held_out_classes.txt``). ``n_teacher``: images of an
    extra ``teacher`` split over every class with clean captions (0: none).

    Idempotent: when ``out_dir/demo_world.json`` records the same parameters and its files exist, nothing
    is regenerated. Otherwise the split folders are rebuilt from scratch, and ``demo_world.json`` is
    written last, so an interrupted run is redone rather than trusted.
    """
    if min(n_web, n_clean, n_retrieval, n_zeroshot_per_class) < 1 or image_size < 16 or samples_per_shard < 1:
        raise ValueError("demo world sizes must be >= 1 (image_size >= 16)")
    if n_teacher < 0:
        raise ValueError(f"n_teacher: got {n_teacher}; allowed: 0 (no teacher split) or more")
    root = os.path.abspath(os.fspath(out_dir))
    params = {
        "seed": seed,
        "n_web": n_web,
        "n_clean": n_clean,
        "n_retrieval": n_retrieval,
        "n_zeroshot_per_class": n_zeroshot_per_class,
        "image_size": image_size,
        "samples_per_shard": samples_per_shard,
        "attributes": ATTRIBUTES,
        "generator_version": 1,
    }
    held = tuple(held_out_classes()) if held_out else ()
    # Recorded only when used, so the default world's record (and an existing world on disk) is unchanged.
    if held_out:
        params["held_out"] = HELD_OUT_RULE
    if n_teacher:
        params["n_teacher"] = n_teacher
    record_path = os.path.join(root, "demo_world.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("params") == params:
            world = _from_record(root, record)
            if _complete(world):
                return world
    os.makedirs(root, exist_ok=True)
    if os.path.exists(record_path):
        os.remove(record_path)
    for split in ("web", "clean", "retrieval", "zeroshot", "teacher"):
        shutil.rmtree(os.path.join(root, split), ignore_errors=True)

    common: dict[str, Any] = {"seed": seed, "image_size": image_size, "samples_per_shard": samples_per_shard}
    avoid = _pairs(held)
    web_text = _web_text_avoiding(avoid) if avoid else _web_text
    web = _write_split(root, "web", n_web, make_text=web_text, params=params, exclude=avoid, **common)
    clean = _write_split(root, "clean", n_clean, make_text=_clean_text, params=params, **common)
    retrieval = _write_split(root, "retrieval", n_retrieval, make_text=_clean_text, params=params, **common)
    teacher = (
        _write_split(root, "teacher", n_teacher, make_text=_clean_text, params=params, **common)
        if n_teacher
        else []
    )
    zeroshot_dir, classnames = _write_zeroshot(
        root, seed=seed, per_class=n_zeroshot_per_class, image_size=image_size, held_out=held
    )
    world = DemoWorld(
        root=root,
        web_shards=web,
        clean_shards=clean,
        retrieval_shards=retrieval,
        zeroshot_dir=zeroshot_dir,
        classnames_file=classnames,
        teacher_shards=teacher,
        held_out_classes=held,
    )
    rel: dict[str, Any] = {}
    for name in _PATH_FIELDS:
        value = getattr(world, name)
        if isinstance(value, list):
            if value or name != "teacher_shards":
                rel[name] = [os.path.relpath(p, root) for p in value]
        else:
            rel[name] = os.path.relpath(value, root)
    written: dict[str, Any] = {"params": params, "paths": rel}
    if held:
        written["held_out_classes"] = list(held)
        written["held_out_rule"] = HELD_OUT_RULE
    tmp = record_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(written, f, indent=2, sort_keys=True)
    os.replace(tmp, record_path)
    return world
