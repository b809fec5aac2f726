"""The Ray Train side of training: one function every worker runs, glue between Ray Train and Ray-free parts.

It rebuilds the typed config from the dict Ray hands over, builds the task and its batches
(:func:`siclip.task.build_task`, :func:`siclip.task.build_batches`), restores the latest checkpoint if Ray
has one, wraps the task with Ray's DDP, and runs the Ray-free loop with hooks that log (rank 0,
:class:`~siclip.train.run_log.RunLog`: TensorBoard, the metrics table, the progress line, storage sync),
evaluate (sharded over every rank), and report metrics with checkpoints to Ray Train every
``train.ckpt_every`` steps (every rank reports the same number of times).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from siclip.config import from_dict
from siclip.task import build_batches, build_task
from siclip.train.checkpoint import load_checkpoint, save_checkpoint
from siclip.train.grad_share import GradShare
from siclip.train.loop import (
    LoopHooks,
    LoopState,
    build_optimizer,
    build_scheduler,
    replica_drift,
    resolve_precision,
    run_loop,
    unused_parameters,
)
from siclip.train.memory_format import place
from siclip.train.run_log import RunLog

__all__ = ["PAUSE_FILE_ENV", "PAUSE_STEP_ENV", "train_worker"]

# Ray Train V2 tees print() to stdout and its logger (each line twice); a logger prints once.
LOG = logging.getLogger("siclip.train")


def _unwrap(model: nn.Module) -> Any:
    return model.module if hasattr(model, "module") else model


PAUSE_STEP_ENV = "SICLIP_TEST_PAUSE_AFTER_CHECKPOINT"
PAUSE_FILE_ENV = "SICLIP_TEST_PAUSE_FILE"


def _pause_for_tests(step: int, rank: int) -> None:
    """A fault-injection point for tests: with ``SICLIP_TEST_PAUSE_AFTER_CHECKPOINT=<step>`` rank 0 writes its
    pid to ``SICLIP_TEST_PAUSE_FILE`` once that step's checkpoint is reported, then waits to be killed, so a
    test kills it at a step it chose rather than racing the run. Unset (always, outside tests): nothing."""
    if rank != 0 or os.environ.get(PAUSE_STEP_ENV) != str(step):
        return
    marker = Path(os.environ[PAUSE_FILE_ENV])
    marker.with_suffix(".tmp").write_text(str(os.getpid()))
    os.replace(marker.with_suffix(".tmp"), marker)
    while True:
        time.sleep(1.0)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point; ``config`` is ``to_dict(cfg)`` plus ``_max_steps``."""
    max_steps = int(config.pop("_max_steps"))
    cfg = from_dict(config)
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, round(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    task, info = build_task(cfg)
    place(task, device)  # the memory format the loop gives the images on this device
    optimizer = build_optimizer(task, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, max_steps)
    precision = resolve_precision(cfg.train.precision, device)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    state = LoopState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # Each rank downloads into its own folder: as_directory() shares one deterministic temp folder per
        # checkpoint among the processes of a machine, and one rank's clean-up can cut another's read short.
        with tempfile.TemporaryDirectory(prefix="siclip-resume-") as folder:
            checkpoint.to_directory(folder)
            counters = load_checkpoint(
                folder, task=task, optimizer=optimizer, scheduler=scheduler, scaler=scaler
            )
        state = LoopState(
            step=int(counters["step"]),
            bad_steps=int(counters["bad_steps"]),
            samples_seen=int(counters["samples_seen"]),
        )
        if rank == 0:
            LOG.info(f"siclip: resumed run {cfg.train.run_name!r} from step {state.step}")
    torch.manual_seed(cfg.train.seed + 1000 * rank + state.step)  # per-rank sampling (PM negatives)

    batches = build_batches(
        cfg, rank=rank, world_size=world_size, epoch_offset=state.step, with_teacher=task.teacher is not None
    )
    find_unused = world_size > 1 and cfg.train.find_unused_parameters == "yes"
    if world_size > 1 and cfg.train.find_unused_parameters == "auto":
        first = next(batches)
        batches = itertools.chain([first], batches)  # the probe's batch is still the first step's
        task.train()
        unused = unused_parameters(
            task, first, device=device, precision=precision, rank=rank, world_size=world_size
        )
        find_unused = bool(unused)
        if rank == 0 and unused:
            LOG.info(f"siclip: DDP find_unused_parameters on; no gradient reaches {', '.join(unused)}")
    model = ray.train.torch.prepare_model(
        task, parallel_strategy_kwargs={"find_unused_parameters": find_unused} if world_size > 1 else None
    )
    log = RunLog(cfg, max_steps=max_steps, start_step=state.step) if rank == 0 else None
    if log is not None and info["inherit_report"] and state.step == 0:
        LOG.info(f"siclip: weight inheritance: {info['inherit_report']}")

    def on_log(step: int, metrics: dict[str, float]) -> None:
        if log is not None:
            log.scalars(step, metrics)
            if cfg.train.progress:
                log.progress(step, metrics)

    def on_eval(step: int) -> dict[str, float]:
        from siclip.eval.ranks import Shard
        from siclip.eval.suite import evaluate_cfg

        if not (cfg.eval.zeroshot_dir or cfg.eval.retrieval_shards or cfg.eval.benchmarks):
            return {}
        # every rank evaluates its slice (a collective): 1/N of the work, nobody idles in a collective
        metrics = evaluate_cfg(_unwrap(model).student, cfg, device=device, shard=Shard(rank, world_size))
        named = {f"val/{k}": v for k, v in metrics.items()}
        if log is not None:
            log.scalars(step, named)
            LOG.info(f"siclip: eval at step {step}: {json.dumps(named)}")
        return named

    def on_checkpoint(step: int, metrics: dict[str, float]) -> None:
        counters = {"step": step, "bad_steps": state.bad_steps, "samples_seen": state.samples_seen}
        if log is not None:
            log.sync()  # the logs up to this checkpoint, before it becomes the one a resume starts from
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                folder = save_checkpoint(
                    Path(tmp) / "ckpt",
                    task=_unwrap(model),
                    optimizer=optimizer,
                    scheduler=scheduler,
                    scaler=scaler,
                    counters=counters,
                )
                ckpt = ray.train.Checkpoint.from_directory(str(folder))
            ray.train.report(metrics, checkpoint=ckpt)
        _pause_for_tests(step, rank)

    logged_weights: dict[str, float] = {}

    def before_step(step: int) -> None:
        loss = _unwrap(model).loss
        loss.set_step(step)  # loss.schedule: the weights are a function of the global step alone
        if log is not None and loss.weights != logged_weights:
            logged_weights.update(loss.weights)
            log.scalars(step + 1, {f"loss/weight/{k}": float(v) for k, v in loss.weights.items()})

    hooks = LoopHooks(on_log=on_log, on_eval=on_eval, on_checkpoint=on_checkpoint, before_step=before_step)
    grad_share = (
        GradShare(
            every=cfg.train.grad_share_every,
            model=task,
            # the student's trainable weights: the loss's own (PM head, projector) would mask how it is pulled
            params=[p for p in task.student.parameters() if p.requires_grad]
            or [p for p in task.parameters() if p.requires_grad],
        )
        if cfg.train.grad_share_every
        else None
    )
    run_loop(
        model,
        batches,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        state=state,
        max_steps=max_steps,
        device=device,
        precision=precision,
        grad_clip=cfg.optim.grad_clip,
        max_bad_steps=cfg.train.max_bad_steps,
        log_every=cfg.train.log_every,
        ckpt_every=cfg.train.ckpt_every,
        eval_every=cfg.train.eval_every,
        rank=rank,
        world_size=world_size,
        hooks=hooks,
        grad_share=grad_share,
    )
    drift = replica_drift(_unwrap(model), world_size)
    if log is not None:
        if world_size > 1:
            log.scalars(state.step, {"dist/param_max_abs_diff": drift})
            LOG.info(f"siclip: parameters across {world_size} ranks differ by at most {drift:.3g}")
        log.save_final(_unwrap(model).student)
        log.close()
