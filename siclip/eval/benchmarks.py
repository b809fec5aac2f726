"""The paper's evaluation datasets through CLIP_benchmark, from local copies only.

Zero-shot top-1/top-5 on ImageNet-1k val, ImageNet-V2 (matched frequency), ImageNet-R and ImageNet-Sketch,
and retrieval recall@K on MS-COCO (5k) and Flickr30k (1k test). Each root (``eval.roots.<name>``) holds a
dataset in CLIP_benchmark's ``--dataset_root`` layout or in its WebDataset export (``ROOT/test/nshards.txt``);
:func:`locate` recognises the layout and CLIP_benchmark's ``build_dataset`` builds it (except ImageNet-V2 and
WebDataset exports, read by our own readers for the reasons in their docstrings). A dataset whose root
is unset, missing or in no known layout is reported ``absent`` with the reason, never evaluated on something
else. Its builders download (wget, gdown, kaggle, requests) whenever a root or annotation file is missing, so
nothing is built before :func:`locate` has found every file it needs.

Class names and the 80 OpenAI prompt templates come from open_clip's zero-shot metadata (ImageNet-R: the
200-class subset CLIP_benchmark's builder selects); CLIP_benchmark builds the classifier and runs the
model. Its ``accuracy`` calls ``float()`` on a one-element array, which raises ``TypeError`` under numpy 2,
so top-k is taken on its logits by :func:`siclip.eval.metrics.topk_accuracy` (the same ``torch.topk``).
Its captioning metrics (the only users of ``pycocoevalcap``) are never imported.

During training the suite is sharded over the ranks like the other evaluations (siclip/eval/ranks.py): each
rank builds the classifier columns of its slice of the classes and encodes its slice of the images (and their
captions); the columns, the per-image (label, prediction) pairs, the hit counts and the retrieval embeddings
are combined, and the recall is CLIP_benchmark's ``recall_at_k`` on the gathered whole set.
"""

from __future__ import annotations

import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from siclip.config import BenchmarkName, EvalCfg
from siclip.eval.metrics import eval_mode, topk_accuracy
from siclip.eval.ranks import Shard

__all__ = [
    "BENCHMARKS",
    "PAPER_SUITE",
    "Benchmark",
    "Located",
    "evaluate_benchmarks",
    "flatten",
    "locate",
    "prompt_templates",
]


@dataclass(frozen=True)
class Benchmark:
    """One dataset of the suite: its task, CLIP_benchmark's name for it, and the layout its root must have."""

    title: str
    task: Literal["classification", "retrieval"]
    cb_name: str
    layout: str


BENCHMARKS: dict[str, Benchmark] = {
    "imagenet1k": Benchmark(
        "ImageNet-1k val", "classification", "imagenet1k-unverified", "ROOT/val/<wnid>/*.JPEG"
    ),
    "imagenetv2": Benchmark(
        "ImageNet-V2 (matched frequency)",
        "classification",
        "imagenetv2",
        "ROOT/ImageNetV2-matched-frequency/<class index>/*.jpeg",
    ),
    "imagenet_r": Benchmark("ImageNet-R", "classification", "imagenet-r", "ROOT/<wnid>/*.jpg (200 wnids)"),
    "imagenet_sketch": Benchmark(
        "ImageNet-Sketch", "classification", "imagenet_sketch", "ROOT/<wnid>/*.JPEG"
    ),
    "mscoco": Benchmark(
        "MS-COCO 5k",
        "retrieval",
        "mscoco_captions",
        "ROOT/val2014 + ROOT/coco_test_karpathy.json, or ROOT/val2017 + ROOT/annotations/captions_val2017.json",
    ),
    "flickr30k": Benchmark(
        "Flickr30k 1k", "retrieval", "flickr30k", "ROOT/*.jpg + ROOT/flickr30k_test_karpathy.txt"
    ),
}
PAPER_SUITE: tuple[str, ...] = typing.get_args(BenchmarkName)
WDS_LAYOUT = "or a CLIP_benchmark WebDataset export (ROOT/test/nshards.txt)"
V2_FOLDERS = ("ImageNetV2-matched-frequency", "imagenetv2-matched-frequency-format-val")


@dataclass(frozen=True)
class Located:
    """Where a dataset's files are and in which layout (``folder``, ``coco2014``, ``coco2017``, ``wds``)."""

    name: str
    root: Path
    layout: str


