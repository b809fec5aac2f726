"""The Ray-free loop on toy tasks: it learns; the optimizer's groups and schedule; precision; what one step
clips, skips and reports (NaN losses and gradients, the grad scaler, parameters a step does not reach); where
the batch goes; the logged window means; when each hook fires and with what; bad-step limits; gradient shares.

Everything runs a 4-input linear fit (or a one-vector pull whose gradient is known) for a few steps on CPU, and
values are checked against references written here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from siclip.config import OptimCfg
from siclip.train.grad_share import GradShare, term_gradient_norms
from siclip.train.loop import (
    LoopHooks,
    LoopState,
    TooManyBadStepsError,
    autocast_context,
    build_optimizer,
    build_scheduler,
    lr_factor,
    resolve_precision,
    run_loop,
    to_host,
    train_step,
    unused_parameters,
)
from siclip.train.memory_format import memory_format_for
from tests.loop_fixtures import CPU, B, Probe, TwoTermTask, data, run

CFG = OptimCfg(lr=0.05, warmup_steps=2, weight_decay=0.0)


def train(
    task: nn.Module, steps: int, *, seed: int = 0, hooks: LoopHooks | None = None, **kw: Any
) -> LoopState:
    torch.manual_seed(0)
    for p in task.parameters():  # the same start for every run of a test
        nn.init.constant_(p, 0.1)
    optimizer = build_optimizer(task, CFG)
    return run_loop(
        task,
        data(seed),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, CFG, steps),
        state=LoopState(),
        max_steps=steps,
        device=CPU,
        hooks=hooks,
        **kw,
    )


def logs_of(task: nn.Module, steps: int, **kw: Any) -> list[tuple[int, dict[str, float]]]:
    logs: list[tuple[int, dict[str, float]]] = []
    train(task, steps, hooks=LoopHooks(on_log=lambda s, m: logs.append((s, m))), **kw)
    return logs


def test_loop_learns_and_logs_every_term() -> None:
    torch.manual_seed(0)
    state, logs = run(Probe(), 200)
    assert state.step == 200 and state.samples_seen == 200 * B
    first, last = logs[0][1]["loss/total"], logs[-1][1]["loss/total"]
    assert last < 0.05 * first
    assert {"loss/total", "loss/fit", "optim/lr", "optim/grad_norm", "perf/samples_per_s"} <= set(logs[-1][1])


# ------------------------------------------------------------------------------ optimizer and schedule
def test_optimizer_decays_matrices_only_and_carries_the_configured_hyperparameters() -> None:
    cfg = OptimCfg(lr=0.03, weight_decay=0.2, beta1=0.8, beta2=0.95, eps=1e-4)
    model = nn.Linear(3, 2)
    model.gain = nn.Parameter(torch.ones(()))
    model.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    groups = build_optimizer(model, cfg).param_groups
    held = [id(p) for g in groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in (model.weight, model.bias, model.gain))  # each once
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.weight)} and {g["weight_decay"] for g in groups} == {0.2, 0.0}
    for g in groups:
        assert (g["lr"], g["betas"], g["eps"]) == (0.03, (0.8, 0.95), 1e-4)
    (only,) = build_optimizer(nn.Linear(3, 2, bias=False), cfg).param_groups  # matrices only
    assert only["weight_decay"] == 0.2
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, cfg)


def test_schedule_matches_warmup_then_cosine() -> None:
    cfg = OptimCfg(lr=0.05, warmup_steps=10, min_lr_ratio=0.1)
    for step in [0, 4, 9, 10, 55, 100, 150]:
        if step < 10:
            expected = (step + 1) / 10
        else:
            t = min((step - 10) / 90, 1.0)
            expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
        assert lr_factor(step, cfg, 100) == pytest.approx(expected)
    constant = OptimCfg(warmup_steps=3, schedule="constant", min_lr_ratio=0.1)
    assert [lr_factor(s, constant, 9) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])


def test_schedule_edges_and_the_scheduler_follow_lr_factor() -> None:
    no_warmup = OptimCfg(warmup_steps=0, min_lr_ratio=0.25)
    # one step after the warm-up: the cosine has a span of one step and ends at min_lr_ratio
    assert lr_factor(0, no_warmup, 1) == 1.0
    assert lr_factor(1, no_warmup, 1) == pytest.approx(0.25)
    assert lr_factor(5, no_warmup, 1) == pytest.approx(0.25)  # past the end it stays at the floor
    assert lr_factor(7, OptimCfg(warmup_steps=3, min_lr_ratio=0.25), 4) == pytest.approx(0.25)
    assert (
        lr_factor(2, OptimCfg(warmup_steps=2, min_lr_ratio=0.25), 6) == 1.0
    )  # the cosine starts at the peak
    cfg = OptimCfg(lr=0.5, warmup_steps=3, min_lr_ratio=0.1)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, 9)
    for step in range(12):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.lr * lr_factor(step, cfg, 9)), step
        optimizer.step()
        scheduler.step()


# ------------------------------------------------------------------------------ precision
def test_auto_precision_is_fp32_on_cpu_and_follows_bf16_support_on_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = torch.device("cuda")  # only its type is read
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", cuda) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", cuda) == "fp16"


def test_autocast_context_runs_matmuls_in_the_precisions_dtype() -> None:
    a = torch.randn(3, 3)
    with autocast_context("fp32", CPU):
        assert not torch.is_autocast_enabled("cpu") and (a @ a).dtype == torch.float32
    for precision, dtype in [("bf16", torch.bfloat16), ("fp16", torch.float16)]:
        with autocast_context(precision, CPU):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
            assert (a @ a).dtype == dtype
        assert not torch.is_autocast_enabled("cpu")


# ------------------------------------------------------------------------------ reading metrics
def test_to_host_reads_device_scalars_and_numbers_as_floats() -> None:
    values: dict[str, Tensor | float] = {
        "a": torch.tensor(1.5),
        "b": torch.tensor([2.5]),
        "c": torch.tensor(0.75, dtype=torch.bfloat16),
        "d": 3,  # type: ignore[dict-item]
        "e": 0.5,
    }
    out = to_host(values)
    assert out == {"a": 1.5, "b": 2.5, "c": 0.75, "d": 3.0, "e": 0.5}
    assert all(type(v) is float for v in out.values())
    assert to_host({}) == {}
    # world_size > 1 without a process group: nothing to average with, the values are this rank's own
    assert to_host(values, world_size=2) == out


# ------------------------------------------------------------------------------ one step
class Pull(nn.Module):
    """``loss = k * (w . v)``: the gradient is ``k * v`` wherever ``w`` is."""

    def __init__(self, *v: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(len(v)))
        self.register_buffer("v", torch.tensor(v))

    def forward(self, batch: dict[str, Tensor], *, rank: int = 0, world_size: int = 1) -> dict[str, Tensor]:
        return {"loss": (self.w * self.v).sum() * batch["k"].mean()}


def _sgd_step(
    task: nn.Module, *, grad_clip: float, k: float = 1.0, scaler: Any = None, lr: float = 1.0
) -> tuple[bool, dict[str, Any], Tensor]:
    """One train_step with plain SGD (lr 1: the update is minus the clipped gradient); returns the update."""
    optimizer = torch.optim.SGD(task.parameters(), lr=lr)
    cfg = OptimCfg(lr=lr, warmup_steps=0, schedule="constant")
    before = torch.cat([p.detach().flatten() for p in task.parameters()]).clone()
    ok, metrics = train_step(
        task,
        {"k": torch.full((2,), k)},
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, 10),
        scaler=scaler,
        precision="fp32",
        device=CPU,
        grad_clip=grad_clip,
    )
    after = torch.cat([p.detach().flatten() for p in task.parameters()])
    return ok, metrics, after - before


def test_gradients_are_clipped_to_grad_clip_and_zero_turns_clipping_off() -> None:
    ok, metrics, update = _sgd_step(Pull(3.0, 4.0), grad_clip=0.5)  # gradient norm 5
    assert ok and float(metrics["optim/grad_norm"]) == pytest.approx(5.0)
    torch.testing.assert_close(update, torch.tensor([-0.3, -0.4]))
    for grad_clip in (0.0, 10.0):
        ok, metrics, update = _sgd_step(Pull(3.0, 4.0), grad_clip=grad_clip)
        assert ok and float(metrics["optim/grad_norm"]) == pytest.approx(5.0)
        torch.testing.assert_close(update, torch.tensor([-3.0, -4.0]))


def test_a_step_reports_its_scalars_its_gradient_norm_and_the_next_steps_lr() -> None:
    task = Probe()
    cfg = OptimCfg(lr=0.2, warmup_steps=4, weight_decay=0.0)
    optimizer = torch.optim.SGD(task.parameters(), lr=cfg.lr)  # one parameter group
    scheduler = build_scheduler(optimizer, cfg, 10)
    ok, metrics = train_step(
        task,
        next(data()),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=None,
        precision="fp32",
        device=CPU,
        grad_clip=0.0,
    )
    assert ok and set(metrics) == {"loss/total", "loss/fit", "temp/scale", "optim/grad_norm", "optim/lr"}
    assert metrics["optim/lr"] == pytest.approx(cfg.lr * lr_factor(1, cfg, 10))
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in task.parameters()]))  # type: ignore[union-attr]
    assert float(metrics["optim/grad_norm"]) == pytest.approx(float(norm))
    assert float(metrics["temp/scale"]) == 2.0 and float(metrics["loss/total"]) == float(metrics["loss/fit"])
    assert [s["training"] for s in task.seen] == [True]


def test_a_finite_loss_with_a_nan_gradient_is_skipped_and_leaves_no_gradient() -> None:
    class NanGrad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, batch: dict[str, Tensor], **_: Any) -> dict[str, Tensor]:
            # sqrt'(0) = inf, times 0: a NaN gradient under a loss of exactly 0
            return {"loss": (self.w * 0).sqrt().sum() * batch["k"].mean()}

    task = NanGrad()
    ok, metrics, update = _sgd_step(task, grad_clip=0.0)
    assert not ok and metrics == {} and torch.equal(update, torch.zeros(2))
    assert task.w.grad is None
    ok, _, update = _sgd_step(Pull(1.0, 1.0), grad_clip=0.0, k=float("nan"))
    assert not ok and torch.equal(update, torch.zeros(2))


def test_a_parameter_the_loss_does_not_reach_this_step_stays_put() -> None:
    class Alternating(nn.Module):
        """``b`` is in the loss on odd calls only (as a loss term whose staged weight drops to 0)."""

        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.ones(2))
            self.b = nn.Parameter(torch.ones(2, 2))  # a matrix: weight decay applies to it
            self.calls = 0

        def forward(self, batch: dict[str, Tensor], **_: Any) -> dict[str, Tensor]:
            self.calls += 1
            loss = (self.a**2).sum() + ((self.b**2).sum() if self.calls % 2 else 0.0)
            return {"loss": loss * batch["k"].mean()}

    task = Alternating()
    cfg = OptimCfg(lr=0.1, warmup_steps=0, weight_decay=0.5, schedule="constant")
    optimizer = build_optimizer(task, cfg)
    scheduler = build_scheduler(optimizer, cfg, 10)
    step = {
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": None,
        "precision": "fp32",
        "device": CPU,
        "grad_clip": 0.0,
    }
    assert train_step(task, {"k": torch.ones(2)}, **step)[0]
    b_after_first = task.b.detach().clone()
    assert not torch.equal(b_after_first, torch.ones(2, 2))
    assert train_step(task, {"k": torch.ones(2)}, **step)[0]
    assert torch.equal(task.b.detach(), b_after_first)  # no momentum step, no decay: AdamW skipped it


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # the scaler skipped optimizer.step()
def test_the_grad_scaler_scales_unscales_and_owns_overflow() -> None:
    def scaler(scale: float) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", init_scale=scale)

    # a power-of-two scale: the same update and gradient norm as without a scaler, clipping included
    s = scaler(2.0**8)
    ok, metrics, update = _sgd_step(Pull(3.0, 4.0), grad_clip=0.5, scaler=s)
    assert ok and float(metrics["optim/grad_norm"]) == pytest.approx(5.0)
    torch.testing.assert_close(update, torch.tensor([-0.3, -0.4]))
    assert s.get_scale() == 2.0**8
    # a finite loss whose scaled gradient overflows: the scaler skips the update and lowers the scale,
    # which is not a bad step of ours
    s = scaler(2.0**40)
    ok, _, update = _sgd_step(Pull(3e30, 4e30), grad_clip=0.0, scaler=s)
    assert ok and torch.equal(update, torch.zeros(2)) and s.get_scale() == 2.0**39
    # a NaN loss is ours: skipped, and the scaler still updates (and so takes the next step)
    s = scaler(2.0**8)
    task = Pull(3.0, 4.0)
    ok, _, update = _sgd_step(task, grad_clip=0.0, k=float("nan"), scaler=s)
    assert not ok and torch.equal(update, torch.zeros(2)) and s.get_scale() == 2.0**7
    ok, _, update = _sgd_step(task, grad_clip=0.0, scaler=s)
    assert ok
    torch.testing.assert_close(update, torch.tensor([-3.0, -4.0]))


def test_run_loop_counts_a_bad_step_under_a_grad_scaler_and_takes_the_next() -> None:
    task = Pull(3.0, 4.0)
    optimizer = torch.optim.SGD(task.parameters(), lr=1.0)
    cfg = OptimCfg(lr=1.0, warmup_steps=0, schedule="constant")
    s = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    state = run_loop(
        task,
        iter([{"k": torch.full((2,), float("nan"))}, {"k": torch.ones(2)}]),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg, 1),
        scaler=s,
        state=LoopState(),
        max_steps=1,
        device=CPU,
        grad_clip=0.0,
    )
    assert (state.step, state.bad_steps) == (1, 1) and s.get_scale() == 2.0**7
    torch.testing.assert_close(task.w.detach(), torch.tensor([-3.0, -4.0]))


def test_precision_and_rank_reach_the_forward_of_a_step_and_of_the_unused_parameter_probe() -> None:
    task = Probe()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    ok, _ = train_step(
        task,
        next(data()),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, CFG, 10),
        scaler=None,
        precision="bf16",
        device=CPU,
        grad_clip=1.0,
        rank=1,
        world_size=3,
    )
    assert ok
    assert [(s["autocast"], s["dtype"], s["rank"], s["world_size"]) for s in task.seen] == [
        (True, torch.bfloat16, 1, 3)
    ]
    task.seen.clear()
    assert unused_parameters(task, next(data()), device=CPU, precision="bf16", rank=2, world_size=4) == []
    assert [(s["autocast"], s["dtype"], s["rank"], s["world_size"]) for s in task.seen] == [
        (True, torch.bfloat16, 2, 4)
    ]


# ------------------------------------------------------------------------------ where the batch goes
class DeviceProbe(nn.Module):
    """Records where each batch tensor arrived; its loss never reads the batch (which may be on ``meta``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.seen: list[dict[str, Any]] = []

    def forward(
        self, batch: dict[str, Any], *, rank: int = 0, world_size: int = 1, keep_terms: bool = False
    ) -> dict[str, Tensor]:
        self.seen.append(
            {
                k: (
                    v.device.type,
                    v.is_contiguous(memory_format=memory_format_for(v.device)) if v.dim() == 4 else None,
                )
                if isinstance(v, Tensor)
                else v
                for k, v in batch.items()
            }
        )
        loss = (self.w**2).sum()
        return {"loss": loss, **({"term/w": loss} if keep_terms else {})}


def _batch() -> dict[str, Any]:
    return {"image": torch.rand(2, 3, 4, 4), "text": torch.zeros(2, 5, dtype=torch.long), "ids": ["a", "b"]}


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_the_batch_reaches_the_task_on_the_loops_device_in_its_training_format(device: str) -> None:
    # images in the device's training memory format (channels-last only where it is safe), other tensors
    # moved, for the steps and for the gradient shares' extra forward alike
    task = DeviceProbe()
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    run_loop(
        task,
        iter([_batch(), _batch()]),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, CFG, 2),
        state=LoopState(),
        max_steps=2,
        device=torch.device(device),
        grad_share=GradShare(every=2, model=task, params=[task.w]),
    )
    expected = {"image": (device, True), "text": (device, None), "ids": ["a", "b"]}
    assert task.seen and all(seen == expected for seen in task.seen)


