"""Zero-shot accuracy on the classes a student's data covers and on those it does not, against a naive
reference on a tiny fabricated classifier (every image its own random embedding, every class its own)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import to_tensor

from siclip.eval.zeroshot import evaluate_zeroshot

N_CLASSES, PER_CLASS, DIM = 7, 5, 4
UNSEEN = ("c1", "c4", "c5")


class TableModel(torch.nn.Module):
    """encode_image reads the image's id from its red channel; encode_text reads the class id token."""

    def __init__(self, image_table: torch.Tensor, text_table: torch.Tensor) -> None:
        super().__init__()
        self.image_table, self.text_table = image_table, text_table

    def encode_image(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        ids = torch.round(x[:, 0].mean(dim=(1, 2)) * 255 / 4).long()
        return F.normalize(self.image_table[ids], dim=-1)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return F.normalize(self.text_table[tokens[:, 0]], dim=-1)


def _tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([int(t.strip("c")) for t in texts])[:, None]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("zs")
    for k in range(N_CLASSES):
        (root / f"c{k}").mkdir()
        for j in range(PER_CLASS):
            image_id = k * PER_CLASS + j
            Image.new("RGB", (4, 4), (4 * image_id, 0, 0)).save(root / f"c{k}" / f"{j}.png")
    return root


def _naive(image_table: np.ndarray, text_table: np.ndarray, classes: list[int], k: int) -> float:
    """Share of the images of ``classes`` whose class is among the k classes of highest cosine."""
    text = text_table / np.linalg.norm(text_table, axis=1, keepdims=True)
    hits = n = 0
    for c in classes:
        for j in range(PER_CLASS):
            v = image_table[c * PER_CLASS + j]
            scores = [float(v @ text[i]) / float(np.linalg.norm(v)) for i in range(N_CLASSES)]
            ranked = sorted(range(N_CLASSES), key=lambda i, s=scores: -s[i])  # type: ignore[misc]
            hits += c in ranked[:k]
            n += 1
    return hits / n


@pytest.mark.parametrize("trial", range(3))
def test_seen_and_unseen_accuracy_match_the_naive_reference(folder, trial: int) -> None:
    g = torch.Generator().manual_seed(trial)
    text_table = torch.randn(N_CLASSES, DIM, generator=g)
    # images near their class embedding, with enough noise that some are wrong
    labels = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
    image_table = text_table[labels] + 1.2 * torch.randn(N_CLASSES * PER_CLASS, DIM, generator=g)
    model = TableModel(image_table, text_table)
    (folder / "held_out_classes.txt").write_text("\n".join(UNSEEN) + "\n")
    got = evaluate_zeroshot(model, tokenizer=_tokenizer, transform=to_tensor, folder=folder, templates=["{}"])
    unseen = [int(c[1:]) for c in UNSEEN]
    seen = [c for c in range(N_CLASSES) if c not in unseen]
    img, txt = image_table.numpy(), text_table.numpy()
    expected = {"zeroshot_top1": _naive(img, txt, list(range(N_CLASSES)), 1)}
    expected["zeroshot_top5"] = _naive(img, txt, list(range(N_CLASSES)), 5)
    for name, classes in (("seen", seen), ("unseen", unseen)):
        expected[f"zeroshot_top1_{name}"] = _naive(img, txt, classes, 1)
        expected[f"zeroshot_top5_{name}"] = _naive(img, txt, classes, 5)
    assert got == pytest.approx(expected)
    assert 0 < got["zeroshot_top1"] < 1  # the fabricated classifier makes mistakes: the split is tested
    # the same split passed explicitly; without the file, only the overall accuracy
    (folder / "held_out_classes.txt").unlink()
    explicit = evaluate_zeroshot(
        model,
        tokenizer=_tokenizer,
        transform=to_tensor,
        folder=folder,
        templates=["{}"],
        unseen_classes=UNSEEN,
    )
    assert explicit == pytest.approx(expected)
    plain = evaluate_zeroshot(
        model, tokenizer=_tokenizer, transform=to_tensor, folder=folder, templates=["{}"]
    )
    assert plain == pytest.approx({k: v for k, v in expected.items() if k.count("_") == 1})


def test_a_held_out_class_that_is_not_a_folder_is_named(folder) -> None:
    model = TableModel(torch.eye(N_CLASSES * PER_CLASS), torch.eye(N_CLASSES * PER_CLASS)[:N_CLASSES])
    with pytest.raises(ValueError, match="c9"):
        evaluate_zeroshot(
            model,
            tokenizer=_tokenizer,
            transform=to_tensor,
            folder=folder,
            templates=["{}"],
            unseen_classes=["c9"],
        )
