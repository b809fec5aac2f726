"""loss.fd_reference_dim: lambda1 (FD's weight) means the same pull per sample at any embedding width."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from siclip.config import LossCfg, load_config
from siclip.losses.total import build_loss

FD_ONLY = {"clip_weight": 0.0, "crd_weight": 0.0, "icl_weight": 0.0, "pm_weight": 0.0, "fd_weight": 4000.0}
ANGLES = (0.05, 0.2, 0.6, 1.3)  # per sample: the angle between the student's and the teacher's embedding
REPO = Path(__file__).resolve().parents[2]


def _pairs(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit student/teacher embeddings at width ``dim`` with the same per-sample cosines at every width:
    the teacher's is e_1, the student's cos(a) e_1 + sin(a) e_2, both turned by one random rotation."""
    q, _ = torch.linalg.qr(
        torch.randn(dim, dim, generator=torch.Generator().manual_seed(dim), dtype=torch.float64)
    )
    s = torch.zeros(len(ANGLES), dim, dtype=torch.float64)
    t = torch.zeros_like(s)
    for i, a in enumerate(ANGLES):
        s[i, 0], s[i, 1], t[i, 0] = math.cos(a), math.sin(a), 1.0
    return s @ q.T, t @ q.T


def _fd(dim: int, reference_dim: int) -> tuple[float, list[float]]:
    """The weighted FD term and the norm of its gradient on each student image embedding."""
    loss = build_loss(LossCfg(**FD_ONLY, fd_reference_dim=reference_dim), student_dim=dim, teacher_dim=dim)
    s_img, t_img = _pairs(dim)
    s_img.requires_grad_(True)
    out = loss(s_img, t_img.clone(), torch.tensor(0.0), t_img, t_img)  # text: student == teacher, FD 0
    (grad,) = torch.autograd.grad(out["loss"], [s_img])
    return float(out["loss"].detach()), [float(g) for g in grad.norm(dim=1)]


def test_with_a_reference_width_fd_pulls_each_sample_the_same_at_d64_and_d512() -> None:
    v64, g64 = _fd(64, 512)
    v512, g512 = _fd(512, 512)
    assert v64 == pytest.approx(v512, rel=1e-5)
    assert g64 == pytest.approx(g512, rel=1e-5)
    # the naive reference: lambda * |s - t|^2 summed over dimensions, over batch x reference width
    b = len(ANGLES)
    want = 4000.0 * sum(2 - 2 * math.cos(a) for a in ANGLES) / (b * 512)
    assert v512 == pytest.approx(want, rel=1e-5)
    want_grad = [4000.0 * 2 * math.sqrt(2 - 2 * math.cos(a)) / (b * 512) for a in ANGLES]
    assert g64 == pytest.approx(want_grad, rel=1e-5)


def test_without_one_fd_pulls_eight_times_harder_at_d64() -> None:
    v64, g64 = _fd(64, 0)
    v512, g512 = _fd(512, 0)
    assert v64 == pytest.approx(8 * v512, rel=1e-5)
    assert g64 == pytest.approx([8 * g for g in g512], rel=1e-5)
    same_v, same_g = _fd(512, 512)  # at the reference width the rule changes nothing
    assert same_v == pytest.approx(v512) and same_g == pytest.approx(g512)


@pytest.mark.parametrize("name", ["demo.yaml", "siclip_s0_cc12m.yaml"])
def test_shipped_student_configs_state_fd_weight_at_the_papers_width(name: str) -> None:
    cfg = load_config(REPO / "configs" / name, check_files=False)
    assert cfg.loss.fd_weight > 0 and cfg.loss.fd_reference_dim == 512