# ------------------------------------------------------------------------------ the loop
def test_logs_are_means_over_the_steps_since_the_last_log() -> None:
    per_step = logs_of(Probe(poison={3}), 7, log_every=1)
    started = time.perf_counter()
    windows = logs_of(Probe(poison={3}), 7, log_every=3)
    wall = time.perf_counter() - started
    assert [s for s, _ in per_step] == list(range(1, 8))
    assert [s for s, _ in windows] == [3, 6, 7]
    for (step, logged), first in zip(windows, [1, 4, 7], strict=True):
        window = [m for s, m in per_step if first <= s <= step]
        for key in ("loss/total", "loss/fit", "temp/scale", "optim/grad_norm", "optim/lr"):
            mean = sum(m[key] for m in window) / len(window)
            assert logged[key] == pytest.approx(mean, rel=1e-6), (step, key)
        assert logged["optim/bad_steps"] == per_step[step - 1][1]["optim/bad_steps"] == 1.0
        assert "pred" not in logged and "loss/pred" not in logged
        # samples per second times seconds per step: the samples of one step
        assert logged["perf/samples_per_s"] * logged["perf/step_time_s"] == pytest.approx(B)
        assert 0 < logged["perf/step_time_s"] * len(window) <= wall
    assert per_step[1][1]["optim/bad_steps"] == 0.0  # the bad (third) attempt came after step 2


