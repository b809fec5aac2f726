"""The Ray-free training loop: optimizer, schedule, precision, one step, and the loop over steps.

Readable top to bottom. Everything that touches Ray (reporting, checkpoint upload, TensorBoard on rank 0)
comes in through :class:`LoopHooks`, so this file runs the same under Ray Train, in a plain benchmark, and
in unit tests with a list of tensors.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from siclip.config import OptimCfg, TrainCfg
from siclip.losses.terms import metric_name
from siclip.train.grad_share import GradShare, side_effects_undone, term_gradient_norms
from siclip.train.memory_format import memory_format_for

__all__ = [
    "LoopHooks",
    "LoopState",
    "TooManyBadStepsError",
    "autocast_context",
    "build_optimizer",
    "build_scheduler",
    "replica_drift",
    "resolve_precision",
    "run_loop",
    "to_host",
    "train_step",
    "unused_parameters",
]


class TooManyBadStepsError(RuntimeError):
    """More steps had a NaN/inf loss or gradient than ``train.max_bad_steps`` allows."""


# ------------------------------------------------------------------------------ optimizer and schedule
def build_optimizer(model: nn.Module, cfg: OptimCfg) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on gains, temperatures, norms and biases (ndim < 2).

    With ``cfg.loss_group == "one"`` the loss's own parameters (``model.loss`` of a task) form one group at
    ``cfg.loss_weight_decay`` whatever their shape, as the authors' ``loss.parameters()`` group.
    """
    inner = getattr(model, "module", model)
    loss = getattr(inner, "loss", None)
    own = (
        {id(p) for p in loss.parameters()}
        if cfg.loss_group == "one" and isinstance(loss, nn.Module)
        else set()
    )
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    loss_params: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            if id(p) in own:
                loss_params.append(p)
            else:
                (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay and not loss_params:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"params": loss_params, "weight_decay": cfg.loss_weight_decay},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps
    )


def lr_factor(step: int, cfg: OptimCfg, max_steps: int) -> float:
    """Linear warm-up to 1, then cosine (or constant) down to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimCfg, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, max_steps))


# ------------------------------------------------------------------------------ precision
def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` means bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------ the loop
@dataclass
class LoopState:
    step: int = 0
    bad_steps: int = 0
    samples_seen: int = 0


@dataclass
class LoopHooks:
    """Callbacks from the loop; each is optional.

    ``on_log(step, metrics)`` every ``log_every`` steps; ``on_eval(step) -> metrics``;
    ``on_checkpoint(step, metrics)`` every ``ckpt_every`` steps and at the end (metrics include the latest
    eval); ``on_step(step)`` after every optimizer step (progress bars); ``before_step(step)`` before the
    0-based optimizer step ``step`` is attempted (staged loss weights).

    Under torch.distributed every rank must get the same hooks: the logged means are averaged over ranks
    (one all-reduce per log), and ``on_eval`` is a collective when the evaluation is sharded.
    """

    on_log: Callable[[int, dict[str, float]], None] | None = None
    on_eval: Callable[[int], dict[str, float]] | None = None
    on_checkpoint: Callable[[int, dict[str, float]], None] | None = None
    on_step: Callable[[int], None] | None = None
    before_step: Callable[[int], None] | None = None


def to_host(values: dict[str, Tensor | float], *, world_size: int = 1) -> dict[str, float]:
    """Device scalars as floats in ONE transfer; with ``world_size > 1`` (a collective) averaged over ranks,
    so local loss terms (FD, ``loss.local``) are logged as their global means."""
    keys = [k for k, v in values.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    if keys:
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])  # type: ignore[union-attr]
        if world_size > 1 and dist.is_initialized():
            dist.all_reduce(stacked)
            stacked /= world_size
        out.update(zip(keys, stacked.tolist(), strict=True))
    return out


@dataclass
class _Meter:
    """Running sums of the step metrics, kept on the device until a log step reads them."""

    sums: dict[str, Tensor | float] = field(default_factory=dict)
    count: int = 0
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, values: dict[str, Tensor | float], samples: int) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1
        self.samples += samples

    def flush(self, world_size: int = 1) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        out = {k: v / max(self.count, 1) for k, v in to_host(self.sums, world_size=world_size).items()}
        out["perf/samples_per_s"] = self.samples / elapsed
        out["perf/step_time_s"] = elapsed / max(self.count, 1)
        self.sums, self.count, self.samples, self.started = {}, 0, 0, time.perf_counter()
        return out


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Move a batch; images take the device's training memory format (channels-last where it is safe)."""
    image_format = memory_format_for(device)
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            v = v.to(device, non_blocking=True)
            if v.dim() == 4:
                v = v.contiguous(memory_format=image_format)
        out[k] = v
    return out


def _any_rank(flag: Tensor, world_size: int) -> bool:
    """True when the device flag is true on any rank, so every rank takes the same branch (one host sync)."""
    t = flag.detach().float().reshape(1)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def replica_drift(task: nn.Module, world_size: int) -> float:
    """Largest difference between any rank's trainable parameters and rank 0's (0.0 when DDP is in sync)."""
    if world_size == 1:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in task.parameters() if p.requires_grad])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    drift = (flat - reference).abs().max()
    dist.all_reduce(drift, op=dist.ReduceOp.MAX)
    return float(drift.item())


