"""Weight inheritance: source formats, exact copies, strict errors, freezing and BatchNorm statistics."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

from siclip.config import ModelCfg, SaspCfg, TeacherCfg
from siclip.models.inherit import (
    InheritError,
    build_student,
    build_teacher,
    inherit_weights,
    load_source_state_dict,
    set_train_mode,
)
from siclip.models.presets import build_preset, build_tokenizer
from siclip.models.sasp import SASPBlock, is_sasp

torch.set_num_threads(1)

LAST = "visual.trunk.stages.2.blocks"


def test_source_formats(tmp_path: Path, teacher_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = teacher_file
    small = {k: sd[k] for k in list(sd)[:5]}
    torch.save(small, tmp_path / "raw.pt")
    torch.save({"state_dict": small, "epoch": 3}, tmp_path / "nested.pth")
    torch.save({"model": {"module." + k: v for k, v in small.items()}}, tmp_path / "ddp.bin")
    for name in ("raw.pt", "nested.pth", "ddp.bin"):
        got = load_source_state_dict(str(tmp_path / name))
        assert got.keys() == small.keys() and all(torch.equal(got[k], small[k]) for k in small)
    assert load_source_state_dict(str(path)).keys() == sd.keys()
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    save_file(small, str(folder / "open_clip_model.safetensors"))
    assert load_source_state_dict(f"local-dir:{folder}").keys() == small.keys()
    with pytest.raises(FileNotFoundError):
        load_source_state_dict(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="MODEL:TAG"):
        load_source_state_dict("no-such-thing")


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


def test_strict_errors_name_the_keys(teacher_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    _, sd = teacher_file
    model = build_preset("tiny-teacher")
    bad = dict(sd)
    bad["text.positional_embedding"] = torch.zeros(7, 64)
    bad["extra.weight"] = torch.zeros(1)
    del bad["visual.trunk.stem.0.conv_kxk.0.conv.weight"]
    before = copy.deepcopy(model.state_dict())
    # the source's good tensors differ from the fresh model's, so copying any of them would show
    assert any(
        not torch.equal(before[k], v) for k, v in bad.items() if k in before and v.shape == before[k].shape
    )
    with pytest.raises(InheritError) as err:
        inherit_weights(model, bad)
    msg = str(err.value)
    assert "text.positional_embedding" in msg and "extra.weight" in msg
    assert "visual.trunk.stem.0.conv_kxk.0.conv.weight" in msg
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded on error
    report = inherit_weights(model, bad, strict=False)
    assert report.unexpected == ["extra.weight"] and len(report.mismatched) == 1 and len(report.missing) == 1


def test_unsimplified_source_into_simplified_model(
    teacher_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    _, sd = teacher_file
    student = build_preset("tiny-student", sasp=SaspCfg(share="block"))
    report = inherit_weights(student, sd)
    assert report.dropped and all(k.startswith(LAST) for k in report.dropped)
    assert report.new and not report.missing
    assert isinstance(student.get_submodule(f"{LAST}.1"), SASPBlock)


def test_shared_tensors_saved_once_load_back(tmp_path: Path) -> None:
    torch.manual_seed(1)
    student: Any = build_preset("tiny-student")
    save_model(student, str(tmp_path / "s.safetensors"))  # writes the shared Q/K under one name
    other: Any = build_preset("tiny-student")
    report = inherit_weights(other, load_source_state_dict(str(tmp_path / "s.safetensors")))
    assert not report.missing
    assert torch.equal(
        other.get_submodule(f"{LAST}.1").attn.qk.weight, student.get_submodule(f"{LAST}.1").attn.qk.weight
    )


def test_teacher_is_frozen_in_eval(teacher_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = teacher_file
    teacher = build_teacher(TeacherCfg(name="tiny-teacher", source=str(path)))
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, sd[k]) for k, v in teacher.state_dict().items())
    # A plain open_clip config name (not a preset) works too; so does a task checkpoint (student.*, loss.*).
    task_file = path.parent / "task.safetensors"
    save_file({**{"student." + k: v for k, v in sd.items()}, "loss.tau": torch.ones(())}, str(task_file))
    by_name = build_teacher(TeacherCfg(name="siclip-tiny-teacher", source=str(task_file)))
    assert all(torch.equal(v, sd[k]) for k, v in by_name.state_dict().items())
    with pytest.raises(ValueError, match=r"teacher\.name"):
        build_teacher(TeacherCfg(name="not-a-model"))