def locate(name: str, root: str) -> Located | str:
    """The dataset ``name`` under ``root``, or why it is absent (a sentence naming the expected layout)."""
    bench = BENCHMARKS[name]
    if not root:
        return f"no root configured (eval.roots.{name})"
    path = Path(root)
    expected = f"expected {bench.layout} {WDS_LAYOUT}"
    if not path.is_dir():
        return f"{root} is not a directory; {expected}"
    if (path / "test" / "nshards.txt").is_file():
        return Located(name, path, "wds")
    found: Path | None = None
    layout = "folder"
    if name == "imagenet1k":
        found = path if (path / "val").is_dir() else None
    elif name == "imagenetv2":
        found = next((path / f for f in V2_FOLDERS if (path / f).is_dir()), None)
    elif name in ("imagenet_r", "imagenet_sketch"):
        found = path if any(p.is_dir() for p in path.iterdir()) else None
    elif name == "mscoco":
        if (path / "val2014").is_dir() and (path / "coco_test_karpathy.json").is_file():
            found, layout = path, "coco2014"
        elif (path / "val2017").is_dir() and (path / "annotations" / "captions_val2017.json").is_file():
            found, layout = path, "coco2017"
    elif name == "flickr30k":
        found = path if (path / "flickr30k_test_karpathy.txt").is_file() else None
    return Located(name, found, layout) if found is not None else f"{root}: {expected}"


