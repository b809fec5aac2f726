"""Evaluation: recall@K with several captions per image against a naive reference, zero-shot accuracy of an
oracle and of a random model, and the model's train/eval mode restored."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import to_tensor

from siclip.data.shards import AtomicShardWriter
from siclip.eval.metrics import retrieval_recall, topk_accuracy
from siclip.eval.retrieval import evaluate_retrieval
from siclip.eval.zeroshot import evaluate_zeroshot, load_classnames

N_CLASSES = 10


def naive_recall(sim: np.ndarray, text_to_image: list[int], ks) -> dict[str, float]:
    """sim[i, j]: image i vs caption j. Sorted lists, ties broken against the right answer."""
    n_img, n_txt = sim.shape
    out = {}
    for k in ks:
        hits = 0
        for i in range(n_img):
            by_text = sorted(range(n_txt), key=lambda j, i=i: (float(-sim[i, j]), text_to_image[j] == i))  # type: ignore[misc]
            hits += any(text_to_image[j] == i for j in by_text[:k])
        out[f"i2t_r@{k}"] = hits / n_img
        hits = 0
        for j in range(n_txt):
            by_image = sorted(range(n_img), key=lambda i, j=j: (float(-sim[i, j]), i == text_to_image[j]))  # type: ignore[misc]
            hits += text_to_image[j] in by_image[:k]
        out[f"t2i_r@{k}"] = hits / n_txt
    return out


def test_recall_hand_made() -> None:
    # rows: captions, columns: images; with identity image embeddings, sim[image, caption] = S[caption, image]
    S = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # image 0: own image first
            [0.2, 0.8, 0.1],  # image 0: one image above
            [0.5, 0.4, 0.6],  # image 1: two above
            [0.1, 0.2, 0.7],  # image 2: first
            [0.3, 0.3, 0.3],  # image 2: all tied -> counts as third
            [0.0, 0.9, 0.5],  # image 2: one above
        ]
    )
    t2i = torch.tensor([0, 0, 1, 2, 2, 2])
    got = retrieval_recall(torch.eye(3), S, t2i, (1, 2, 3))
    expected = {
        "t2i_r@1": 2 / 6,
        "t2i_r@2": 4 / 6,
        "t2i_r@3": 1.0,
        # image 0: best own caption 0.9, nothing above; image 1: own 0.4 below 0.8 and 0.9; image 2: own 0.7 top
        "i2t_r@1": 2 / 3,
        "i2t_r@2": 2 / 3,
        "i2t_r@3": 1.0,
    }
    assert got == pytest.approx(expected)
    assert naive_recall(S.T.numpy(), t2i.tolist(), (1, 2, 3)) == pytest.approx(expected)


def test_recall_random_against_naive() -> None:
    g = torch.Generator().manual_seed(0)
    n_img = 40
    t2i = torch.tensor([i for i in range(n_img) for _ in range(1 + i % 3)])
    img = F.normalize(torch.randn(n_img, 8, generator=g), dim=-1)
    txt = F.normalize(img[t2i] + 0.9 * torch.randn(len(t2i), 8, generator=g), dim=-1)
    ks = (1, 5, 10)
    got = retrieval_recall(img, txt, t2i, ks, chunk=7)  # chunking must not change anything
    ref = naive_recall((img @ txt.T).numpy(), t2i.tolist(), ks)
    assert got == pytest.approx(ref)
    assert 0 < got["i2t_r@1"] < 1 and 0 < got["t2i_r@1"] < 1


def test_topk_accuracy() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.3, 0.2, 0.1]])
    labels = torch.tensor([1, 2, 2])
    assert topk_accuracy(logits, labels, (1, 2, 5)) == {1: 1, 2: 2, 5: 3}


class FakeModel(torch.nn.Module):
    """encode_image reads the id painted into the image; encode_text reads the id in the text tokens."""

    def __init__(self, image_table: torch.Tensor, text_table: torch.Tensor) -> None:
        super().__init__()
        self.image_table, self.text_table = image_table, text_table
        self.modes: list[bool] = []

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.modes.append(self.training)
        assert not torch.is_grad_enabled()
        ids = torch.round(x[:, 0].mean(dim=(1, 2)) * 255 / 4).long()  # red channel = 4 * id
        out = self.image_table[ids]
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        self.modes.append(self.training)
        out = self.text_table[tokens[:, 0]]
        return F.normalize(out, dim=-1) if normalize else out


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (4 * value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_evaluate_retrieval_matches_naive(tmp_path) -> None:
    n_img, g = 30, torch.Generator().manual_seed(1)
    n_caps = [1 + i % 4 for i in range(n_img)]
    t2i: list[int] = []
    paths = []
    for shard in range(2):
        path = tmp_path / f"ret-{shard:06d}.tar"
        with AtomicShardWriter(path) as w:
            for i in range(shard * 15, shard * 15 + 15):
                caps = [f"img {i} cap {c}" for c in range(n_caps[i])]
                sample: dict[str, object] = {"__key__": f"{i:06d}", "png": _png(i), "txt": caps[0]}
                if n_caps[i] > 1:  # one-caption samples exercise the txt fallback
                    sample["json"] = {"captions": caps}
                w.write(sample)
                t2i += [i] * n_caps[i]
        paths.append(str(path))
    image_table = torch.randn(n_img, 16, generator=g)
    text_table = image_table[torch.tensor(t2i)] + 1.2 * torch.randn(len(t2i), 16, generator=g)
    offsets = np.cumsum([0, *n_caps])

    def tokenizer(texts: list[str]) -> torch.Tensor:
        ids = []
        for t in texts:
            i, c = map(int, re.findall(r"\d+", t))
            ids.append(offsets[i] + c)
        return torch.tensor(ids)[:, None]

    model = FakeModel(image_table, text_table)
    model.train()
    got = evaluate_retrieval(
        model, tokenizer=tokenizer, transform=to_tensor, urls=paths, recall_at=(1, 5, 10), batch_size=8
    )
    assert model.training and not any(model.modes)  # evaluated in eval mode, train mode restored
    sim = (F.normalize(image_table, dim=-1) @ F.normalize(text_table, dim=-1).T).numpy()
    assert got == pytest.approx(naive_recall(sim, t2i, (1, 5, 10)))
    assert set(got) == {f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}


@pytest.fixture(scope="module")
def shade_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    for k in range(N_CLASSES):
        (root / f"shade_{k:02d}").mkdir()
        for j in range(20):
            Image.new("RGB", (6, 6), (4 * k, j, 0)).save(root / f"shade_{k:02d}" / f"{j:03d}.png")
    (root.parent / "classnames.txt").write_text("\n".join(f"tone {k}" for k in range(N_CLASSES)) + "\n\n")
    return root


def _class_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([int(re.search(r"(\d+)", t).group(1)) for t in texts])[:, None]  # type: ignore[union-attr]


def test_zeroshot_oracle_is_perfect(shade_folder) -> None:
    onehot = torch.eye(N_CLASSES)
    model = FakeModel(onehot, onehot)
    model.train()
    got = evaluate_zeroshot(
        model,
        tokenizer=_class_tokenizer,
        transform=to_tensor,
        folder=shade_folder,
        templates=["a photo of a {}.", "a {}."],
        batch_size=32,
    )
    assert got == {"zeroshot_top1": 1.0, "zeroshot_top5": 1.0}
    assert model.training and not any(model.modes)
    # class names from a file, in folder order
    names = load_classnames(shade_folder.parent / "classnames.txt")
    assert names[3] == "tone 3" and len(names) == N_CLASSES
    got = evaluate_zeroshot(
        model,
        tokenizer=_class_tokenizer,
        transform=to_tensor,
        folder=shade_folder,
        classnames=names,
        templates=["{}"],
    )
    assert got["zeroshot_top1"] == 1.0
    with pytest.raises(ValueError, match="class names"):
        evaluate_zeroshot(
            model,
            tokenizer=_class_tokenizer,
            transform=to_tensor,
            folder=shade_folder,
            classnames=names[:3],
            templates=["{}"],
        )


def test_zeroshot_random_model_is_near_chance(shade_folder) -> None:
    g = torch.Generator().manual_seed(0)
    model = FakeModel(torch.randn(N_CLASSES, 32, generator=g), torch.randn(N_CLASSES, 32, generator=g))
    # Average over random models: each one's accuracy is 0, 0.1, ... (all images of a class look alike)
    top1, top5 = [], []
    for _ in range(30):
        model.image_table = torch.randn(N_CLASSES, 32, generator=g)
        got = evaluate_zeroshot(
            model, tokenizer=_class_tokenizer, transform=to_tensor, folder=shade_folder, templates=["{}"]
        )
        top1.append(got["zeroshot_top1"])
        top5.append(got["zeroshot_top5"])
    assert abs(np.mean(top1) - 0.1) < 0.05 and abs(np.mean(top5) - 0.5) < 0.1
