"""build_task: the student, the loss and the frozen teacher a config's KD terms distil from (no Ray)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from siclip.config import from_dict
from siclip.task import build_batches, build_task


def test_a_kd_term_gets_the_configured_frozen_teacher(teacher_file: tuple[Path, dict[str, Tensor]]) -> None:
    path, sd = teacher_file
    teacher_cfg = {"name": "tiny-teacher", "source": str(path)}
    cfg = from_dict({"model": {"name": "tiny-student"}, "teacher": teacher_cfg, "loss": {"fd_weight": 1.0}})
    task, _ = build_task(cfg)
    assert task.teacher is not None
    got = task.teacher.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())  # the file's weights
    assert not any(p.requires_grad for p in task.teacher.parameters())
    assert not any(p is q for p in task.parameters() for q in task.teacher.parameters())  # not trained

    # no KD term on in any stage: no teacher is loaded at all
    off = {"fd_weight": 0.0, "icl_weight": 0.0, "crd_weight": 0.0, "pm_weight": 0.0}
    cfg = from_dict({"model": {"name": "tiny-student"}, "teacher": teacher_cfg, "loss": off})
    assert build_task(cfg)[0].teacher is None


def test_batches_carry_teacher_inputs_only_where_its_preprocessing_differs(tmp_path: Path) -> None:
    from tests.data_fixtures import write_id_shard

    shard = write_id_shard(tmp_path / "s-000000.tar", range(8))
    shapes = {}
    for teacher in ("tiny-teacher", "mobileclip-s0"):  # same 64 px / 32 tokens as the student; 256 px / 77
        cfg = from_dict(
            {
                "model": {"name": "tiny-student"},
                "teacher": {"name": teacher},
                "data": {"train_shards": [shard], "batch_size": 4, "loader_workers": 0, "augment": False},
            }
        )
        batch = next(iter(build_batches(cfg, rank=0, world_size=1, epoch_offset=0, with_teacher=True)))
        shapes[teacher] = {k: tuple(v.shape) for k, v in batch.items()}
    assert shapes["tiny-teacher"] == {"image": (4, 3, 64, 64), "text": (4, 32)}
    mobile = shapes["mobileclip-s0"]
    assert mobile["image"] == (4, 3, 64, 64) and mobile["text"] == (4, 32)
    assert mobile["teacher_image"] == (4, 3, 256, 256) and mobile["teacher_text"] == (4, 77)