def prompt_templates(kind: Literal["openai", "simple"]) -> list[Callable[[str], str]]:
    """open_clip's 80 OpenAI ImageNet templates, or its 7 simple ones (fast evaluations on CPU)."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES if kind == "openai" else SIMPLE_IMAGENET_TEMPLATES)


# ------------------------------------------------------------------------------------------ datasets
class _ImageNetV2(torch.utils.data.Dataset[tuple[Any, int]]):
    """ImageNet-V2 in CLIP_benchmark's layout, read locally.

    CLIP_benchmark's ``ImageNetV2Dataset`` downloads the archive whenever the folder holds other than
    10,000 images, so it cannot read a partial or test copy without the network; the layout and labels
    (the folder name is the class index) are the same.
    """

    def __init__(self, folder: Path, transform: Callable[[Any], Any]) -> None:
        self.files = sorted(folder.glob("*/*.jpeg"))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        with Image.open(self.files[i]) as img:
            image = img.convert("RGB")
        return self.transform(image), int(self.files[i].parent.name)


class _WdsExport(torch.utils.data.IterableDataset[tuple[Any, Any]]):
    """A CLIP_benchmark WebDataset export (``test/nshards.txt``, ``test/{0..n-1}.tar``) read through
    :func:`siclip.data.shards.iter_samples`, which never unpickles and so works under ``WDS_SECURE=1``;
    CLIP_benchmark's own reader goes through webdataset's ``gopen``, which refuses local files there.
    Samples: (image, ``cls`` as int) for classification, (image, ``txt`` lines) for retrieval."""

    def __init__(self, root: Path, transform: Callable[[Any], Any], *, retrieval: bool) -> None:
        n = int((root / "test" / "nshards.txt").read_text().strip())
        self.urls = [str(root / "test" / f"{i}.tar") for i in range(n)]
        self.transform = transform
        self.retrieval = retrieval

    def __iter__(self) -> Any:
        from siclip.data.shards import image_of, iter_samples

        info = torch.utils.data.get_worker_info()
        urls = self.urls if info is None else self.urls[info.id :: info.num_workers]
        for s in iter_samples(urls):
            target = s["txt"].splitlines() if self.retrieval else int(s["cls"])
            yield self.transform(image_of(s)), target


def _read_lines(path: Path) -> list[str] | None:
    return (
        [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else None
    )


@dataclass
class _Built:
    dataset: Any
    classnames: list[str] | None
    templates: list[str] | None  # the export's own ``{c}`` templates (WebDataset), else the configured ones
    collate: Callable[[Any], Any]
    size: int | None


def _imagenet_folder_check(name: str, dataset: Any) -> str | None:
    """ImageFolder labels follow the sorted wnid folders; they match the class names only when every
    class has its folder (CLIP_benchmark's builders assume it)."""
    from clip_benchmark.datasets.builder import all_imagenet_wordnet_ids

    folders = list(dataset.class_to_idx)
    unknown = [f for f in folders if f not in set(all_imagenet_wordnet_ids)]
    if unknown:
        return f"folder {unknown[0]!r} is not an ImageNet wnid"
    want = len(dataset.classes)
    if len(folders) != want:
        return f"{len(folders)} class folders, expected {want} (one per class, empty ones allowed)"
    return None


def _build(loc: Located, transform: Callable[[Any], Any]) -> _Built | str:
    from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from torch.utils.data import default_collate

    bench = BENCHMARKS[loc.name]
    root = str(loc.root)
    task = f"zeroshot_{bench.task}"
    if loc.layout == "wds":
        if bench.task == "retrieval":
            return _Built(
                _WdsExport(loc.root, transform, retrieval=True), None, None, image_captions_collate_fn, None
            )
        classes = _read_lines(loc.root / "classnames.txt")
        if not classes:
            return f"{root}: the WebDataset export has no classnames.txt"
        templates = _read_lines(loc.root / "zeroshot_classification_templates.txt")
        return _Built(
            _WdsExport(loc.root, transform, retrieval=False), classes, templates, default_collate, None
        )
    if loc.name == "imagenetv2":
        v2 = _ImageNetV2(loc.root, transform)
        return _Built(v2, list(IMAGENET_CLASSNAMES), None, default_collate, len(v2))
    if loc.layout == "coco2017":
        from torchvision.datasets import CocoCaptions

        ds = CocoCaptions(
            root=os.path.join(root, "val2017"),
            annFile=os.path.join(root, "annotations", "captions_val2017.json"),
            transform=transform,
        )
        return _Built(ds, None, None, image_captions_collate_fn, len(ds))
    if bench.task == "retrieval":
        # every file the builder would download is present (locate), so it only reads
        ds = build_dataset(
            bench.cb_name, root=root, transform=transform, split="test", task=task, download=False
        )
        return _Built(ds, None, None, image_captions_collate_fn, len(ds))
    ds = build_dataset(
        bench.cb_name,
        root=root,
        transform=transform,
        split="test",
        task=task,
        download=False,
        allow_empty=True,
    )
    problem = _imagenet_folder_check(loc.name, ds)
    if problem:
        return f"{root}: {problem}"
    names = list(ds.classes)
    if loc.name != "imagenet_r" and names != list(IMAGENET_CLASSNAMES):
        return f"{root}: CLIP_benchmark's class names differ from open_clip's IMAGENET_CLASSNAMES"
    return _Built(ds, names, None, default_collate, len(ds))


# ------------------------------------------------------------------------------------------ metrics
def _classifier(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] | Sequence[Callable[[str], str]],
    *,
    device: str,
    amp: bool,
    cache: dict[tuple[str, str], torch.Tensor],
    shard: Shard,
) -> torch.Tensor:
    """CLIP_benchmark's zero-shot classifier [D, C]; each class's column depends on its name alone, so
    columns are cached by (template set, name) and reused by datasets sharing classes (IN-1k, V2, R, ...).
    Sharded: each rank builds the columns of its slice of the missing classes, then all are gathered."""
    from clip_benchmark.metrics.zeroshot_classification import zero_shot_classifier

    key = repr([t if isinstance(t, str) else t("{c}") for t in templates])
    missing = sorted({c for c in classnames if (key, c) not in cache})
    if missing:
        # fewer classes than ranks: every rank builds them all instead of an empty slice
        split = shard.distributed and len(missing) >= shard.world_size
        span = shard.span(len(missing)) if split else range(len(missing))
        mine = missing[span.start : span.stop]
        # CLIP_benchmark formats str templates with {c}; open_clip's are callables: give it per-class prompts
        prompts: dict[str, list[str]] | list[str] = (
            [str(t) for t in templates]
            if all(isinstance(t, str) for t in templates)
            else {c: [t(c) for t in templates] for c in mine}  # type: ignore[operator]
        )
        weights = zero_shot_classifier(model, tokenizer, mine, prompts, device, amp=amp).float()
        if split:  # columns in rank order = the sorted order of ``missing``
            weights = shard.gather_rows(weights.T.contiguous()).T
        for i, c in enumerate(missing):
            cache[(key, c)] = weights[:, i]
    return torch.stack([cache[(key, c)] for c in classnames], dim=1)


