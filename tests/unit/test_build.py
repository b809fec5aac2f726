"""The student and the teacher: exact inheritance, what trains and what is frozen (BatchNorm statistics
included), the student options, and every kind of teacher source, strictly loaded."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from torch import nn

from siclip.config import ModelCfg, TeacherCfg
from siclip.models.build import build_student, build_teacher
from siclip.models.inherit import InheritError, set_train_mode
from siclip.models.presets import build_tokenizer, list_presets, preset_config
from siclip.models.registry import register
from siclip.models.sasp import is_sasp
from tests.helpers import same_state, save_state_dict

torch.set_num_threads(1)

LAST = "visual.trunk.stages.2.blocks"
PLAIN = "siclip-test-plain-teacher"
"""tiny-teacher's config under a name that is no preset: a teacher open_clip builds by name."""


@pytest.fixture(scope="module", autouse=True)
def plain_open_clip_teacher(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{PLAIN}.json").write_text(json.dumps(preset_config("tiny-teacher")))
    register()
    open_clip.add_model_config(folder)


# ----------------------------------------------------------------------------------------- student
def test_student_inherits_exactly_and_freezes(teacher_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = teacher_file
    student: Any
    student, report = build_student(ModelCfg(name="tiny-student", source=str(path)))
    assert report is not None and not report.missing and not report.unexpected
    state = student.state_dict()
    for key in ("visual.trunk.stem.0.conv_kxk.0.conv.weight", "text.token_embedding.weight",
                "visual.trunk.stages.1.blocks.0.mlp.fc1.weight", "logit_scale"):  # fmt: skip
        assert torch.equal(state[key], sd[key])
    unchanged = [k for k in state if not k.startswith(LAST)]
    assert all(torch.equal(state[k], sd[k]) for k in unchanged)
    # SAS-P blocks: Q/K from the first block's qkv, norm/MLP from each block.
    dim = 128
    assert torch.equal(state[f"{LAST}.0.attn.qk.weight"], sd[f"{LAST}.0.token_mixer.qkv.weight"][: 2 * dim])
    assert torch.equal(state[f"{LAST}.1.mlp.fc2.weight"], sd[f"{LAST}.1.mlp.fc2.weight"])
    assert torch.equal(state[f"{LAST}.1.norm.running_var"], sd[f"{LAST}.1.norm.running_var"])
    assert report.new and all(k.startswith(LAST) for k in report.new)

    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert "logit_scale" in trainable
    assert all(n.startswith(LAST) or n == "logit_scale" for n in trainable)
    assert all(p.requires_grad for m in student.modules() if is_sasp(m) for p in m.parameters())

    # One training step: frozen modules get no gradient and their BatchNorm statistics do not move.
    bn_before = {n: b.clone() for n, b in student.named_buffers() if "running" in n}
    params_before = {n: p.detach().clone() for n, p in student.named_parameters()}
    set_train_mode(student, True)
    assert student.training and not student.visual.trunk.stem.training and not student.text.training
    assert student.get_submodule(f"{LAST}.0").training
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    images = torch.randn(4, 3, 64, 64)
    texts = build_tokenizer("tiny-student")(["red circle", "blue square", "green star", "two dots"])
    img = student.encode_image(images, normalize=True)
    txt = student.encode_text(texts, normalize=True)
    loss = nn.functional.cross_entropy(student.logit_scale.exp() * img @ txt.T, torch.arange(4))
    loss.backward()
    opt.step()
    for n, p in student.named_parameters():
        if n in trainable:
            assert p.grad is not None
        else:
            assert p.grad is None and torch.equal(p, params_before[n]), n
    for n, b in student.named_buffers():
        if n in bn_before and not n.startswith(LAST):
            assert torch.equal(b, bn_before[n]), n
    assert not torch.equal(
        student.get_submodule(f"{LAST}.0").norm.running_mean, bn_before[f"{LAST}.0.norm.running_mean"]
    )
    assert not torch.equal(
        params_before[f"{LAST}.0.attn.qk.weight"], student.get_submodule(f"{LAST}.0").attn.qk.weight
    )


def test_without_inheritance_everything_trains() -> None:
    student, report = build_student(ModelCfg(name="tiny-student", inherit=False, source="ignored.pt"))
    assert report is None
    assert all(p.requires_grad for p in student.parameters())
    student_no_src, report = build_student(ModelCfg(name="tiny-student"))
    assert report is None and all(p.requires_grad for p in student_no_src.parameters())


def test_student_options(
    teacher_file: tuple[Path, dict[str, torch.Tensor]], caplog: pytest.LogCaptureFixture
) -> None:
    path, sd = teacher_file
    with caplog.at_level(logging.INFO, logger="siclip.models.build"):
        student, report = build_student(
            ModelCfg(name="tiny-student", source=str(path), freeze_logit_scale=True, freeze_bn_stats=False)
        )
    assert report is not None
    assert report.new == [k for k in student.state_dict() if k.startswith(LAST + ".")]
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total = sum(p.numel() for p in student.parameters())
    assert not student.logit_scale.requires_grad and 0 < trainable < total
    # one line says how much of the student trains
    (logged,) = [r.getMessage() for r in caplog.records if r.name == "siclip.models.build"]
    assert "tiny-student" in logged and str(trainable) in logged and str(total) in logged
    set_train_mode(student)
    assert all(m.training for m in student.modules())  # BatchNorm statistics follow the mode
    # not freezing: everything trains, nothing logged; the weights are still inherited
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="siclip.models.build"):
        free, report = build_student(ModelCfg(name="tiny-student", source=str(path), freeze_inherited=False))
    assert report is not None and all(p.requires_grad for p in free.parameters())
    assert torch.equal(free.state_dict()["text.token_embedding.weight"], sd["text.token_embedding.weight"])
    assert not [r for r in caplog.records if r.name == "siclip.models.build"]
    # freeze_inherited without a source freezes nothing
    alone, _ = build_student(ModelCfg(name="tiny-student", inherit=True, source="", freeze_logit_scale=True))
    assert [n for n, p in alone.named_parameters() if not p.requires_grad] == ["logit_scale"]


def test_student_sources_must_fit_exactly(
    teacher_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, sd = teacher_file
    partial = save_state_dict(
        {k: v for k, v in sd.items() if k != "text.ln_final.bias"}, tmp_path / "partial.pt"
    )
    with pytest.raises(InheritError, match=r"text\.ln_final\.bias"):
        build_student(ModelCfg(name="tiny-student", source=str(partial)))


def test_an_unsimplified_student_inherits_everything_and_has_nothing_new(
    teacher_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, sd = teacher_file
    student, report = build_student(ModelCfg(name="tiny-teacher", source=str(path)))
    assert (
        report is not None and report.new == [] and report.dropped == [] and len(report.inherited) == len(sd)
    )
    assert same_state(student.state_dict(), sd)
    assert [n for n, p in student.named_parameters() if p.requires_grad] == ["logit_scale"]


# ----------------------------------------------------------------------------------------- teacher
def test_teacher_is_frozen_in_eval(teacher_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = teacher_file
    teacher = build_teacher(TeacherCfg(name="tiny-teacher", source=str(path)))
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert same_state(teacher.state_dict(), sd)
    with pytest.raises(ValueError) as err:
        build_teacher(TeacherCfg(name="not-a-model"))
    assert "teacher.name" in str(err.value) and "not-a-model" in str(err.value)
    assert all(name in str(err.value) for name in list_presets())  # what is allowed


def test_teacher_sources_must_fit_exactly(
    teacher_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, sd = teacher_file
    partial = save_state_dict(
        {k: v for k, v in sd.items() if k != "text.ln_final.bias"}, tmp_path / "partial.pt"
    )
    for name in ("tiny-teacher", PLAIN):  # a preset, a plain open_clip config name
        with pytest.raises(InheritError, match=r"text\.ln_final\.bias"):
            build_teacher(TeacherCfg(name=name, source=str(partial)))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
def test_open_clip_teacher_reads_task_checkpoints_of_each_suffix(
    teacher_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, suffix: str
) -> None:
    # siclip's loader reads these (open_clip's own could not: student.* keys)
    _, sd = teacher_file
    task = save_state_dict(
        {**{"student." + k: v for k, v in sd.items()}, "loss.tau": torch.ones(())}, tmp_path / f"t{suffix}"
    )
    teacher = build_teacher(TeacherCfg(name=PLAIN, source=str(task)))
    assert same_state(teacher.state_dict(), sd)


def test_open_clip_teacher_from_local_dir_and_from_a_pretrained_file(
    teacher_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, sd = teacher_file
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text("{}")
    save_state_dict(sd, folder / "open_clip_model.safetensors")
    from_dir = build_teacher(TeacherCfg(name=PLAIN, source=f"local-dir:{folder}"))
    assert same_state(from_dir.state_dict(), sd)
    # neither a weights suffix nor a colon: an open_clip pretrained value (a tag, or a file open_clip reads)
    ckpt = tmp_path / "teacher.ckpt"
    torch.save(sd, ckpt)
    by_tag = build_teacher(TeacherCfg(name=PLAIN, source=str(ckpt)))
    assert same_state(by_tag.state_dict(), sd)
    assert not by_tag.training and not any(p.requires_grad for p in by_tag.parameters())
