"""The GPU benchmark's CPU path (tiny presets): it trains both settings, freezes what it claims, halves on OOM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import siclip.bench.gpu as bench


def test_synthetic_batch_is_what_the_task_reads() -> None:
    b = bench.synthetic_batch(
        batch=3,
        image_size=16,
        context_length=7,
        teacher_dim=5,
        synthetic_captions=True,
        device=torch.device("cpu"),
    )
    assert b["image"].shape == (3, 3, 16, 16) and b["image"].min() >= 0 and b["image"].max() < 1
    for key in ("text", "syn_text"):
        assert b[key].shape == (3, 7) and b[key].dtype == torch.int64
        # open_clip pools the text at the argmax id: it must be the last position, once per row.
        assert (b[key].argmax(dim=1) == 6).all()
        assert (b[key][:, :-1] < b[key][:, -1:]).all()
    for key in ("teacher_image_emb", "teacher_text_emb", "teacher_syn_emb"):
        assert torch.allclose(b[key].norm(dim=-1), torch.ones(3), atol=1e-5)
    plain = bench.synthetic_batch(
        batch=2,
        image_size=8,
        context_length=4,
        teacher_dim=None,
        synthetic_captions=False,
        device=torch.device("cpu"),
    )
    assert set(plain) == {"image", "text"}


def test_cpu_run_trains_frozen_student_and_full_baseline(tmp_path: Path) -> None:
    from siclip.models.presets import build_preset

    torch.set_num_threads(1)
    out = tmp_path / "gpu.md"
    result, table = bench.run_bench_gpu(
        model="tiny-student", batch=4, steps=1, warmup=0, device="cpu", out=str(out)
    )
    frozen, full = result["rows"].values()
    assert frozen["batch"] == full["batch"] == 4 and frozen["oom_at"] == full["oom_at"] == []
    for row in (frozen, full):  # one timed step of 4 samples: the throughput is 4 / step time
        assert row["samples_per_s"] == pytest.approx(4 / row["step_time_s"])
    assert frozen["bad_steps"] == full["bad_steps"] == 0
    # Counted independently: the student preset's and the baseline preset's own parameter totals.
    assert frozen["total_params"] == sum(p.numel() for p in build_preset("tiny-student").parameters())
    assert full["total_params"] == sum(p.numel() for p in build_preset("tiny-teacher").parameters())
    # Weight inheritance trains a small part; full fine-tuning trains every student parameter (+ the loss's).
    assert frozen["trainable_params"] < 0.25 * frozen["total_params"]
    assert full["trainable_params"] >= full["total_params"]
    assert out.read_text().strip() == table
    assert table.count("\n| tiny-") == 2 and "tiny-teacher, full fine-tuning" in table


def test_out_of_memory_halves_the_batch_until_it_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_measure(task: Any, *, batch: int, **_: Any) -> dict[str, float]:
        if batch > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return {
            "batch": float(batch),
            "samples_per_s": 1.0,
            "step_time_s": 1.0,
            "trainable_params": 1.0,
            "total_params": 1.0,
        }

    monkeypatch.setattr(bench, "measure_training", fake_measure)
    result, table = bench.run_bench_gpu(
        model="tiny-student", batch=16, steps=1, warmup=0, device="cpu", out=None
    )
    for row in result["rows"].values():
        assert row["batch"] == 2 and row["oom_at"] == [16, 8, 4]
    assert "| 16, 8, 4 |" in table

    monkeypatch.setattr(
        bench, "measure_training", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError())
    )
    result, table = bench.run_bench_gpu(
        model="tiny-student", batch=2, steps=1, warmup=0, device="cpu", out=None
    )
    assert all(row["batch"] == 0 and row["oom_at"] == [2, 1] for row in result["rows"].values())
    assert "did not fit" in table