def _classification(
    model: Any, loader: Any, classifier: torch.Tensor, *, device: str, amp: bool, shard: Shard
) -> dict[str, float]:
    from clip_benchmark.metrics.zeroshot_classification import run_classification

    counted = _Counted(loader)
    try:
        logits, target = run_classification(model, classifier, counted, device, amp=amp)
    except RuntimeError:
        if counted.images:  # CLIP_benchmark cannot concatenate zero batches: a rank without images
            raise
        logits, target = torch.zeros(0, classifier.shape[1]), torch.zeros(0, dtype=torch.long)
    hits = topk_accuracy(logits, target, (1, 5)) if target.shape[0] else {1: 0, 5: 0}
    # every image's (label, top-1 prediction): the mean per-class recall needs them all
    pairs = torch.stack([target.long(), logits.argmax(dim=1).long()], dim=1)
    if shard.distributed:
        on = torch.device(device)
        n1, n5 = shard.sum([hits[1], hits[5]], device=on)
        hits = {1: int(n1), 5: int(n5)}
        pairs = shard.gather_rows(pairs.to(on)).cpu()
    n = int(pairs.shape[0])
    if n == 0:
        raise ValueError("no images")
    n_classes = classifier.shape[1]
    return {
        "top1": hits[1] / n,
        # like CLIP_benchmark: no top-5 with fewer than 5 classes
        "top5": hits[5] / n if n_classes >= 5 else float("nan"),
        "mean_per_class_recall": _balanced_accuracy(pairs[:, 0], pairs[:, 1]),
        "images": float(n),
    }


def _balanced_accuracy(target: torch.Tensor, pred: torch.Tensor) -> float:
    """CLIP_benchmark's ``mean_per_class_recall`` (sklearn's balanced accuracy: the mean recall over the
    classes that have images), without its warning about predicted classes that have none."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(target, pred))


class _RoundRobin(torch.utils.data.IterableDataset[Any]):
    """Every ``world_size``-th sample of an iterable dataset, from the ``rank``-th (its length is unknown)."""

    def __init__(self, dataset: Any, shard: Shard) -> None:
        self.dataset, self.shard = dataset, shard

    def __iter__(self) -> Any:
        return (s for i, s in enumerate(self.dataset) if self.shard.owns(i))


def _slice(dataset: Any, shard: Shard) -> Any:
    """This rank's part of ``dataset``: a contiguous span when its length is known, else round robin."""
    if not shard.distributed:
        return dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return _RoundRobin(dataset, shard)
    return torch.utils.data.Subset(dataset, shard.span(len(dataset)))