def test_hooks_fire_on_their_steps_and_checkpoints_see_the_step_and_the_latest_eval() -> None:
    per_step = dict(logs_of(Probe(poison={2}), 7, log_every=1))
    task = Probe(poison={2})
    calls: list[tuple[str, int]] = []
    saved: list[tuple[int, dict[str, float]]] = []

    def on_eval(step: int) -> dict[str, float]:
        task.eval()  # as a real evaluation does; the loop must put the task back into training mode
        calls.append(("eval", step))
        return {"val/score": float(step)}

    hooks = LoopHooks(
        on_log=lambda s, m: calls.append(("log", s)),
        on_eval=on_eval,
        on_checkpoint=lambda s, m: saved.append((s, m)),
        on_step=lambda s: calls.append(("step", s)),
        before_step=lambda s: calls.append(("before", s)),
    )
    state = train(task, 7, hooks=hooks, log_every=3, eval_every=2, ckpt_every=3)
    assert (state.step, state.bad_steps, state.samples_seen) == (7, 1, 7 * B)

    def steps(kind: str) -> list[int]:
        return [s for k, s in calls if k == kind]

    # every step is announced (with the number of steps done) before it runs, a retried one again
    assert set(steps("before")) == set(range(7))
    assert steps("step") == [1, 2, 3, 4, 5, 6, 7]
    # the last step logs, evaluates and checkpoints whatever the intervals
    assert steps("log") == [3, 6, 7] and steps("eval") == [2, 4, 6, 7]
    assert all(s["training"] for s in task.seen)
    assert [s for s, _ in saved] == [3, 6, 7]
    for step, metrics in saved:
        latest_eval = float(step - step % 2) if step < 7 else 7.0
        assert metrics.pop("step") == float(step) and metrics.pop("val/score") == latest_eval
        assert set(metrics) == {"loss/total", "loss/fit", "temp/scale", "optim/grad_norm", "optim/lr"}
        for key, value in metrics.items():  # the step's own metrics, not a window mean
            assert value == pytest.approx(per_step[step][key], rel=1e-6), (step, key)


