"""Fixtures shared by the unit tests (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_model
from torch import nn

from siclip.models.presets import build_preset


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 'pretrained' tiny teacher: random weights with non-trivial BatchNorm statistics, and its state."""
    torch.manual_seed(0)
    model = build_preset("tiny-teacher")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("src") / "teacher.safetensors"
    save_model(model, str(path))
    return path, {k: v.clone() for k, v in model.state_dict().items()}
