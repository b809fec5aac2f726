"""Checkpoint files: round trips on a real tiny SiclipTask, what a folder holds and how it is replaced, strict
and ``weights_only`` loading, the grad scaler, the random generators, and how ``--checkpoint`` finds weights.

The round trips use the tiny student (its last stage's two SAS-P blocks share one Q/K tensor) with every loss
term on (stored teacher embeddings in the batch, so KD runs without a teacher model) and PM drawing its hard
negatives from torch's global RNG, so a checkpoint that forgets the RNG, a loss temperature, the optimizer's
moments or the scheduler's position changes the next steps. The file-level tests use a task of two small
linears (``student.*``) and a loss temperature (``loss.*``); no Ray.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from siclip.config import LossCfg, ModelCfg, OptimCfg
from siclip.losses.total import build_loss
from siclip.models.build import build_student
from siclip.task import SiclipTask
from siclip.train.checkpoint import (
    MODEL_FILE,
    STATE_FILE,
    fetch_model_file,
    find_model_file,
    load_checkpoint,
    load_student_weights,
    save_checkpoint,
    save_student,
)
from siclip.train.loop import LoopHooks, LoopState, build_optimizer, build_scheduler, run_loop

SHARED = (
    "student.visual.trunk.stages.2.blocks.0.attn.qk.weight",
    "student.visual.trunk.stages.2.blocks.1.attn.qk.weight",
)
OPTIM = OptimCfg(lr=2e-3, weight_decay=0.1, warmup_steps=2, schedule="cosine", grad_clip=1.0)
STEPS = 4  # two before the checkpoint, two after


def make_task() -> tuple[SiclipTask, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    student, _ = build_student(ModelCfg(name="tiny-student"))
    loss = build_loss(
        LossCfg(pm_negatives="hard", pm_negatives_per_anchor=2, learn_temperatures=True),
        student_dim=64,
        teacher_dim=64,
    )
    task = SiclipTask(student, loss)
    opt = build_optimizer(task, OPTIM)
    return task, opt, build_scheduler(opt, OPTIM, STEPS)


def make_batches(n: int, *, size: int = 4) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(n):
        text = torch.randint(1, 100, (size, 32), generator=g)
        text[:, -1] = 1000  # open_clip pools at the argmax token
        out.append(
            {
                "image": torch.rand(size, 3, 32, 32, generator=g),  # the trunk takes any multiple of 32
                "text": text,
                "teacher_image_emb": F.normalize(torch.randn(size, 64, generator=g), dim=-1),
                "teacher_text_emb": F.normalize(torch.randn(size, 64, generator=g), dim=-1),
            }
        )
    return out


def train(task, opt, sched, data, *, start: int, stop: int) -> list[float]:
    losses: list[float] = []
    run_loop(
        task,
        iter(data),
        optimizer=opt,
        scheduler=sched,
        state=LoopState(step=start),
        max_steps=stop,
        device=torch.device("cpu"),
        log_every=1,
        hooks=LoopHooks(on_log=lambda _step, m: losses.append(m["loss/total"])),
    )
    return losses


def test_a_restored_task_takes_bit_identical_next_steps(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = make_batches(STEPS)
    # straight through
    task_a, opt_a, sched_a = make_task()
    torch.manual_seed(7)
    losses_a = train(task_a, opt_a, sched_a, data, start=0, stop=STEPS)

    # two steps, checkpoint, the RNG moves on (as other work in the process would), restore into fresh objects
    task_b, opt_b, sched_b = make_task()
    torch.manual_seed(7)
    losses_b = train(task_b, opt_b, sched_b, data[:2], start=0, stop=2)
    save_checkpoint(
        tmp_path / "ckpt",
        task=task_b,
        optimizer=opt_b,
        scheduler=sched_b,
        scaler=None,
        counters={"step": 2, "bad_steps": 0, "samples_seen": 8},
    )
    torch.rand(100)
    task_c, opt_c, sched_c = make_task()
    with torch.no_grad():  # the fresh task must not already equal the checkpoint
        assert task_c.loss.crd is not None
        task_c.loss.crd.student_log_scale.add_(0.5)
    counters = load_checkpoint(tmp_path / "ckpt", task=task_c, optimizer=opt_c, scheduler=sched_c)
    assert counters == {"step": 2, "bad_steps": 0, "samples_seen": 8}
    losses_c = train(task_c, opt_c, sched_c, data[2:], start=2, stop=STEPS)

    assert losses_b + losses_c == losses_a  # exact floats, every step
    state_a, state_c = task_a.state_dict(), task_c.state_dict()
    assert state_a.keys() == state_c.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_c[key]), key
    for group_a, group_c in zip(
        opt_a.state_dict()["state"].values(), opt_c.state_dict()["state"].values(), strict=True
    ):
        for key in group_a:
            assert torch.equal(torch.as_tensor(group_a[key]), torch.as_tensor(group_c[key])), key
    assert sched_a.state_dict()["last_epoch"] == sched_c.state_dict()["last_epoch"] == STEPS


def test_shared_qk_is_stored_once_and_shares_storage_after_reload(tmp_path: Path) -> None:
    task, opt, sched = make_task()
    params = dict(task.named_parameters(remove_duplicate=False))
    assert params[SHARED[0]] is params[SHARED[1]]
    save_checkpoint(
        tmp_path / "c", task=task, optimizer=opt, scheduler=sched, scaler=None, counters={"step": 0}
    )
    with safe_open(str(tmp_path / "c" / MODEL_FILE), framework="pt") as f:
        assert sum(k in SHARED for k in f.keys()) == 1  # noqa: SIM118
    fresh, opt2, sched2 = make_task()
    load_checkpoint(tmp_path / "c", task=fresh, optimizer=opt2, scheduler=sched2)
    a, b = (dict(fresh.named_parameters(remove_duplicate=False))[k] for k in SHARED)
    assert a is b and a.data_ptr() == b.data_ptr()
    assert torch.equal(a, params[SHARED[0]])
    # one optimizer entry for the shared tensor, and a step moves both blocks together
    assert sum(p is a for g in opt2.param_groups for p in g["params"]) == 1
    with torch.no_grad():
        a.add_(1.0)
    assert torch.equal(a, b)


class Task(nn.Module):
    def __init__(self, seed: int = 0, width: int = 4) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.student = nn.Sequential(nn.Linear(3, width), nn.Linear(width, 2))
        self.loss = nn.Module()
        self.loss.scale = nn.Parameter(torch.tensor(float(seed + 1)))


def _trained(seed: int = 0) -> tuple[Task, torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    task = Task(seed)
    optimizer = torch.optim.AdamW(task.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for _ in range(3):
        optimizer.zero_grad()
        (task.student(torch.ones(2, 3)).sum() * task.loss.scale).backward()
        optimizer.step()
        scheduler.step()
    scaler.scale(torch.ones(()))  # a scaler has no scale before its first use
    scaler.update(new_scale=2.0**9)
    return task, optimizer, scheduler, scaler


def _save(folder: Path, seed: int = 0, **counters: int) -> Path:
    task, optimizer, scheduler, scaler = _trained(seed)
    return save_checkpoint(
        folder, task=task, optimizer=optimizer, scheduler=scheduler, scaler=scaler, counters=counters
    )


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ writing
def test_a_checkpoint_folder_is_written_whole_into_new_nested_folders(tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "a" / "checkpoint_000001"  # neither runs/ nor a/ exist yet
    assert _save(folder, step=3, samples_seen=24) == folder
    assert sorted(p.name for p in folder.iterdir()) == [MODEL_FILE, STATE_FILE]
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint_000001"]
    assert load_checkpoint(folder, task=Task()) == {"step": 3, "samples_seen": 24}
    # saved without a grad scaler (fp32/bf16): resuming into one leaves its scale as it was
    task, optimizer, scheduler, _ = _trained()
    save_checkpoint(
        folder, task=task, optimizer=optimizer, scheduler=scheduler, scaler=None, counters={"step": 3}
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**5)
    load_checkpoint(folder, task=Task(), scaler=scaler)
    assert scaler.get_scale() == 2.0**5


def test_saving_again_replaces_the_folder_and_clears_a_crashed_saves_leftovers(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    _save(folder, seed=0, step=1)
    (folder / "stale.txt").write_text("from the first save")
    # what a save that crashed would leave: a half-written .tmp, and .old from between the two renames
    for leftover in ("ckpt.tmp", "ckpt.old"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "junk").write_text("x")
    _save(folder, seed=1, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in folder.iterdir()) == [MODEL_FILE, STATE_FILE]
    fresh = Task(seed=5)
    assert load_checkpoint(folder, task=fresh) == {"step": 2}
    assert _same(_params(fresh), _params(_trained(1)[0]))


def test_a_student_export_is_written_whole_and_replaced_whole(tmp_path: Path) -> None:
    folder = tmp_path / "run" / "final"
    student = Task(seed=2).student
    assert save_student(student, folder) == folder / MODEL_FILE
    (folder / "stale.txt").write_text("x")
    (tmp_path / "run" / "final.tmp").mkdir()
    (tmp_path / "run" / "final.tmp" / "junk").write_text("x")
    assert save_student(student, folder) == folder / MODEL_FILE
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["final"]
    assert sorted(p.name for p in folder.iterdir()) == [MODEL_FILE]
    fresh = Task(seed=9).student
    assert load_student_weights(fresh, folder) == folder / MODEL_FILE
    assert _same(_params(fresh), _params(student))


# ------------------------------------------------------------------------------ reading back
def test_load_restores_optimizer_scheduler_scaler_and_returns_the_counters(tmp_path: Path) -> None:
    _save(tmp_path / "c", step=3, bad_steps=1)
    task, optimizer, *_ = _trained()
    fresh = Task(seed=7)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    counters = load_checkpoint(tmp_path / "c", task=fresh, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert counters == {"step": 3, "bad_steps": 1}
    assert _same(_params(fresh), _params(task))
    assert scaler2.get_scale() == 2.0**9
    assert sched2.state_dict()["last_epoch"] == 3 and opt2.param_groups[0]["lr"] == pytest.approx(0.1 / 4)
    for a, b in zip(
        optimizer.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True
    ):
        assert a.keys() == b.keys() and all(
            torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a
        )
    # the weights alone (as for evaluation): the saved optimizer and scaler states are not needed
    weights_only = Task(seed=8)
    assert load_checkpoint(tmp_path / "c", task=weights_only) == {"step": 3, "bad_steps": 1}
    assert _same(_params(weights_only), _params(task))


def test_loading_is_strict_about_the_model_and_refuses_pickled_code(tmp_path: Path) -> None:
    _save(tmp_path / "c", step=1)
    wider = Task(width=5)  # same names, other shapes
    with pytest.raises(RuntimeError):
        load_checkpoint(tmp_path / "c", task=wider)
    extra = Task()
    extra.loss.other = nn.Parameter(torch.zeros(1))  # a weight the checkpoint lacks
    with pytest.raises(RuntimeError, match="other"):
        load_checkpoint(tmp_path / "c", task=extra)
    fewer = Task()
    del fewer.loss.scale  # a checkpoint weight the task lacks
    with pytest.raises(RuntimeError, match="scale"):
        load_checkpoint(tmp_path / "c", task=fewer)
    # train_state.pt loads with weights_only=True: a pickled object of any other class is refused
    state = torch.load(tmp_path / "c" / STATE_FILE, weights_only=True)
    state["counters"] = {"step": Path("not/a/number")}
    torch.save(state, tmp_path / "c" / STATE_FILE)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "c", task=Task())


# ------------------------------------------------------------------------------ random number generators
def _draws() -> tuple[float, ...]:
    return (
        random.random(),
        random.gauss(0, 1),
        float(np.random.rand()),
        float(np.random.standard_normal()),
        float(torch.rand(())),
    )


@pytest.mark.parametrize("cached", [False, True])
def test_every_global_rng_resumes_where_it_was_saved_with_or_without_a_cached_gaussian(
    tmp_path: Path, cached: bool
) -> None:
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    if cached:  # both generators keep the second of each gaussian pair for the next call
        random.gauss(0, 1)
        np.random.standard_normal()
    _save(tmp_path / "c", step=0)
    want = _draws()  # saving did not advance any generator
    _draws()
    load_checkpoint(tmp_path / "c", task=Task())
    assert _draws() == want


def test_a_checkpoint_that_kept_only_a_seed_resumes_reproducibly(tmp_path: Path) -> None:
    """Checkpoints written before the full generator states were kept hold torch's state and one seed."""
    _save(tmp_path / "c", step=0)
    state = torch.load(tmp_path / "c" / STATE_FILE, weights_only=True)
    state["rng"] = {"torch": torch.Generator().manual_seed(4).get_state(), "python_seed": 2**32 + 100}
    torch.save(state, tmp_path / "c" / STATE_FILE)
    resumed = []
    for other in (1, 2):  # whatever the process drew before, a resume continues the same way
        random.seed(other)
        np.random.seed(other)
        torch.manual_seed(other)
        assert load_checkpoint(tmp_path / "c", task=Task()) == {"step": 0}
        resumed.append(_draws())
    assert resumed[0] == resumed[1]
    torch.manual_seed(99)
    load_checkpoint(tmp_path / "c", task=Task())
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(4)))


