"""The Ray Tune run of a sweep: the trial function, the resources a trial holds, the scheduler, resume.

Every trial applies its sampled values to the base config, trains with ``launch(cfg)`` exactly as
``siclip train`` does (Train V2 inside a Tune function, metrics forwarded by ``TuneReportCallback``), and
gets its own run folder ``<train.runs_dir>/<tune.experiment_name>-<trial id>`` with TensorBoard events.
The device (``train.use_gpu``) is decided once, before the first trial, so a sweep never mixes CPU and GPU
trials. Ray is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Literal

from siclip import storage
from siclip.config import ConfigError, SiclipCfg, TuneCfg, is_uri, replace, to_dict
from siclip.sweep.results import SweepResult, collect_results, expected_reports, write_tables
from siclip.sweep.space import parse_space, prepare_sweep, trial_config

__all__ = [
    "PARAMS_FILE",
    "SWEEP_FILE",
    "fit_resources",
    "fix_device",
    "resumed_base",
    "run_sweep",
    "tune_scheduler",
]

PARAMS_FILE = "sweep_params.json"
"""In each trial's run folder: the values sampled for it (dotted key -> value)."""
SWEEP_FILE = "sweep.json"
"""In the sweep's folder: its search space, sample count and base config (JSON; ``--resume`` checks it)."""