class _Counted:
    """Iterates a loader and counts the images it yields (a WebDataset export's size is not known ahead)."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.images = 0

    def __iter__(self) -> Any:
        for images, targets in self.loader:
            self.images += len(images)
            yield images, targets


def _retrieval_sharded(
    model: Any,
    loader: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    *,
    recall_at: Sequence[int],
    batch_size: int,
    device: str,
    amp: bool,
    shard: Shard,
) -> dict[str, float]:
    """CLIP_benchmark's retrieval ``evaluate`` with this rank's images and captions encoded here (the same
    normalised, autocast encodings), the embeddings gathered, and its ``recall_at_k`` on the whole set."""
    import torch.nn.functional as F
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    on = torch.device(device)
    image_embs: list[torch.Tensor] = []
    text_embs: list[torch.Tensor] = []
    owner: list[int] = []
    n_images = 0
    for images, texts in loader:
        tokens = tokenizer([t for caps in texts for t in caps]).to(device)
        owner += [n_images + i for i, caps in enumerate(texts) for _ in caps]
        n_images += len(images)
        with torch.no_grad(), torch.autocast(device, enabled=amp):
            image_embs.append(F.normalize(model.encode_image(images.to(device)), dim=-1).float())
            text_embs.append(F.normalize(model.encode_text(tokens), dim=-1).float())
    # this rank's caption -> image indices become global ones: the gathered images come in rank order
    n_before = int(shard.gather_rows(torch.tensor([n_images], device=on))[: shard.rank].sum())
    img = shard.gather_rows(torch.cat(image_embs) if image_embs else torch.zeros(0, 0, device=on)).cpu()
    txt = shard.gather_rows(torch.cat(text_embs) if text_embs else torch.zeros(0, 0, device=on)).cpu()
    index = shard.gather_rows(torch.tensor(owner, dtype=torch.long, device=on) + n_before).cpu()
    if img.shape[0] == 0:
        raise ValueError("no images")
    scores = txt @ img.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), index] = True
    out: dict[str, float] = {}
    for k in (k for k in recall_at if k <= img.shape[0]):
        t2i = batchify(recall_at_k, scores, positive, batch_size, "cpu", k=k)
        i2t = batchify(recall_at_k, scores.T, positive.T, batch_size, "cpu", k=k)
        out[f"i2t_r@{k}"] = float((i2t > 0).float().mean())
        out[f"t2i_r@{k}"] = float((t2i > 0).float().mean())
    out["images"] = float(img.shape[0])
    return out


def _retrieval(
    model: Any,
    loader: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    *,
    recall_at: Sequence[int],
    size: int | None,
    device: str,
    amp: bool,
) -> dict[str, float]:
    from clip_benchmark.metrics import zeroshot_retrieval

    # CLIP_benchmark's recall@K takes torch.topk(K), which fails when K exceeds the number of images
    ks = [k for k in recall_at if size is None or k <= size]
    counted = _Counted(loader)
    got = zeroshot_retrieval.evaluate(model, counted, tokenizer, device, amp=amp, recall_k_list=ks)
    out: dict[str, float] = {}
    for k in ks:
        # CLIP_benchmark's "text retrieval" ranks captions for an image (our i2t), "image retrieval" the reverse
        out[f"i2t_r@{k}"] = float(got[f"text_retrieval_recall@{k}"])
        out[f"t2i_r@{k}"] = float(got[f"image_retrieval_recall@{k}"])
    out["images"] = float(counted.images)
    return out


def _log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def evaluate_benchmarks(
    model: Any,
    *,
    names: Sequence[str],
    tokenizer: Callable[[list[str]], torch.Tensor],
    transform: Callable[[Any], torch.Tensor],
    eval_cfg: EvalCfg,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] | None = None,
    shard: Shard | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` on each named dataset; per name ``{"status": "ok", "layout", "root", metrics...}``
    or ``{"status": "absent", "reason": ...}``. Metrics are fractions: ``top1``, ``top5``,
    ``mean_per_class_recall`` (classification), ``i2t_r@K``, ``t2i_r@K`` (retrieval), and ``images``.

    ``model`` offers ``encode_image`` and ``encode_text`` (CLIP_benchmark normalises); it runs in eval mode,
    under autocast only on CUDA, and its train/eval mode is restored afterwards. Progress lines go to
    ``log`` (default: stderr, so a command's stdout keeps only its result; with a ``shard``, rank 0 only).

    ``shard``: this rank's part of an evaluation split across ranks (every rank must call with the same
    names; all get the same results, equal to the single-process ones).
    """
    from torch.utils.data import DataLoader

    shard = shard or Shard()
    if log is None:
        log = _log_to_stderr if shard.rank == 0 else (lambda line: None)

    device_type = torch.device(device).type  # CLIP_benchmark passes it to torch.autocast
    amp = device_type == "cuda"
    templates = prompt_templates(eval_cfg.benchmark_templates)
    cache: dict[tuple[str, str], torch.Tensor] = {}
    results: dict[str, dict[str, Any]] = {}
    with eval_mode(model):
        for name in names:
            if name not in BENCHMARKS:
                raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
            loc = locate(name, getattr(eval_cfg.roots, name))
            built = _build(loc, transform) if isinstance(loc, Located) else loc
            if isinstance(built, str):
                log(f"siclip: {name}: absent ({built})")
                results[name] = {"status": "absent", "reason": built}
                continue
            assert isinstance(loc, Located)
            loader = DataLoader(
                _slice(built.dataset, shard),
                batch_size=eval_cfg.batch_size,
                shuffle=False,
                num_workers=eval_cfg.loader_workers,
                collate_fn=built.collate,
            )
            log(f"siclip: {name}: evaluating {BENCHMARKS[name].title} from {loc.root} ({loc.layout})")
            if built.classnames is not None:
                classifier = _classifier(
                    model,
                    tokenizer,
                    built.classnames,
                    built.templates or templates,
                    device=device_type,
                    amp=amp,
                    cache=cache,
                    shard=shard,
                )
                metrics = _classification(model, loader, classifier, device=device_type, amp=amp, shard=shard)
            elif shard.distributed:
                metrics = _retrieval_sharded(
                    model,
                    loader,
                    tokenizer,
                    recall_at=eval_cfg.recall_at,
                    batch_size=eval_cfg.batch_size,
                    device=device_type,
                    amp=amp,
                    shard=shard,
                )
            else:
                metrics = _retrieval(
                    model,
                    loader,
                    tokenizer,
                    recall_at=eval_cfg.recall_at,
                    size=built.size,
                    device=device_type,
                    amp=amp,
                )
            results[name] = {"status": "ok", "layout": loc.layout, "root": str(loc.root), **metrics}
    return results


def flatten(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{"<dataset>/<metric>": value}`` for the datasets evaluated (absent ones have no entry)."""
    return {
        f"{name}/{k}": float(v)
        for name, r in results.items()
        if r.get("status") == "ok"
        for k, v in r.items()
        if isinstance(v, float) and k != "images"
    }