def unused_parameters(
    task: nn.Module,
    batch: dict[str, Tensor],
    *,
    device: torch.device,
    precision: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
) -> list[str]:
    """Trainable parameters that some rank's loss does not reach on ``batch`` (DDP then needs
    ``find_unused_parameters``, which costs a graph traversal every step, so it is only turned on for them).

    One forward and ``autograd.grad`` on the unwrapped task, a collective when ``world_size > 1``: no
    ``.grad`` is touched, and buffers (BatchNorm statistics) and the RNG are restored, so the run continues
    as if the probe never ran.
    """
    named = [(n, p) for n, p in task.named_parameters() if p.requires_grad]
    with side_effects_undone(task):
        with autocast_context(precision, device):
            out = task(_to_device(batch, device), rank=rank, world_size=world_size)
        grads = torch.autograd.grad(out["loss"], [p for _, p in named], allow_unused=True)
    unused = torch.tensor([float(g is None) for g in grads], device=device)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(unused, op=dist.ReduceOp.MAX)
    return [n for (n, _), flag in zip(named, unused.tolist(), strict=True) if flag > 0]


def train_step(
    task: nn.Module,
    batch: dict[str, Tensor],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    precision: str,
    device: torch.device,
    grad_clip: float,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[bool, dict[str, Tensor | float]]:
    """One optimizer step. Returns (ok, metrics); ok is False (and nothing is updated) on a NaN/inf loss
    or gradient, decided identically on every rank.

    The metrics stay device scalars (:func:`to_host` reads them): the step's only host sync is the
    finiteness flag, which must reach the host because it decides whether the optimizer steps."""
    batch = _to_device(batch, device)
    with autocast_context(precision, device):
        out = task(batch, rank=rank, world_size=world_size)
    loss = out["loss"]
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    # fp16: an inf gradient is the scaler's business (it skips and lowers the scale); a bad loss is ours.
    finite = torch.isfinite(loss.detach())
    if scaler is None:
        finite = finite & torch.isfinite(grad_norm)
    if _any_rank(~finite, world_size):
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        return False, {}
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    # trained logit scales are clamped as parameters after the step (open_clip's convention), not in the loss
    clamp = getattr(getattr(task, "module", task), "clamp_logit_scales", None)
    if callable(clamp):
        clamp()
    scheduler.step()
    metrics: dict[str, Tensor | float] = {
        metric_name(k): v.detach().float() for k, v in out.items() if v.numel() == 1
    }
    metrics["optim/grad_norm"] = grad_norm.detach()
    metrics["optim/lr"] = float(optimizer.param_groups[0]["lr"])
    return True, metrics


def run_loop(
    task: nn.Module,
    batches: Iterator[dict[str, Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None = None,
    state: LoopState,
    max_steps: int,
    device: torch.device,
    precision: str = "fp32",
    grad_clip: float = OptimCfg.grad_clip,
    max_bad_steps: int = TrainCfg.max_bad_steps,
    log_every: int = TrainCfg.log_every,
    ckpt_every: int = 0,
    eval_every: int = TrainCfg.eval_every,
    rank: int = 0,
    world_size: int = 1,
    hooks: LoopHooks | None = None,
    grad_share: GradShare | None = None,
) -> LoopState:
    """Train from ``state.step`` to ``max_steps``; every rank runs exactly the same number of steps.

    ``grad_clip``, ``max_bad_steps``, ``log_every`` and ``eval_every`` default to the config's
    (``optim.grad_clip``, ``train.*``); ``ckpt_every=0`` checkpoints only at the end and ``precision`` is
    the resolved one (``fp32``, ``bf16`` or ``fp16``, never ``auto``).

    ``grad_share`` (rank 0 only): per-term gradient norms on the step's batch, merged into the next log.
    """
    hooks = hooks or LoopHooks()
    task.train()
    meter = _Meter()
    last_eval: dict[str, float] = {}
    shares: dict[str, float] = {}
    while state.step < max_steps:
        batch = next(batches)
        if hooks.before_step:
            hooks.before_step(state.step)
        if grad_share is not None and rank == 0 and grad_share.due(state.step + 1):
            batch = _to_device(batch, device)
            shares = term_gradient_norms(
                grad_share.model,
                batch,
                grad_share.params,
                autocast=lambda: autocast_context(precision, device),
            )
        ok, metrics = train_step(
            task,
            batch,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            precision=precision,
            device=device,
            grad_clip=grad_clip,
            rank=rank,
            world_size=world_size,
        )
        if not ok:
            state.bad_steps += 1
            if state.bad_steps > max_bad_steps:
                raise TooManyBadStepsError(
                    f"{state.bad_steps} steps had a NaN/inf loss or gradient (train.max_bad_steps = "
                    f"{max_bad_steps}); last good step {state.step}. Lower optim.lr, raise optim.warmup_steps, "
                    "or check the data."
                )
            continue
        state.step += 1
        local_samples = int(next(iter(batch.values())).shape[0])
        state.samples_seen += local_samples * world_size
        meter.add(metrics, local_samples * world_size)
        if hooks.on_step:
            hooks.on_step(state.step)
        final = state.step == max_steps
        if hooks.on_log and (state.step % log_every == 0 or final):
            logged = meter.flush(world_size)
            logged["optim/bad_steps"] = float(state.bad_steps)
            logged.update(shares)
            shares = {}
            hooks.on_log(state.step, logged)
        if hooks.on_eval and ((eval_every and state.step % eval_every == 0) or final):
            last_eval = hooks.on_eval(state.step)
            task.train()
        if hooks.on_checkpoint and ((ckpt_every and state.step % ckpt_every == 0) or final):
            # averaged over ranks like the logs (every rank checkpoints at the same steps)
            step_metrics = to_host(metrics, world_size=world_size)
            hooks.on_checkpoint(state.step, {"step": float(state.step), **step_metrics, **last_eval})
    return state
