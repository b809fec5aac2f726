"""The paper's suite on tiny copies of the six datasets in their real layouts: found, evaluated end to end,
absent ones reported (never downloaded), and the numbers equal to CLIP_benchmark's own ``evaluate``.

A bag-of-tokens stub model keeps the 1000-class ImageNet classifiers cheap (one that knows every image's
class checks ImageNet-V2's labels); the equality with CLIP_benchmark uses the real tiny-teacher preset on
datasets with few classes.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmark_fixtures as fx

from siclip.config import from_dict
from siclip.eval.benchmarks import (
    PAPER_SUITE,
    Located,
    evaluate_benchmarks,
    flatten,
    locate,
    prompt_templates,
)
from siclip.eval.paper_table import format_paper_table, paper_table


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """CLIP_benchmark's builders download with wget/gdown/kaggle (subprocess) or requests: any attempt fails."""
    import clip_benchmark.datasets.builder as builder
    import clip_benchmark.datasets.imagenetv2 as v2

    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args!r}")

    monkeypatch.setattr(builder, "call", refuse)
    monkeypatch.setattr(v2.requests, "get", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


BagModel = fx.BagModel


def _transform():
    from siclip.models.presets import build_transform

    return build_transform("tiny-teacher", train=False)


def _tokenizer():
    from siclip.models.presets import build_tokenizer

    return build_tokenizer("tiny-teacher")


def _eval_cfg(roots: dict[str, str], **extra):
    return from_dict(
        {
            "eval": {
                "roots": roots,
                "benchmark_templates": "simple",
                "loader_workers": 0,
                "batch_size": 8,
                **extra,
            }
        }
    ).eval


@pytest.fixture(scope="module")
def suite_roots(tmp_path_factory) -> dict[str, str]:
    return fx.make_paper_suite(tmp_path_factory.mktemp("paper"))


def test_templates_and_classnames_are_the_maintained_ones() -> None:
    import clip_benchmark.datasets.builder as builder
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    cb_dir = Path(builder.__file__).parent
    cb_templates = json.loads((cb_dir / "en_zeroshot_classification_templates.json").read_text())[
        "imagenet1k"
    ]
    openai = prompt_templates("openai")
    assert len(openai) == 80
    assert [t("dog") for t in openai] == [t.format(c="dog") for t in cb_templates]
    cb_names = json.loads((cb_dir / "en_classnames.json").read_text())["imagenet1k"]
    assert list(IMAGENET_CLASSNAMES) == cb_names


def test_locate_finds_each_real_layout(suite_roots) -> None:
    layouts = {name: locate(name, root) for name, root in suite_roots.items()}
    assert all(isinstance(v, Located) for v in layouts.values()), layouts
    assert layouts["mscoco"].layout == "coco2014"  # type: ignore[union-attr]
    assert layouts["imagenetv2"].root.name == "ImageNetV2-matched-frequency"  # type: ignore[union-attr]


def test_absent_datasets_are_reported_not_downloaded(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no root configured (eval.roots.imagenet1k)" in str(locate("imagenet1k", ""))
    assert "is not a directory" in str(locate("flickr30k", str(tmp_path / "missing")))
    # these roots exist but lack the files CLIP_benchmark would otherwise download
    for name in ("imagenetv2", "mscoco", "flickr30k", "imagenet1k"):
        reason = locate(name, str(tmp_path / "empty"))
        assert isinstance(reason, str) and "expected ROOT/" in reason, name
    got = evaluate_benchmarks(
        BagModel(),
        names=["imagenetv2", "mscoco"],
        tokenizer=_tokenizer(),
        transform=_transform(),
        eval_cfg=_eval_cfg({"imagenetv2": str(tmp_path / "empty")}),
        log=lambda _: None,
    )
    assert (
        got["imagenetv2"]["status"] == "absent"
        and "ImageNetV2-matched-frequency" in got["imagenetv2"]["reason"]
    )
    assert got["mscoco"] == {"status": "absent", "reason": "no root configured (eval.roots.mscoco)"}
    assert flatten(got) == {}


def test_an_incomplete_class_layout_is_absent_not_mislabelled(tmp_path) -> None:
    # three wnid folders only: ImageFolder would label them 0, 1, 2, i.e. as the first three ImageNet classes
    for w in fx.imagenet_wnids()[500:503]:
        (tmp_path / "sketch" / w).mkdir(parents=True)
        fx.flat_image(1).save(tmp_path / "sketch" / w / "a.JPEG", format="JPEG")
    got = evaluate_benchmarks(
        BagModel(),
        names=["imagenet_sketch"],
        tokenizer=_tokenizer(),
        transform=_transform(),
        eval_cfg=_eval_cfg({"imagenet_sketch": str(tmp_path / "sketch")}),
        log=lambda _: None,
    )
    assert got["imagenet_sketch"]["status"] == "absent"
    assert "3 class folders, expected 1000" in got["imagenet_sketch"]["reason"]


def _naive_top1(model: BagModel, images: torch.Tensor, labels: list[int], classnames, templates) -> float:
    """Reference: average the normalised prompt embeddings per class, pick the most similar class."""
    texts = [t(c) for c in classnames for t in templates]
    with torch.no_grad():
        emb = model.encode_text(_tokenizer()(texts), normalize=True).view(len(classnames), len(templates), -1)
        cls = F.normalize(emb.mean(1), dim=-1)
        pred = (model.encode_image(images, normalize=True) @ cls.T).argmax(1)
    return float((pred == torch.tensor(labels)).float().mean())


def test_paper_suite_end_to_end_on_all_six_layouts(suite_roots, monkeypatch) -> None:
    # one prompt per class keeps the 1000-class classifiers cheap (the template sets are checked above)
    import siclip.eval.benchmarks as benchmarks

    one = prompt_templates("simple")[:1]
    monkeypatch.setattr(benchmarks, "prompt_templates", lambda kind: one)
    model = BagModel()
    lines: list[str] = []
    got = evaluate_benchmarks(
        model,
        names=PAPER_SUITE,
        tokenizer=_tokenizer(),
        transform=_transform(),
        eval_cfg=_eval_cfg(suite_roots, recall_at=[1, 5]),
        log=lines.append,
    )
    assert [r["status"] for r in got.values()] == ["ok"] * 6, got
    for name in ("imagenet1k", "imagenetv2", "imagenet_r", "imagenet_sketch"):
        assert got[name]["images"] == fx.N_IMAGES
        assert 0.0 <= got[name]["top1"] <= got[name]["top5"] <= 1.0
    for name in ("mscoco", "flickr30k"):
        assert got[name]["images"] == fx.N_IMAGES
        assert 0.0 <= got[name]["i2t_r@1"] <= got[name]["i2t_r@5"] <= 1.0
    # ImageNet-1k top-1 against a naive re-implementation over the same images, labels and class names
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(
        str(Path(suite_roots["imagenet1k"]) / "val"), transform=_transform(), allow_empty=True
    )
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    labels = [folder[i][1] for i in range(len(folder))]
    want = _naive_top1(model, images, labels, IMAGENET_CLASSNAMES, one)
    assert got["imagenet1k"]["top1"] == pytest.approx(want)
    # same images as ImageNet-1k in V2's layout (labels from folder indices): same accuracy
    assert got["imagenetv2"]["top1"] == pytest.approx(got["imagenet1k"]["top1"])
    assert set(flatten(got)) >= {"imagenet_r/top1", "mscoco/t2i_r@5", "flickr30k/i2t_r@1"}
    table = format_paper_table(paper_table(got, name="stub"))
    assert "| stub | this checkpoint |" in table and "absent" not in table.split("Sources")[0]


def _accuracy_numpy2(output, target, topk=(1,)):
    """CLIP_benchmark's ``accuracy``, minus its ``float(array)`` that numpy 2 refuses."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]


def test_equal_to_clip_benchmark_evaluate(tmp_path, monkeypatch) -> None:
    """Our suite and our own retrieval code against CLIP_benchmark's ``evaluate`` on the real tiny-teacher."""
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn
    from clip_benchmark.metrics import zeroshot_classification as zc
    from clip_benchmark.metrics import zeroshot_retrieval as zr
    from torch.utils.data import DataLoader

    from siclip.eval.metrics import retrieval_recall
    from siclip.models.presets import build_preset

    monkeypatch.setattr(zc, "accuracy", _accuracy_numpy2)
    import webdataset.utils

    monkeypatch.setattr(
        webdataset.utils, "enforce_security", False
    )  # CLIP_benchmark's reader, on our own fixture
    torch.manual_seed(0)
    model = build_preset("tiny-teacher").eval()
    tok, tf = _tokenizer(), _transform()
    names = ["red thing", "green thing", "blue thing", "grey thing", "pink thing", "dark thing"]
    templates = ["a photo of a {c}.", "itap of a {c}."]
    wds_root = fx.make_wds_classification(tmp_path / "wds", names, templates)
    coco_root = fx.make_mscoco(tmp_path / "coco")
    ours = evaluate_benchmarks(
        model,
        names=["imagenet1k", "mscoco"],
        tokenizer=tok,
        transform=tf,
        eval_cfg=_eval_cfg({"imagenet1k": str(wds_root), "mscoco": str(coco_root)}, recall_at=[1, 5]),
        log=lambda _: None,
    )
    assert ours["imagenet1k"]["layout"] == "wds"

    cls_ds = build_dataset("wds/imagenet1k", root=str(wds_root), transform=tf, split="test")
    theirs_cls = zc.evaluate(
        model, DataLoader(cls_ds, batch_size=8), tok, cls_ds.classes, cls_ds.templates, "cpu", amp=False
    )
    assert ours["imagenet1k"]["top1"] == pytest.approx(theirs_cls["acc1"], abs=1e-9)
    assert ours["imagenet1k"]["top5"] == pytest.approx(theirs_cls["acc5"], abs=1e-9)
    assert ours["imagenet1k"]["mean_per_class_recall"] == pytest.approx(theirs_cls["mean_per_class_recall"])

    ret_ds = build_dataset(
        "mscoco_captions",
        root=str(coco_root),
        transform=tf,
        split="test",
        task="zeroshot_retrieval",
        download=False,
    )
    loader = DataLoader(ret_ds, batch_size=8, collate_fn=get_dataset_collate_fn("mscoco_captions"))
    theirs_ret = zr.evaluate(model, loader, tok, "cpu", amp=False, recall_k_list=[1, 5])
    assert ours["mscoco"]["i2t_r@1"] == pytest.approx(theirs_ret["text_retrieval_recall@1"])
    assert ours["mscoco"]["t2i_r@5"] == pytest.approx(theirs_ret["image_retrieval_recall@5"])

    # siclip's own ranking (used on the demo's shards) gives CLIP_benchmark's numbers on the same embeddings
    with torch.no_grad():
        imgs, caps, owner = [], [], []
        for i, (img, texts) in enumerate(ret_ds):
            imgs.append(model.encode_image(img[None], normalize=True))
            caps += texts
            owner += [i] * len(texts)
        mine = retrieval_recall(
            torch.cat(imgs), model.encode_text(tok(caps), normalize=True), torch.tensor(owner), [1, 5]
        )
    for k in (1, 5):
        assert mine[f"i2t_r@{k}"] == pytest.approx(theirs_ret[f"text_retrieval_recall@{k}"])
        assert mine[f"t2i_r@{k}"] == pytest.approx(theirs_ret[f"image_retrieval_recall@{k}"])
    assert np.isfinite(list(flatten(ours).values())).all()


def test_siclip_eval_suite_paper_writes_the_table(tmp_path, capsys) -> None:
    """The command end to end: a tiny-teacher checkpoint, ImageNet-1k/R/Sketch as WebDataset exports,
    COCO and Flickr30k in their folder layouts, ImageNet-V2 absent."""
    import yaml
    from safetensors.torch import save_model

    from siclip.cli import main
    from siclip.models.presets import build_preset

    torch.manual_seed(0)
    save_model(build_preset("tiny-teacher"), str(tmp_path / "model.safetensors"))
    names, templates = ["red thing", "green thing", "blue thing"], ["a photo of a {c}."]
    roots = {
        "imagenet1k": str(fx.make_wds_classification(tmp_path / "in1k", names, templates)),
        "imagenet_r": str(fx.make_wds_classification(tmp_path / "inr", names, templates)),
        "imagenet_sketch": str(fx.make_wds_classification(tmp_path / "sketch", names, templates)),
        "mscoco": str(fx.make_mscoco(tmp_path / "coco")),
        "flickr30k": str(fx.make_flickr30k(tmp_path / "flickr")),
        "imagenetv2": str(tmp_path / "not-here"),
    }
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny-teacher", "sasp": {"replace": "none"}},
                "eval": {"roots": roots, "loader_workers": 0, "recall_at": [1, 5], "batch_size": 8},
            }
        )
    )
    code = main(
        [
            "eval",
            "--config",
            str(cfg),
            "--checkpoint",
            str(tmp_path / "model.safetensors"),
            "--suite",
            "paper",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)  # stdout is the one JSON object; progress and logs go to stderr
    bench = out["benchmarks"]
    assert bench["imagenetv2"]["status"] == "absent"
    assert [
        bench[n]["status"] for n in ("imagenet1k", "imagenet_r", "imagenet_sketch", "mscoco", "flickr30k")
    ] == ["ok"] * 5
    table = json.loads((tmp_path / "paper_table.json").read_text())
    ours = table["rows"][0]["values"]
    assert ours["imagenetv2/top1"] is None and "not-here" in table["absent"]["imagenetv2"]
    assert ours["mscoco/i2t_r@1"] == pytest.approx(round(100 * bench["mscoco"]["i2t_r@1"], 2))
    md = (tmp_path / "paper_table.md").read_text()
    assert "MobileCLIP-S0" in md and "apple/ml-mobileclip" in md
    assert "| absent |" in md and "- imagenetv2: " in md  # the cell, and the reason listed


class _KnowsTheClass(BagModel):
    """A model that is always right: an image (told apart by its flat colour) is embedded as its own class's
    zero-shot column, so top-1 is 100 % exactly when the dataset's labels are the right classes."""

    def __init__(self, colours: dict[int, torch.Tensor], templates: list[str]) -> None:
        super().__init__(dim=64)
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        self.labels = list(colours)
        self.colours = torch.stack([colours[c] for c in self.labels])
        with torch.no_grad():
            columns = [
                F.normalize(
                    F.normalize(
                        self.encode_text(
                            _tokenizer()([t.format(c=IMAGENET_CLASSNAMES[c]) for t in templates])
                        ),
                        dim=-1,
                    ).mean(0),
                    dim=0,
                )
                for c in self.labels
            ]
        self.columns = torch.stack(columns)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        nearest = torch.cdist(images.mean((2, 3)), self.colours).argmin(1)
        return self.columns[nearest]


def test_imagenetv2_classes_are_its_folder_names(tmp_path, monkeypatch) -> None:
    """ImageNet-V2's label is the number its folder is named by (not the folder's position): a model that
    knows every image's class scores 100 % through the suite, and CLIP_benchmark's own ImageNet-V2 reader
    (told the copy's size, so it does not download) gives the same numbers."""
    import clip_benchmark.datasets.imagenetv2 as cb_v2
    from clip_benchmark.metrics import zeroshot_classification as zc
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from torch.utils.data import DataLoader

    import siclip.eval.benchmarks as benchmarks

    one = prompt_templates("simple")[:1]  # one prompt per class keeps the 1000-class classifier cheap
    monkeypatch.setattr(benchmarks, "prompt_templates", lambda kind: one)
    classes = [0, 7, 42, 311, 999]
    folder = tmp_path / "v2" / "ImageNetV2-matched-frequency"
    for i in range(10):
        label = classes[i % len(classes)]
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        fx.flat_image(label).save(folder / str(label) / f"{i:03d}.jpeg", format="JPEG")
    tf = _transform()
    templates = [t("{c}") for t in one]
    model = _KnowsTheClass({c: tf(fx.flat_image(c)).mean((1, 2)) for c in classes}, templates)
    ours = evaluate_benchmarks(
        model,
        names=["imagenetv2"],
        tokenizer=_tokenizer(),
        transform=tf,
        eval_cfg=_eval_cfg({"imagenetv2": str(tmp_path / "v2")}),
        log=lambda _: None,
    )["imagenetv2"]
    assert ours["status"] == "ok" and ours["images"] == 10
    assert ours["top1"] == 1.0 and ours["mean_per_class_recall"] == 1.0

    monkeypatch.setattr(cb_v2, "V2_DATASET_SIZE", 10)
    theirs_ds = cb_v2.ImageNetV2Dataset(transform=tf, location=str(tmp_path / "v2"))
    classifier = zc.zero_shot_classifier(
        model, _tokenizer(), list(IMAGENET_CLASSNAMES), templates, "cpu", amp=False
    )
    logits, target = zc.run_classification(
        model, classifier, DataLoader(theirs_ds, batch_size=8), "cpu", amp=False
    )
    assert ours["top1"] == pytest.approx(_accuracy_numpy2(logits, target)[0])


def test_demo_zeroshot_matches_clip_benchmark(tmp_path, monkeypatch) -> None:
    """siclip's demo zero-shot (open_clip's classifier on an ImageFolder) against CLIP_benchmark's evaluate."""
    from clip_benchmark.metrics import zeroshot_classification as zc
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from siclip.eval.zeroshot import evaluate_zeroshot
    from siclip.models.presets import build_preset

    monkeypatch.setattr(zc, "accuracy", _accuracy_numpy2)
    torch.manual_seed(0)
    model = build_preset("tiny-teacher").eval()
    folder = tmp_path / "folder"
    for i in range(fx.N_IMAGES):
        (folder / f"class_{i % 6}").mkdir(parents=True, exist_ok=True)
        fx.flat_image(i % 6).save(folder / f"class_{i % 6}" / f"{i}.png")
    names = [f"class {i}" for i in range(6)]
    mine = evaluate_zeroshot(
        model,
        tokenizer=_tokenizer(),
        transform=_transform(),
        folder=folder,
        templates=["a photo of a {}.", "a {}."],
    )
    ds = ImageFolder(str(folder), transform=_transform())
    cb = zc.evaluate(
        model,
        DataLoader(ds, batch_size=8),
        _tokenizer(),
        names,
        ["a photo of a {c}.", "a {c}."],
        "cpu",
        amp=False,
    )
    assert mine["zeroshot_top1"] == pytest.approx(cb["acc1"]) and mine["zeroshot_top5"] == pytest.approx(
        cb["acc5"]
    )