def test_the_cuda_generator_state_is_kept_when_cuda_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stubbed torch.cuda (this machine has no GPU): what is saved and given back, and a CPU-written
    checkpoint resumed where CUDA is present (and the other way round)."""
    _save(tmp_path / "cpu", step=0)  # written without CUDA
    task, optimizer, scheduler, _ = _trained()  # trained before torch.cuda is stubbed
    restored: list[torch.Tensor] = []
    state = torch.arange(5, dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, *a, **k: restored.append(s))
    save_checkpoint(
        tmp_path / "gpu", task=task, optimizer=optimizer, scheduler=scheduler, scaler=None, counters={}
    )
    load_checkpoint(tmp_path / "cpu", task=Task())
    assert restored == []
    load_checkpoint(tmp_path / "gpu", task=Task())
    assert len(restored) == 1 and torch.equal(restored[0], state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    load_checkpoint(tmp_path / "gpu", task=Task())
    assert len(restored) == 1


# ------------------------------------------------------------------------------ finding weights
def _run_folder(root: Path, *, own: bool = False, final: bool = False, checkpoints: int = 0) -> Path:
    """A run folder with its own weights file, a final/ export and ``checkpoints`` checkpoint folders; the
    weights files differ (each holds its own index)."""
    root.mkdir(parents=True)
    places = (["."] if own else []) + (["final"] if final else [])
    places += [f"checkpoint_{i:06d}" for i in range(1, checkpoints + 1)]
    for i, place in enumerate(places):
        (root / place).mkdir(exist_ok=True)
        save_file({"where": torch.tensor(float(i))}, str(root / place / MODEL_FILE))
    return root


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({"own": True, "final": True, "checkpoints": 2}, "."),
        ({"final": True, "checkpoints": 3}, "final"),
        ({"checkpoints": 3}, "checkpoint_000003"),
    ],
)
@pytest.mark.parametrize("through_storage", [False, True])
def test_checkpoint_lookup_order_own_weights_then_final_then_latest(
    tmp_path: Path, layout: dict[str, Any], expected: str, through_storage: bool
) -> None:
    root = _run_folder(tmp_path / "run", **layout)
    if through_storage:
        got = fetch_model_file(str(root), tmp_path / "dl")
        assert got == tmp_path / "dl" / MODEL_FILE and got.is_file()
        assert got.read_bytes() == (root / expected / MODEL_FILE).read_bytes()
    else:
        assert find_model_file(root) == root / expected / MODEL_FILE


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_a_weights_file_names_itself(tmp_path: Path, suffix: str) -> None:
    file = tmp_path / "src" / f"weights{suffix}"
    file.parent.mkdir()
    file.write_bytes(b"weights")
    assert find_model_file(file) == file
    got = fetch_model_file(str(file), tmp_path / "dl")
    assert got == tmp_path / "dl" / f"weights{suffix}" and got.read_bytes() == b"weights"


def test_no_weights_anywhere_is_one_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "logs").mkdir(parents=True)
    for lookup in (lambda: find_model_file(empty), lambda: fetch_model_file(str(empty), tmp_path / "dl")):
        with pytest.raises(FileNotFoundError) as info:
            lookup()
        message = str(info.value)  # names the option, the path and the places it looked
        assert "--checkpoint" in message and str(empty) in message and "\n" not in message
        assert all(place in message for place in (MODEL_FILE, "final/", "checkpoint_"))


# ------------------------------------------------------------------------------ student weights
def test_student_weights_load_from_an_export_a_task_checkpoint_or_a_state_dict_file(tmp_path: Path) -> None:
    task, *_ = _trained(3)
    want = _params(task.student)
    _save(tmp_path / "run" / "checkpoint_000001", seed=3, step=1)  # student.* and loss.* keys
    save_student(task.student, tmp_path / "export")
    torch.save(task.student.state_dict(), tmp_path / "student.pt")
    for source, file in [
        (tmp_path / "run", tmp_path / "run" / "checkpoint_000001" / MODEL_FILE),
        (tmp_path / "export", tmp_path / "export" / MODEL_FILE),
        (tmp_path / "student.pt", tmp_path / "student.pt"),
    ]:
        fresh = Task(seed=9).student
        assert load_student_weights(fresh, source) == file
        assert _same(_params(fresh), want), source


def test_student_weights_must_be_complete(tmp_path: Path) -> None:
    wide = nn.Sequential(*(nn.Linear(2, 2) for _ in range(5)))  # ten tensors
    # a task checkpoint without them: the error names the file and missing student weights
    save_file({"student.unrelated": torch.zeros(1), "loss.scale": torch.ones(())}, str(tmp_path / MODEL_FILE))
    with pytest.raises(KeyError) as info:
        load_student_weights(wide, tmp_path)
    message = info.value.args[0]
    assert str(tmp_path / MODEL_FILE) in message and "student.0.weight" in message
    # an export or a state dict file with one tensor missing
    partial = {k: v for k, v in wide.state_dict().items() if k != "4.bias"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    torch.save(partial, tmp_path / "partial.pt")
    for name in ("partial.safetensors", "partial.pt"):
        with pytest.raises(RuntimeError, match=r"4\.bias"):
            load_student_weights(nn.Sequential(*(nn.Linear(2, 2) for _ in range(5))), tmp_path / name)
