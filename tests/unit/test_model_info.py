"""``param_counts``: image / text / total / trainable counts on hand-built modules, with a shared tensor counted
once, the logit scale and bias outside both towers, and models without an image tower or logit scalars."""

from __future__ import annotations

import torch
from torch import nn

from siclip.models.info import param_counts


class _TinyClip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Linear(2, 2)  # 6
        shared = nn.Linear(3, 3)  # 12, registered twice
        self.text = nn.Sequential(shared, nn.ReLU(), shared)
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.logit_bias = nn.Parameter(torch.zeros([]))


def test_counts_split_towers_and_count_a_shared_tensor_once() -> None:
    model = _TinyClip()
    model.visual.bias.requires_grad_(False)  # 2 frozen
    assert param_counts(model) == {"image": 6, "text": 12, "total": 20, "trainable": 18}


def test_logit_scale_and_bias_are_in_no_tower() -> None:
    model = _TinyClip()
    del model.logit_bias
    model.extra = nn.Parameter(torch.zeros(5))  # any other parameter outside the image tower is text
    assert param_counts(model) == {"image": 6, "text": 17, "total": 24, "trainable": 24}


def test_a_module_shared_by_both_towers_counts_as_image_only() -> None:
    model = _TinyClip()
    model.visual = nn.Linear(3, 3)
    model.text = nn.Sequential(model.visual, nn.Linear(3, 1))
    assert param_counts(model) == {"image": 12, "text": 4, "total": 18, "trainable": 18}


def test_model_without_image_tower_or_logit_scalars() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    model[1].requires_grad_(False)
    assert param_counts(model) == {"image": 0, "text": 11, "total": 11, "trainable": 8}


def test_a_non_module_visual_attribute_is_not_an_image_tower() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    model.visual = None  # type: ignore[assignment]
    assert param_counts(model) == {"image": 0, "text": 8, "total": 8, "trainable": 8}
