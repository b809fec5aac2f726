"""Weight-inheritance contracts beyond the happy path.

Pins: where every kind of ``source`` string is read from (plain files of each suffix, ``local-dir:`` folders
and their fallbacks, ``file://`` URIs, ``MODEL:TAG`` with a colon in the tag, task and Apple checkpoints),
what a non-state-dict or pickled-object file does, the exact strict error text, the logit-scale reshape,
which modules :func:`freeze_inherited` freezes and returns, :func:`set_train_mode` both ways, the student
options (frozen logit scale, BatchNorm statistics that follow the model, no freezing, an unsimplified
student), and the teacher: strict loading on both branches, file sources of every suffix, ``local-dir:``
and open_clip pretrained-file sources, and the exact error for an unknown name.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

from siclip.config import ModelCfg, TeacherCfg
from siclip.models.inherit import (
    InheritError,
    InheritReport,
    build_student,
    build_teacher,
    freeze_inherited,
    inherit_weights,
    load_source_state_dict,
    set_train_mode,
)
from siclip.models.mct import convert_apple_state_dict
from siclip.models.presets import build_preset, list_presets

torch.set_num_threads(1)

LAST = "visual.trunk.stages.2.blocks"
SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# What freeze_inherited freezes in tiny-student: every top-most module that holds no SAS-P block.
TINY_STUDENT_FROZEN = [
    "visual.trunk.stem",
    "visual.trunk.stages.0",
    "visual.trunk.stages.1",
    "visual.trunk.stages.2.downsample",
    "visual.trunk.stages.2.pos_emb",
    "visual.trunk.final_conv",
    "visual.trunk.head",
    "visual.head",
    "text",
]


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _text_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A few text-tower tensors only (no ``visual.*`` key)."""
    return {k: v for k, v in sd.items() if k.startswith("text.")}


# ----------------------------------------------------------------------------------------- report
def test_summary_counts_lists_and_keeps_the_first_ten_problem_keys() -> None:
    keys = [f"k{i}" for i in range(12)]
    report = InheritReport(
        inherited=keys[:3], new=keys[:2], dropped=keys[:1], missing=keys, mismatched=keys[:10], unexpected=[]
    )
    assert report.summary() == {
        "inherited": 3,
        "new": 2,
        "dropped": 1,
        "missing": keys[:10],
        "mismatched": keys[:10],
        "unexpected": [],
    }


# ----------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_each_weights_suffix_is_read_as_a_file_a_uri_and_a_lone_file_in_local_dir(
    tmp_path: Path, suffix: str, teacher_file: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    sd = _text_part(teacher_file[1])
    path = _save(sd, tmp_path / f"w{suffix}")
    assert _same(load_source_state_dict(str(path)), sd)
    assert _same(load_source_state_dict(path.resolve().as_uri()), sd)  # file:// goes through storage
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    (folder / "README.md").write_text("not weights")
    path.rename(folder / f"custom-name{suffix}")
    assert _same(load_source_state_dict(f"local-dir:{folder}"), sd)