def test_nan_steps_are_skipped_counted_and_do_not_update() -> None:
    torch.manual_seed(0)
    task = Probe(poison={3, 4, 5})
    state, _ = run(task, 20)
    assert state.step == 20 and state.bad_steps == 3
    assert all(torch.isfinite(p).all() for p in task.parameters())


@pytest.mark.parametrize("limit", [0, 2])
def test_max_bad_steps_are_tolerated_and_the_next_one_raises_naming_the_key(limit: int) -> None:
    task = Probe(poison=set(range(1, limit + 1)))
    state = train(task, 1, max_bad_steps=limit)
    assert (state.step, state.bad_steps) == (1, limit)
    task = Probe(poison=set(range(2, limit + 100)))  # the first step is good, then every one is bad
    with pytest.raises(TooManyBadStepsError) as info:
        train(task, 3, max_bad_steps=limit)
    message = str(info.value)
    assert f"train.max_bad_steps = {limit}" in message and "last good step 1" in message
    assert len(task.seen) == limit + 2  # it stops at the first bad step past the limit


def test_without_a_process_group_world_size_scales_the_sample_counts_only() -> None:
    alone = logs_of(Probe(), 4, log_every=2)
    task = Probe()
    logs: list[tuple[int, dict[str, float]]] = []
    saved: list[tuple[int, dict[str, float]]] = []
    hooks = LoopHooks(
        on_log=lambda s, m: logs.append((s, m)), on_checkpoint=lambda s, m: saved.append((s, m))
    )
    state = train(task, 4, hooks=hooks, log_every=2, world_size=2)
    assert state.samples_seen == 4 * B * 2
    assert [s for s, _ in saved] == [4] and "val/score" not in saved[0][1]  # no eval hook, no eval metrics
    for (_, got), (_, ref) in zip(logs, alone, strict=True):
        assert got["perf/samples_per_s"] * got["perf/step_time_s"] == pytest.approx(2 * B)
        for key in ("loss/total", "optim/grad_norm"):  # this rank's own values: nothing to average with
            assert got[key] == ref[key]