def _trial(params: dict[str, Any], *, base: dict[str, Any], experiment: str) -> None:
    """One Tune trial: train the sampled config with Ray Train; metrics reach Tune through the callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from siclip.train.launch import launch
    from siclip.train.run_log import run_location

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, params, run_name=f"{experiment}-{trial_id}")
    # the sampled values, as JSON next to the trial's config.yaml and TensorBoard events
    storage.write_text(
        storage.join(run_location(cfg), PARAMS_FILE), json.dumps(params, indent=2, sort_keys=True)
    )
    launch(cfg, callbacks=[TuneReportCallback()])


def fix_device(cfg: SiclipCfg) -> SiclipCfg:
    """``train.use_gpu`` decided once for the whole sweep: every trial gets the same 'yes' or 'no'.

    Left at 'auto', trials started before and after an autoscaler adds a GPU node would disagree.
    """
    from siclip.train.launch import resolve_use_gpu

    device: Literal["yes", "no"] = "yes" if resolve_use_gpu(cfg) else "no"
    if cfg.train.use_gpu != device:
        print(f"siclip tune: train.use_gpu {cfg.train.use_gpu} -> {device} for every trial")
        cfg = replace(cfg, train=replace(cfg.train, use_gpu=device))
    return cfg


def _trial_resources(cfg: SiclipCfg) -> dict[str, float]:
    """What one trial holds while it trains: its driver (``tune.cpus_per_trial``, ``tune.gpus_per_trial``)
    plus its Train workers (``train.num_workers`` x ``train.cpus_per_worker``, and a GPU each when
    ``train.use_gpu`` is yes). Resources it does not need are left out."""
    workers_gpu = cfg.train.num_workers if cfg.train.use_gpu == "yes" else 0
    need = {
        "CPU": cfg.tune.cpus_per_trial + cfg.train.num_workers * cfg.train.cpus_per_worker,
        "GPU": cfg.tune.gpus_per_trial + workers_gpu,
    }
    return {k: v for k, v in need.items() if v > 0}


def fit_resources(cfg: SiclipCfg) -> SiclipCfg:
    """Make one trial fit the cluster, and no more trials run at once than the cluster can ever hold.

    Ray Train V2 inside a Tune trial reserves its workers in a placement group of its own, after the trial
    has started (Tune only sees the driver's share, and a trial-level placement group cannot lend its bundles
    to Train's). So the cap is on concurrency, as Ray's Train + Tune guide advises: at most as many trials as
    the cluster (what it has now, or the most its autoscaler may launch) holds driver + workers for; the
    others wait their turn in Tune's queue instead of timing out in ``train.worker_start_timeout_s``.

    When only the driver's sliver does not fit (``train.cpus_per_worker`` = every CPU, as in the demo),
    the workers give that sliver up; torch still gets ``int(cpus_per_worker)`` threads, at least one.
    A driver GPU (``tune.gpus_per_trial``) that leaves no GPU for the workers is refused.
    """
    import ray

    from siclip.ray_compat import max_cluster_resources

    now, most = ray.cluster_resources(), max_cluster_resources()
    need = _trial_resources(cfg)
    hold = {k: max(now.get(k, 0.0), most.get(k, 0.0)) for k in need}
    if not all(hold.values()):  # an autoscaling cluster with no such node yet: Tune waits for nodes
        return cfg
    total = hold.get("CPU", 0.0)
    workers = cfg.train.num_workers * cfg.train.cpus_per_worker
    excess = need.get("CPU", 0.0) - total
    if excess > 1e-9:
        if excess <= min(cfg.tune.cpus_per_trial, 0.1) and workers - excess > 0:  # a sliver, not a CPU
            # rounded down: a share rounded up would leave the trial a hair over the cluster again
            per = math.floor((cfg.train.cpus_per_worker - excess / cfg.train.num_workers) * 1e4 + 1e-9) / 1e4
            print(
                f"siclip tune: train.cpus_per_worker {cfg.train.cpus_per_worker:g} -> {per:g} to leave room "
                f"for the trial driver (tune.cpus_per_trial {cfg.tune.cpus_per_trial:g})"
            )
            cfg = replace(cfg, train=replace(cfg.train, cpus_per_worker=per))
            need = _trial_resources(cfg)
        else:
            room = total - workers
            allowed = f"<= {room:g}, e.g. 0.01 (the trial driver only waits)" if room > 0 else "none fits"
            raise ConfigError(
                f"tune.cpus_per_trial: got {cfg.tune.cpus_per_trial:g}; one trial needs it plus "
                f"train.num_workers x train.cpus_per_worker = {workers:g} CPUs but the cluster has {total:g}; "
                f"allowed: {allowed} (or lower train.cpus_per_worker)"
            )
    if need.get("GPU", 0.0) > hold.get("GPU", 0.0) + 1e-9:
        workers_gpu = need["GPU"] - cfg.tune.gpus_per_trial
        raise ConfigError(
            f"tune.gpus_per_trial: got {cfg.tune.gpus_per_trial:g}; one trial needs it plus "
            f"{workers_gpu:g} GPU(s) for its Train workers but the cluster holds {hold['GPU']:g}; allowed: 0 "
            "(the trial driver only waits; its workers take their own GPUs)"
        )
    if cfg.tune.gpus_per_trial and cfg.train.use_gpu != "yes":
        print(
            f"siclip tune: tune.gpus_per_trial {cfg.tune.gpus_per_trial:g} holds a GPU nothing uses (train.use_gpu no)"
        )
    fit = min(int(hold[k] / v + 1e-9) for k, v in need.items())
    if cfg.tune.max_concurrent_trials > fit:
        what = ", ".join(f"{v:g} {k}" for k, v in need.items())
        holds = ", ".join(f"{hold[k]:g} {k}" for k in need)
        print(
            f"siclip tune: tune.max_concurrent_trials {cfg.tune.max_concurrent_trials} -> {fit}: a trial holds "
            f"{what} (driver + train.num_workers x per-worker share) and the cluster holds {holds}; "
            "the other trials wait their turn"
        )
        cfg = replace(cfg, tune=replace(cfg.tune, max_concurrent_trials=fit))
    return cfg


def _release_orphaned_train_groups() -> int:
    """Remove placement groups of Train runs whose controller died with its Tune trial; return the count.

    When the scheduler stops a trial, Tune kills the trial actor and with it the Train controller it owns,
    before the controller can release its workers' placement group. Ray Train's own cleaner finds such
    groups through the state API, which needs the dashboard (off by default here); without this, the
    stopped trial's CPUs stay reserved and the next trials wait for ever. Only groups created by an actor
    of this job that is now dead are touched.
    """
    from ray.util.placement_group import remove_placement_group

    from siclip.ray_compat import orphaned_train_placement_groups

    groups = orphaned_train_placement_groups()
    for pg in groups:
        remove_placement_group(pg)
    return len(groups)


def _build_callbacks() -> list[Any]:
    from ray import tune

    class ReleaseStoppedTrials(tune.Callback):
        """Every few seconds, free the Train resources of trials the scheduler stopped."""

        def __init__(self, every_s: float = 3.0) -> None:
            self.every_s = every_s
            self.last = 0.0

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            now = time.monotonic()
            if now - self.last >= self.every_s:
                self.last = now
                n = _release_orphaned_train_groups()
                if n:
                    print(f"siclip tune: released the Train resources of {n} stopped trial(s)")

    return [ReleaseStoppedTrials()]


def tune_scheduler(tune_cfg: TuneCfg, *, max_t: int) -> Any:
    """The Ray Tune scheduler ``tune.scheduler`` names; ``max_t``: the reports a full run makes."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    if tune_cfg.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            # One more than a full run's reports: a trial that is not stopped ends on its own (ASHA
            # would otherwise stop it at its last report, before the worker writes the final weights).
            max_t=max(max_t, tune_cfg.grace_period) + 1,
            grace_period=tune_cfg.grace_period,
            reduction_factor=tune_cfg.reduction_factor,
        )
    if tune_cfg.scheduler == "median":
        return MedianStoppingRule(
            time_attr="training_iteration", grace_period=tune_cfg.grace_period, min_samples_required=2
        )
    return FIFOScheduler()


