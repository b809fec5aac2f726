"""Weight inheritance: source formats, exact copies, strict errors naming the keys, what is new or dropped,
freezing and BatchNorm statistics."""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

from siclip.config import SaspCfg
from siclip.models.inherit import (
    InheritError,
    InheritReport,
    freeze_inherited,
    inherit_weights,
    load_source_state_dict,
    set_train_mode,
)
from siclip.models.mct import convert_apple_state_dict
from siclip.models.presets import build_preset
from siclip.models.sasp import SASPBlock
from tests.helpers import same_state, save_state_dict

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


def _text_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A few text-tower tensors only (no ``visual.*`` key)."""
    return {k: v for k, v in sd.items() if k.startswith("text.")}


# ----------------------------------------------------------------------------------------- loading
def test_source_formats(tmp_path: Path, teacher_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, sd = teacher_file
    small = {k: sd[k] for k in list(sd)[:5]}
    torch.save(small, tmp_path / "raw.pt")
    torch.save({"state_dict": small, "epoch": 3}, tmp_path / "nested.pth")
    torch.save({"model": {"module." + k: v for k, v in small.items()}}, tmp_path / "ddp.bin")
    for name in ("raw.pt", "nested.pth", "ddp.bin"):
        assert same_state(load_source_state_dict(str(tmp_path / name)), small)
    assert load_source_state_dict(str(path)).keys() == sd.keys()
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    save_file(small, str(folder / "open_clip_model.safetensors"))
    assert load_source_state_dict(f"local-dir:{folder}").keys() == small.keys()
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_source_state_dict(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError) as err:
        load_source_state_dict("weights.ckpt")
    assert "weights.ckpt" in str(err.value) and "MODEL:TAG" in str(err.value)  # what it got, what is allowed


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_each_weights_suffix_is_read_as_a_file_a_uri_and_a_lone_file_in_local_dir(
    tmp_path: Path, suffix: str, teacher_file: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    sd = _text_part(teacher_file[1])
    path = save_state_dict(sd, tmp_path / f"w{suffix}")
    assert same_state(load_source_state_dict(str(path)), sd)
    assert same_state(load_source_state_dict(path.resolve().as_uri()), sd)  # file:// goes through storage
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    (folder / "README.md").write_text("not weights")
    path.rename(folder / f"custom-name{suffix}")
    assert same_state(load_source_state_dict(f"local-dir:{folder}"), sd)


def test_local_dir_errors_name_the_folder_and_what_was_found(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        load_source_state_dict(f"local-dir:{folder}")
    assert str(folder) in str(err.value) and "open_clip_config.json" in str(err.value)
    (folder / "open_clip_config.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        load_source_state_dict(f"local-dir:{folder}")
    (folder / "open_clip_config.json").write_text("{}")
    torch.save({"a": torch.ones(1)}, folder / "b.pt")
    torch.save({"a": torch.zeros(1)}, folder / "a.bin")
    with pytest.raises(FileNotFoundError) as err:
        load_source_state_dict(f"local-dir:{folder}")
    assert str(folder) in str(err.value) and "a.bin" in str(err.value) and "b.pt" in str(err.value)
    # a file with a known name wins over the others
    save_file({"a": torch.full((1,), 3.0)}, str(folder / "open_clip_model.safetensors"))
    assert torch.equal(load_source_state_dict(f"local-dir:{folder}")["a"], torch.full((1,), 3.0))


def test_model_tag_splits_at_the_first_colon_only(
    tmp_path: Path, teacher_file: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    # open_clip takes a file path as a pretrained "tag"; one with a colon shows the split is at the first.
    _, sd = teacher_file
    weights = tmp_path / "tag:with-colon.ckpt"
    torch.save(sd, weights)
    assert same_state(load_source_state_dict(f"tiny-teacher:{weights}"), sd)


def test_non_state_dict_files_and_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(InheritError) as err:
        load_source_state_dict(str(tmp_path / "tensor.pt"))
    assert "tensor.pt" in str(err.value) and "Tensor" in str(err.value)
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
    assert same_state(load_source_state_dict(str(save_state_dict(mixed, tmp_path / "mixed.pt"))), mixed)
    # a text-only model state dict (no visual.*, no student.*) is not mistaken for a task checkpoint
    assert same_state(load_source_state_dict(str(save_state_dict(sd, tmp_path / "text.pt"))), sd)
    # student.* next to visual.* keys: a model state dict, not a task checkpoint
    plain = {**sd, "visual.proj": torch.ones(2), "student.note": torch.zeros(1)}
    assert same_state(load_source_state_dict(str(save_state_dict(plain, tmp_path / "plain.bin"))), plain)
    task = {**{"student." + k: v for k, v in sd.items()}, "loss.tau": torch.ones(())}
    assert same_state(load_source_state_dict(str(save_state_dict(task, tmp_path / "task.pth"))), sd)
    # non-tensor entries of a state dict are dropped
    assert same_state(
        load_source_state_dict(str(save_state_dict({**sd, "step": 3}, tmp_path / "extra.pt"))), sd
    )  # type: ignore[dict-item]


@pytest.mark.parametrize("prefix", ["text_encoder.", "image_encoder."])
def test_apple_checkpoints_are_converted_on_the_way_in(tmp_path: Path, prefix: str) -> None:
    apple = (
        {"text_encoder.embedding_layer.weight": torch.randn(5, 4), "logit_scale": torch.tensor(4.2)}
        if prefix == "text_encoder."
        else {"image_encoder.model.head.proj": torch.randn(8, 4), "logit_scale": torch.tensor(4.2)}
    )
    got = load_source_state_dict(str(save_state_dict(apple, tmp_path / "mobileclip_s0.pt")))
    want = convert_apple_state_dict(apple)
    assert same_state(got, want) and not any(k.startswith(prefix) for k in got)


# ----------------------------------------------------------------------------------------- inheriting
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


def test_strict_errors_name_the_keys_and_load_nothing(
    teacher_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    _, sd = teacher_file
    model = build_preset("tiny-teacher")
    text_keys = [k for k in model.state_dict() if k.startswith("text.")]
    bad = {k: v for k, v in sd.items() if k not in text_keys[:9]}
    bad["text.ln_final.bias"] = torch.zeros(7)
    bad["extra.weight"] = torch.zeros(1)
    before = copy.deepcopy(model.state_dict())
    # the source's good tensors differ from the fresh model's, so copying any of them would show
    assert any(
        not torch.equal(before[k], v) for k, v in bad.items() if k in before and v.shape == before[k].shape
    )
    with pytest.raises(InheritError) as err:
        inherit_weights(model, bad)
    msg = str(err.value)
    assert all(k in msg for k in text_keys[:8]) and re.search(
        r"\b9\b", msg
    )  # the first missing keys, how many
    assert text_keys[8] not in msg  # a long list is cut short
    assert "text.ln_final.bias" in msg and "(7,)" in msg and "(64,)" in msg  # both shapes of a mismatch
    assert "extra.weight" in msg
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded on error
    report = inherit_weights(model, bad, strict=False)
    assert report.unexpected == ["extra.weight"] and len(report.mismatched) == 1
    assert report.missing == text_keys[:9]


def test_mismatch_and_the_logit_scale_reshape(teacher_file: tuple[Path, dict[str, torch.Tensor]]) -> None:
    _, sd = teacher_file
    model = build_preset("tiny-teacher")
    src = dict(sd)
    src["logit_scale"] = torch.full((1,), 2.5)  # a 1-element logit scale of another layout still fits
    src["text.ln_final.bias"] = sd["text.ln_final.bias"].reshape(1, -1)  # same numel, other key: no
    report = inherit_weights(model, src, strict=False)
    assert len(report.mismatched) == 1 and "text.ln_final.bias" in report.mismatched[0]
    assert "logit_scale" in report.inherited and "text.ln_final.bias" not in report.inherited
    assert len(report.inherited) == len(sd) - 1 and not report.missing and not report.unexpected
    assert model.logit_scale.shape == () and model.logit_scale.item() == 2.5
    with pytest.raises(InheritError, match=r"text\.ln_final\.bias"):
        inherit_weights(model, src)


def test_a_float64_source_is_copied_into_the_model_dtype(
    teacher_file: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    _, sd = teacher_file
    model = build_preset("tiny-teacher")
    inherit_weights(model, {k: v.double() if v.is_floating_point() else v for k, v in sd.items()})
    state = model.state_dict()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in sd.items())


@pytest.mark.parametrize("share", ["qk", "block"])
def test_unsimplified_source_into_simplified_model(
    teacher_file: tuple[Path, dict[str, torch.Tensor]], share: str
) -> None:
    _, sd = teacher_file
    student: Any = build_preset("tiny-student", sasp=SaspCfg(share=share))  # type: ignore[arg-type]
    student.logit_bias = nn.Parameter(torch.zeros(()))  # optional: a source need not have it
    report = inherit_weights(student, sd)
    state = student.state_dict()
    assert report.new == [k for k in state if k == "logit_bias" or (k.startswith(LAST + ".") and k not in sd)]
    assert report.dropped == [k for k in sd if k not in state]
    assert report.dropped and all(k.startswith(LAST + ".") for k in report.dropped)
    assert report.inherited == [k for k in state if k in sd] and not report.missing
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
    with pytest.raises(InheritError, match="e2"):
        inherit_weights(model, src)


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