def test_grad_shares_are_measured_on_the_due_steps_batch_under_the_loops_precision() -> None:
    torch.manual_seed(0)
    task = TwoTermTask()
    params = list(task.parameters())
    yielded: list[dict[str, Tensor]] = []

    def stream() -> Iterator[dict[str, Tensor]]:
        for batch in data():
            yielded.append(batch)
            yield batch

    def bf16() -> Any:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    expected: dict[int, dict[str, float]] = {}

    def before_step(step: int) -> None:  # the reference: the same call, made just before the loop's
        if (step + 1) % 3 == 0:
            expected[step + 1] = term_gradient_norms(task, yielded[-1], params, autocast=bf16)

    optimizer = build_optimizer(task, CFG)
    logged: dict[int, dict[str, float]] = {}
    run_loop(
        task,
        stream(),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, CFG, 7),
        state=LoopState(),
        max_steps=7,
        device=CPU,
        precision="bf16",
        log_every=1,
        hooks=LoopHooks(on_log=lambda s, m: logged.update({s: m}), before_step=before_step),
        grad_share=GradShare(every=3, model=task, params=params),
    )
    shares = {s: {k: v for k, v in m.items() if k.startswith("grad")} for s, m in logged.items()}
    assert {s for s, g in shares.items() if g} == {3, 6}
    for step in (3, 6):
        assert set(shares[step]) == {"grad/fit", "grad/small", "grad_share/fit", "grad_share/small"}
        assert shares[step] == expected[step]
        assert math.isclose(shares[step]["grad_share/fit"] + shares[step]["grad_share/small"], 1.0)