def _fresh_name(runs_dir: str, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... : the first whose folder under ``runs_dir`` does not exist."""
    candidate, n = name, 1
    while storage.exists(f"{runs_dir}/{candidate}"):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _sweep_record(cfg: SiclipCfg, base: dict[str, Any]) -> dict[str, Any]:
    return {"space": cfg.tune.space, "num_samples": cfg.tune.num_samples, "base": base}


def resumed_base(cfg: SiclipCfg, experiment_path: str, base: dict[str, Any]) -> dict[str, Any]:
    """The base config of the sweep being resumed, from its ``sweep.json``; refuse a changed space.

    Tune restores the trials it already sampled and ignores today's space and ``num_samples``, so a change
    there would be silently dropped; unfinished trials keep training the sweep's own base config.
    """
    try:
        saved = json.loads(storage.read_text(storage.join(experiment_path, SWEEP_FILE)))
    except FileNotFoundError:
        print(f"siclip tune: {experiment_path} has no {SWEEP_FILE}; its trials resume with today's config")
        return base
    now = _sweep_record(cfg, base)
    for key in ("space", "num_samples"):
        if json.dumps(saved.get(key), sort_keys=True) != json.dumps(now[key], sort_keys=True):
            raise ConfigError(
                f"tune.{key}: got {now[key]!r}, but the sweep at {experiment_path} has {saved.get(key)!r}; "
                "allowed: its own value with --resume, or no --resume to start a new sweep"
            )
    old = saved.get("base") or base
    changed = sorted(k for k in set(old) | set(base) if k != "tune" and old.get(k) != base.get(k))
    if changed:
        print(
            f"siclip tune: resuming with the sweep's own base config (sections {', '.join(changed)} differ now)"
        )
    return dict(old)


def run_sweep(cfg: SiclipCfg, *, resume: bool = False) -> SweepResult:
    """Run the sweep ``tune.experiment_name``, or with ``resume=True`` continue it; print and write its
    table and best config.

    Without ``resume`` a sweep never reuses an existing folder: when ``<runs_dir>/<experiment_name>`` exists,
    the sweep is named ``<experiment_name>-2`` (``-3``, ...) instead. ``resume=True`` restores that folder
    with ``Tuner.restore`` (finished trials are not rerun, errored ones are retried); that unpickles Ray
    Tune's state, so resume only a folder no one else can write. The space and ``num_samples`` must be the
    sweep's own (``sweep.json``).
    """
    cfg = prepare_sweep(cfg)
    parse_space(cfg.tune.space, base=to_dict(cfg))  # fail on a bad space before Ray starts
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards: got []; allowed: one or more shard paths or patterns")
    max_t = expected_reports(cfg)

    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from siclip.ray_session import init_ray

    init_ray(cfg.ray)
    from siclip.train.launch import check_cluster_storage

    check_cluster_storage(cfg)
    cfg = fix_device(cfg)
    cfg = fit_resources(cfg)
    runs_dir = cfg.train.runs_dir if is_uri(cfg.train.runs_dir) else str(Path(cfg.train.runs_dir).resolve())
    runs_dir = runs_dir.rstrip("/")
    experiment = cfg.tune.experiment_name
    if not resume:
        experiment = _fresh_name(runs_dir, experiment)
        if experiment != cfg.tune.experiment_name:
            print(
                f"siclip tune: {runs_dir}/{cfg.tune.experiment_name} holds an earlier sweep (add --resume to "
                f"continue it); this new sweep is {experiment!r}"
            )
            cfg = replace(cfg, tune=replace(cfg.tune, experiment_name=experiment))
    experiment_path = f"{runs_dir}/{experiment}"
    base = to_dict(cfg)
    param_space = parse_space(cfg.tune.space, base=base)
    param_keys = tuple(param_space)
    driver = {
        "CPU": cfg.tune.cpus_per_trial,
        **({"GPU": cfg.tune.gpus_per_trial} if cfg.tune.gpus_per_trial else {}),
    }
    if resume:
        if not tune.Tuner.can_restore(experiment_path):
            raise ConfigError(
                f"tune.experiment_name: got {experiment!r}; no sweep to resume at {experiment_path}; "
                "allowed: an existing sweep's name (or run without --resume)"
            )
        base = resumed_base(cfg, experiment_path, base)
        print(
            f"siclip tune: resuming sweep {experiment!r} from {experiment_path}. Warning: this unpickles Ray "
            "Tune's saved state (code runs from it): resume only a folder that no one else can write",
            file=sys.stderr,
        )
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=base, experiment=experiment), driver
        )
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        storage.write_text(
            storage.join(experiment_path, SWEEP_FILE), json.dumps(_sweep_record(cfg, base), indent=2)
        )
        trainable = tune.with_resources(
            tune.with_parameters(_trial, base=base, experiment=experiment), driver
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric,
                mode=cfg.tune.mode,
                scheduler=tune_scheduler(cfg.tune, max_t=max_t),
                search_alg=BasicVariantGenerator(
                    random_state=cfg.tune.seed, max_concurrent=cfg.tune.max_concurrent_trials
                ),
                num_samples=cfg.tune.num_samples,
            ),
            run_config=tune.RunConfig(
                name=experiment, storage_path=runs_dir, verbose=1, callbacks=_build_callbacks()
            ),
        )
    grid = tuner.fit()
    for _ in range(10):  # the last stopped trial's controller may take a moment to be declared dead
        if _release_orphaned_train_groups() == 0:
            time.sleep(0.5)
    folder: Path | str = experiment_path if is_uri(experiment_path) else Path(experiment_path)
    result = collect_results(grid, cfg, base=base, experiment_dir=folder, param_keys=param_keys)
    write_tables(result)
    return result