def test_local_dir_errors_name_the_folder_and_what_was_found(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"^local-dir:\S+: no open_clip_config\.json in \S+export$"):
        load_source_state_dict(f"local-dir:{folder}")
    (folder / "open_clip_config.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        load_source_state_dict(f"local-dir:{folder}")
    (folder / "open_clip_config.json").write_text("{}")
    torch.save({"a": torch.ones(1)}, folder / "b.pt")
    torch.save({"a": torch.zeros(1)}, folder / "a.bin")
    with pytest.raises(FileNotFoundError) as err:
        load_source_state_dict(f"local-dir:{folder}")
    assert (
        str(err.value) == f"local-dir:{folder}: no (single) weights file in {folder}; found ['a.bin', 'b.pt']"
    )
    # a file with a known name wins over the others
    save_file({"a": torch.full((1,), 3.0)}, str(folder / "open_clip_model.safetensors"))
    assert torch.equal(load_source_state_dict(f"local-dir:{folder}")["a"], torch.full((1,), 3.0))


def test_missing_file_and_unknown_source_messages(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.bin: no such checkpoint file$"):
        load_source_state_dict(str(tmp_path / "missing.bin"))
    with pytest.raises(ValueError) as err:
        load_source_state_dict("weights.ckpt")
    assert str(err.value) == (
        "source: got 'weights.ckpt'; allowed: an open_clip MODEL:TAG, a .pt/.pth/.bin/.safetensors file, "
        "or local-dir:PATH"
    )


def test_model_tag_splits_at_the_first_colon_only(
    tmp_path: Path, teacher_file: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    # open_clip takes a file path as a pretrained "tag"; one with a colon shows the split is at the first.
    _, sd = teacher_file
    weights = tmp_path / "tag:with-colon.ckpt"
    torch.save(sd, weights)
    got = load_source_state_dict(f"siclip-tiny-teacher:{weights}")
    assert _same(got, sd)


def test_non_state_dict_files_and_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(InheritError) as err:
        load_source_state_dict(str(tmp_path / "tensor.pt"))
    assert str(err.value) == f"{tmp_path / 'tensor.pt'}: holds a Tensor, not a state dict"
    # weights_only: a checkpoint that pickles arbitrary objects is not unpickled
    torch.save({"state_dict": {"a": torch.ones(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "obj.pth")
    with pytest.raises(pickle.UnpicklingError):
        load_source_state_dict(str(tmp_path / "obj.pth"))


def test_prefixes_are_stripped_only_when_they_are_the_layout(
    tmp_path: Path, teacher_file: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    sd = _text_part(teacher_file[1])
    # every key under module. -> stripped; only some -> the keys are kept as they are
    mixed = {**{"module." + k: v for k, v in sd.items()}, "other": torch.ones(1)}
    assert _same(load_source_state_dict(str(_save(mixed, tmp_path / "mixed.pt"))), mixed)
    # a text-only model state dict (no visual.*, no student.*) is not mistaken for a task checkpoint
    assert _same(load_source_state_dict(str(_save(sd, tmp_path / "text.pt"))), sd)
    # student.* next to visual.* keys: a model state dict, not a task checkpoint
    plain = {**sd, "visual.proj": torch.ones(2), "student.note": torch.zeros(1)}
    assert _same(load_source_state_dict(str(_save(plain, tmp_path / "plain.bin"))), plain)
    task = {**{"student." + k: v for k, v in sd.items()}, "loss.tau": torch.ones(())}
    assert _same(load_source_state_dict(str(_save(task, tmp_path / "task.pth"))), sd)
    # non-tensor entries of a state dict are dropped
    assert _same(load_source_state_dict(str(_save({**sd, "step": 3}, tmp_path / "extra.pt"))), sd)  # type: ignore[dict-item]


@pytest.mark.parametrize("prefix", ["text_encoder.", "image_encoder."])
def test_apple_checkpoints_are_converted_on_the_way_in(tmp_path: Path, prefix: str) -> None:
    apple = (
        {"text_encoder.embedding_layer.weight": torch.randn(5, 4), "logit_scale": torch.tensor(4.2)}
        if prefix == "text_encoder."
        else {"image_encoder.model.head.proj": torch.randn(8, 4), "logit_scale": torch.tensor(4.2)}
    )
    got = load_source_state_dict(str(_save(apple, tmp_path / "mobileclip_s0.pt")))
    want = convert_apple_state_dict(apple)
    assert _same(got, want) and not any(k.startswith(prefix) for k in got)


# ----------------------------------------------------------------------------------------- inheriting
def test_strict_error_text_lists_eight_keys_per_kind_then_an_ellipsis(
    teacher_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    _, sd = teacher_file
    model = build_preset("tiny-teacher")
    text_keys = [k for k in model.state_dict() if k.startswith("text.")]
    bad = {k: v for k, v in sd.items() if k not in text_keys[:9]}
    bad["extra.a"] = torch.ones(1)
    bad["visual.trunk.head.fc.weight"] = torch.ones(1)
    with pytest.raises(InheritError) as err:
        inherit_weights(model, bad)
    assert str(err.value) == (
        f"source weights do not fit the model: missing 9: {', '.join(text_keys[:8])} ...; "
        "mismatched 1: visual.trunk.head.fc.weight: source (1,) vs model (64, 256); unexpected 1: extra.a"
    )
    # eight keys: all named, no ellipsis
    eight = {k: v for k, v in sd.items() if k not in text_keys[:8]}
    with pytest.raises(InheritError) as err:
        inherit_weights(model, eight)
    assert str(err.value) == f"source weights do not fit the model: missing 8: {', '.join(text_keys[:8])}"


def test_mismatch_text_and_the_logit_scale_reshape(
    teacher_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    _, sd = teacher_file
    model = build_preset("tiny-teacher")
    src = dict(sd)
    src["logit_scale"] = torch.full((1,), 2.5)  # a 1-element logit scale of another layout still fits
    src["text.ln_final.bias"] = sd["text.ln_final.bias"].reshape(1, -1)  # same numel, other key: no
    report = inherit_weights(model, src, strict=False)
    assert report.mismatched == ["text.ln_final.bias: source (1, 64) vs model (64,)"]
    assert "logit_scale" in report.inherited and "text.ln_final.bias" not in report.inherited
    assert len(report.inherited) == len(sd) - 1 and not report.missing and not report.unexpected
    assert model.logit_scale.shape == () and model.logit_scale.item() == 2.5
    with pytest.raises(InheritError, match=r"mismatched 1: text\.ln_final\.bias: source \(1, 64\)"):
        inherit_weights(model, src)


def test_a_float64_source_is_copied_into_the_model_dtype(
    teacher_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    _, sd = teacher_file
    model = build_preset("tiny-teacher")
    inherit_weights(model, {k: v.double() if v.is_floating_point() else v for k, v in sd.items()})
    state = model.state_dict()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in sd.items())


def test_new_and_dropped_keys_of_an_unsimplified_source(
    teacher_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    _, sd = teacher_file
    student: Any = build_preset("tiny-student")
    student.logit_bias = nn.Parameter(torch.zeros(()))  # optional: a source need not have it
    report = inherit_weights(student, sd)
    state = student.state_dict()
    assert report.new == [k for k in state if k == "logit_bias" or (k.startswith(LAST + ".") and k not in sd)]
    assert report.dropped == [k for k in sd if k not in state]
    assert report.dropped and all(k.startswith(LAST + ".") for k in report.dropped)
    assert report.inherited == [k for k in state if k in sd]


class _WithEmpties(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.register_buffer("e1", torch.zeros(0))
        self.register_buffer("e2", torch.zeros(0, 3))


def test_distinct_empty_tensors_are_not_aliases_of_each_other() -> None:
    # empty tensors have no storage to share: each is looked up under its own name only
    model = _WithEmpties()
    src = {"lin.weight": torch.ones(2, 2), "lin.bias": torch.ones(2), "e1": torch.zeros(0)}
    report = inherit_weights(model, src, strict=False)
    assert report.missing == ["e2"] and report.inherited == ["e1", "lin.weight", "lin.bias"]
    with pytest.raises(InheritError, match=r"missing 1: e2$"):
        inherit_weights(model, src)


class _TiedByStorage(nn.Module):
    """Two distinct Parameters over one storage (what safetensors' save_model writes once)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        self.b.weight = nn.Parameter(self.a.weight.data)


def test_tensors_sharing_storage_load_from_the_one_name_saved(tmp_path: Path) -> None:
    torch.manual_seed(0)
    saved = _TiedByStorage()
    save_model(saved, str(tmp_path / "tied.safetensors"))
    src = load_source_state_dict(str(tmp_path / "tied.safetensors"))
    assert len(src) == 1
    model = _TiedByStorage()
    report = inherit_weights(model, src)
    assert not report.missing and sorted(report.inherited) == ["a.weight", "b.weight"]
    assert torch.equal(model.b.weight, saved.a.weight)


# ----------------------------------------------------------------------------------------- freezing
def test_freeze_inherited_returns_the_top_most_frozen_modules() -> None:
    model: Any = build_preset("tiny-student")
    model.logit_bias = nn.Parameter(torch.zeros(()))
    assert freeze_inherited(model) == TINY_STUDENT_FROZEN
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"logit_scale", "logit_bias"} | {
        n for n, _ in model.named_parameters() if n.startswith(LAST + ".")
    }
    # frozen modules, and every module below them, stay in eval mode under set_train_mode
    set_train_mode(model)
    for name, m in model.named_modules():
        under_frozen = any(name == f or name.startswith(f + ".") for f in TINY_STUDENT_FROZEN)
        assert m.training != under_frozen, name
    set_train_mode(model, False)
    assert not any(m.training for m in model.modules())
    set_train_mode(model, True)
    assert model.training and model.get_submodule(f"{LAST}.0").training and not model.text.training


def test_without_frozen_bn_stats_frozen_modules_follow_the_model_mode() -> None:
    model: Any = build_preset("tiny-student")
    assert freeze_inherited(model, freeze_bn_stats=False) == TINY_STUDENT_FROZEN
    assert not any(p.requires_grad for p in model.text.parameters())
    set_train_mode(model, True)
    assert all(m.training for m in model.modules())


def test_freezing_any_module_without_logit_parameters() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert freeze_inherited(model) == [""]
    assert not any(p.requires_grad for p in model.parameters())
    assert not set_train_mode(model).training


def test_freezing_a_model_without_sasp_blocks_freezes_it_whole() -> None:
    model: Any = build_preset("tiny-teacher")
    assert freeze_inherited(model) == [""]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["logit_scale"]
    set_train_mode(model)
    assert not any(m.training for m in model.modules())


# ----------------------------------------------------------------------------------------- student
def test_student_options(
    teacher_file: tuple[Path, dict[str, torch.Tensor]], caplog: pytest.LogCaptureFixture
) -> None:
    path, sd = teacher_file
    with caplog.at_level(logging.INFO, logger="siclip.models.inherit"):
        student, report = build_student(
            ModelCfg(name="tiny-student", source=str(path), freeze_logit_scale=True, freeze_bn_stats=False)
        )
    assert report is not None
    assert report.new == [k for k in student.state_dict() if k.startswith(LAST + ".")]
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total = sum(p.numel() for p in student.parameters())
    assert not student.logit_scale.requires_grad and 0 < trainable < total
    assert [r.getMessage() for r in caplog.records if r.name == "siclip.models.inherit"] == [
        f"student tiny-student: {trainable} trainable of {total} parameters"
    ]
    set_train_mode(student)
    assert all(m.training for m in student.modules())  # BatchNorm statistics follow the mode
    # not freezing: everything trains, nothing logged; the weights are still inherited
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="siclip.models.inherit"):
        free, report = build_student(ModelCfg(name="tiny-student", source=str(path), freeze_inherited=False))
    assert report is not None and all(p.requires_grad for p in free.parameters())
    assert torch.equal(free.state_dict()["text.token_embedding.weight"], sd["text.token_embedding.weight"])
    assert not [r for r in caplog.records if r.name == "siclip.models.inherit"]
    # freeze_inherited without a source freezes nothing
    alone, _ = build_student(ModelCfg(name="tiny-student", inherit=True, source="", freeze_logit_scale=True))
    assert [n for n, p in alone.named_parameters() if not p.requires_grad] == ["logit_scale"]


def test_student_sources_must_fit_exactly(
    teacher_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, sd = teacher_file
    partial = _save({k: v for k, v in sd.items() if k != "text.ln_final.bias"}, tmp_path / "partial.pt")
    with pytest.raises(InheritError, match=r"missing 1: text\.ln_final\.bias$"):
        build_student(ModelCfg(name="tiny-student", source=str(partial)))


def test_an_unsimplified_student_inherits_everything_and_has_nothing_new(
    teacher_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    path, sd = teacher_file
    student, report = build_student(ModelCfg(name="tiny-teacher", source=str(path)))
    assert (
        report is not None and report.new == [] and report.dropped == [] and len(report.inherited) == len(sd)
    )
    assert _same(student.state_dict(), sd)
    assert [n for n, p in student.named_parameters() if p.requires_grad] == ["logit_scale"]


# ----------------------------------------------------------------------------------------- teacher
def test_teacher_sources_must_fit_exactly(
    teacher_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, sd = teacher_file
    partial = _save({k: v for k, v in sd.items() if k != "text.ln_final.bias"}, tmp_path / "partial.pt")
    for name in ("tiny-teacher", "siclip-tiny-teacher"):  # a preset, a plain open_clip config name
        with pytest.raises(InheritError, match=r"missing 1: text\.ln_final\.bias$"):
            build_teacher(TeacherCfg(name=name, source=str(partial)))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_open_clip_teacher_reads_task_checkpoints_of_each_suffix(
    teacher_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, suffix: str
) -> None:
    # siclip's loader reads these (open_clip's own could not: student.* keys)
    _, sd = teacher_file
    task = _save(
        {**{"student." + k: v for k, v in sd.items()}, "loss.tau": torch.ones(())}, tmp_path / f"t{suffix}"
    )
    teacher = build_teacher(TeacherCfg(name="siclip-tiny-teacher", source=str(task)))
    assert _same(teacher.state_dict(), sd)


def test_open_clip_teacher_from_local_dir_and_from_a_pretrained_file(
    teacher_file: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    _, sd = teacher_file
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text("{}")
    _save(sd, folder / "open_clip_model.safetensors")
    from_dir = build_teacher(TeacherCfg(name="siclip-tiny-teacher", source=f"local-dir:{folder}"))
    assert _same(from_dir.state_dict(), sd)
    # neither a weights suffix nor a colon: an open_clip pretrained value (a tag, or a file open_clip reads)
    ckpt = tmp_path / "teacher.ckpt"
    torch.save(sd, ckpt)
    by_tag = build_teacher(TeacherCfg(name="siclip-tiny-teacher", source=str(ckpt)))
    assert _same(by_tag.state_dict(), sd)
    assert not by_tag.training and not any(p.requires_grad for p in by_tag.parameters())


def test_unknown_teacher_name_message() -> None:
    with pytest.raises(ValueError) as err:
        build_teacher(TeacherCfg(name="not-a-model"))
    assert str(err.value) == (
        f"teacher.name: got 'not-a-model'; allowed: a preset ({', '.join(list_presets())}) "
        "or an open_clip model name"
    )
