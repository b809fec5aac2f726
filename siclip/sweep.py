"""Ray Tune sweeps over the one config schema: search-space parsing, the trial driver, result tables.

A sweep is the base config plus ``tune.space`` (and ``tune.space_file``): dotted config keys mapped to a
distribution. Every trial applies its sampled values to the base config, trains with ``launch(cfg)`` exactly
as ``siclip train`` does (Train V2 inside a Tune function, metrics forwarded by ``TuneReportCallback``), and
gets its own run folder ``<train.runs_dir>/<tune.experiment_name>-<trial id>`` with TensorBoard events.
The sweep writes ``trials.csv``, ``trials.md`` and the best trial's full config ``best_config.yaml`` into
``<train.runs_dir>/<tune.experiment_name>/`` (a folder or a URI such as ``s3://``). Every bad search space
is rejected before a trial starts. The device (``train.use_gpu``) is decided once, before the first trial,
so a sweep never mixes CPU and GPU trials.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from siclip import storage
from siclip.config import (
    ConfigError,
    SiclipCfg,
    TuneCfg,
    absolutize,
    apply_overrides,
    from_dict,
    is_uri,
    read_yaml_mapping,
    replace,
    save_config,
    to_dict,
    typed_value,
)

__all__ = [
    "DISTRIBUTIONS",
    "SweepResult",
    "TrialRow",
    "format_table",
    "load_space",
    "parse_space",
    "resolve_tune",
    "run_sweep",
    "trial_config",
    "val_metrics",
]

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")
"""``randint: [lo, hi]`` includes ``hi`` (unlike ``tune.randint``), like the other ranges."""

# Sweeping these would break the sweep itself: trials name their own runs, and tune/ray are the driver's.
_NOT_SEARCHABLE = ("tune.", "ray.", "train.run_name", "train.runs_dir")

_MAX_COMBINATIONS = 4096
"""Search spaces with more value combinations than this are checked pair by pair of keys."""
_MAX_RANDINT_VALUES = 64
"""Integer ranges up to this many values are checked value by value, longer ones at their ends."""

PARAMS_FILE = "sweep_params.json"
"""In each trial's run folder: the values sampled for it (dotted key -> value)."""
SWEEP_FILE = "sweep.json"
"""In the sweep's folder: its search space, sample count and base config (JSON; ``--resume`` checks it)."""

STOPPED = "STOPPED"
"""Status of a trial the scheduler stopped before its last report (ASHA / median stopping)."""


# ----------------------------------------------------------------------------------- search space
def _spec_values(key: str, spec: Any) -> tuple[str, list[Any]]:
    """Check one ``{distribution: args}`` entry; return its name and the values that must be valid."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"tune.space.{key}: got {spec!r}; allowed: a mapping with one of {', '.join(DISTRIBUTIONS)}"
        )
    ((name, args),) = spec.items()
    if name not in DISTRIBUTIONS:
        raise ConfigError(
            f"tune.space.{key}: unknown distribution {name!r}; allowed: {', '.join(DISTRIBUTIONS)}"
        )
    if name in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.space.{key}: {name} got {args!r}; allowed: a non-empty list of values")
        return name, list(args)
    if not (isinstance(args, list) and len(args) == 2):
        raise ConfigError(f"tune.space.{key}: {name} got {args!r}; allowed: a list [low, high]")
    lo, hi = args
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi))
    if name == "randint" and not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
        raise ConfigError(f"tune.space.{key}: randint got {args!r}; allowed: two integers [low, high]")
    if not numbers or not all(math.isfinite(v) for v in (lo, hi)):
        raise ConfigError(f"tune.space.{key}: {name} got {args!r}; allowed: two finite numbers [low, high]")
    if lo > hi or (lo == hi and name != "randint"):
        raise ConfigError(f"tune.space.{key}: {name} got {args!r}; allowed: low < high")
    if name == "loguniform" and lo <= 0:
        raise ConfigError(f"tune.space.{key}: loguniform got {args!r}; allowed: bounds > 0")
    # Continuous samplers return floats even for integer bounds; check what they will really return.
    return name, [lo, hi] if name == "randint" else [float(lo), float(hi)]


def _check_key(key: str, values: list[Any]) -> list[Any]:
    """The key must name a config value, and every value the sampler may return must pass that field's type
    and range checks; return those values as the config holds them (tuples, ``'yes'`` for ``true``, ...)."""
    if key.startswith(_NOT_SEARCHABLE) or key in ("tune", "ray"):
        raise ConfigError(
            f"tune.space.{key}: cannot be searched; allowed: keys outside tune.*, ray.*, "
            "train.run_name and train.runs_dir"
        )
    typed = []
    for value in values:
        try:
            typed.append(typed_value(key, value))
        except ConfigError as exc:
            raise ConfigError(f"tune.space.{key}: {exc}") from exc
    return typed


def _show(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def _replace_many(cfg: Any, changes: dict[str, Any]) -> Any:
    """``cfg`` with dotted values replaced, each dataclass rebuilt once with all of its changes (so the
    checks between its fields see the new values together, never a half-changed section)."""
    own: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for dotted, value in changes.items():
        head, _, rest = dotted.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            own[head] = value
    for head, sub in nested.items():
        own[head] = _replace_many(getattr(cfg, head), sub)
    return replace(cfg, **own)


def _fails(cfg: SiclipCfg, combo: dict[str, Any]) -> ConfigError | None:
    try:
        _replace_many(cfg, combo)
    except ConfigError as exc:
        return exc
    return None


def _check_combinations(typed: dict[str, list[Any]], shown: dict[str, list[Any]], base: SiclipCfg) -> None:
    """Every combination of the keys' values must make a valid config with ``base`` (the rules between
    fields, such as ``data.batch_size`` a multiple of ``train.num_workers``). Up to ``_MAX_COMBINATIONS``
    the full product is tried, beyond it every pair of keys. A bad combination is reported with the keys it
    needs: those for which another of their values (or the base config's) makes it valid."""
    keys = list(typed)
    n_product = math.prod(len(typed[k]) for k in keys)
    groups = [keys] if n_product <= _MAX_COMBINATIONS else [list(p) for p in itertools.combinations(keys, 2)]
    for group in groups:
        for picks in itertools.product(*(range(len(typed[k])) for k in group)):
            combo = {k: typed[k][i] for k, i in zip(group, picks, strict=True)}
            exc = _fails(base, combo)
            if exc is None:
                continue
            needed = [
                k
                for k in group
                if _fails(base, {j: v for j, v in combo.items() if j != k}) is None
                or any(_fails(base, {**combo, k: v}) is None for v in typed[k])
            ]
            at = dict(zip(group, picks, strict=True))
            together = " with ".join(_show(k, shown[k][at[k]]) for k in needed or group)
            raise ConfigError(f"tune.space.{(needed or group)[0]}: {together}: {exc}")


def _to_tune(name: str, values: list[Any]) -> Any:
    from ray import tune

    if name == "loguniform":
        return tune.loguniform(float(values[0]), float(values[1]))
    if name == "uniform":
        return tune.uniform(float(values[0]), float(values[1]))
    if name == "randint":
        return tune.randint(values[0], values[1] + 1)
    if name == "choice":
        return tune.choice(values)
    return tune.grid_search(values)


def parse_space(space: dict[str, Any], *, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate a YAML search space and turn it into Ray Tune's ``param_space`` (flat, dotted keys).

    ``base`` is the config dict the overrides apply to (schema defaults when None): every key must name a
    config value there, and both range ends (or every listed value) must pass the schema's type and range
    checks. Then every combination of the keys' values (listed values, small integer ranges in full, the ends
    of other ranges) must make a valid config together with ``base``: the rules between fields, such as
    ``data.batch_size`` a multiple of ``train.num_workers``. A bad space fails with one-line
    :class:`ConfigError` naming its key (and the failing combination) before any trial starts.
    """
    if not isinstance(space, dict):
        raise ConfigError(f"tune.space: got {space!r}; allowed: a mapping of dotted config keys")
    if not space:
        raise ConfigError("tune.space: got {}; allowed: at least one dotted config key to search")
    base = base if base is not None else {}
    params: dict[str, Any] = {}
    typed: dict[str, list[Any]] = {}
    shown: dict[str, list[Any]] = {}
    for key in sorted(space):
        if not isinstance(key, str) or not key:
            raise ConfigError(f"tune.space: key {key!r}; allowed: a dotted config key such as loss.fd_weight")
        name, values = _spec_values(key, space[key])
        checked = _check_key(key, values)
        if name == "randint" and values[1] - values[0] < _MAX_RANDINT_VALUES:
            # a small integer range in full: train.num_workers {randint: [1, 4]} samples 3 as well as the ends
            shown[key] = list(range(values[0], values[1] + 1))
            typed[key] = [type(checked[0])(v) for v in shown[key]]
        else:
            shown[key], typed[key] = values, checked
        params[key] = _to_tune(name, values)
    _check_combinations(typed, shown, from_dict(base))
    return params


# ----------------------------------------------------------------------------------- space files
def _read_space_file(path: str) -> dict[str, Any]:
    """The ``tune`` section of a space file: a config-style file with ``tune:``, or bare tune keys."""
    data = read_yaml_mapping(path, key="tune.space_file")
    if "tune" in data:
        other = sorted(set(data) - {"tune"})
        if other:
            raise ConfigError(
                f"tune.space_file: {path!r} has section {other[0]!r}; allowed: only 'tune' "
                "(put fixed settings in the base config or as key=value overrides)"
            )
        data = data["tune"] or {}
        if not isinstance(data, dict):
            raise ConfigError(f"tune.space_file: {path!r}: 'tune' must be a mapping")
    if "space_file" in data:
        raise ConfigError(f"tune.space_file: {path!r} sets space_file itself; allowed: no nesting")
    try:
        from_dict({"tune": data})
    except ConfigError as exc:
        raise ConfigError(f"tune.space_file ({path}): {exc}") from exc
    return data


def load_space(cfg: SiclipCfg) -> dict[str, Any]:
    """``tune.space_file``'s ``space`` with ``tune.space`` merged over it (the config's keys win)."""
    space: dict[str, Any] = {}
    if cfg.tune.space_file:
        space.update(_read_space_file(cfg.tune.space_file).get("space") or {})
    space.update(cfg.tune.space)
    return space


def resolve_tune(cfg: SiclipCfg) -> SiclipCfg:
    """The config with the space file's other tune keys applied and the merged space in ``tune.space``.

    A tune key in the space file (metric, scheduler, num_samples, ...) applies unless the config sets that
    key to something other than the schema default, so the command line and the base config win.
    """
    merged = to_dict(cfg.tune)
    if cfg.tune.space_file:
        defaults = to_dict(TuneCfg())
        for k, v in _read_space_file(cfg.tune.space_file).items():
            if k != "space" and merged[k] == defaults[k]:
                merged[k] = v
    merged["space"] = load_space(cfg)
    merged["space_file"] = ""
    data = to_dict(cfg)
    data["tune"] = merged
    return from_dict(data)


# ----------------------------------------------------------------------------------- trials
def trial_config(base: dict[str, Any], params: dict[str, Any], *, run_name: str) -> SiclipCfg:
    """The full config of one trial: the base config dict with the sampled dotted values applied."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in sorted(params.items())]
    data = apply_overrides(base, [*overrides, f"train.run_name={json.dumps(run_name)}"])
    return from_dict(data)


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


def _expected_reports(cfg: SiclipCfg) -> int:
    """Reports a finished run makes: one per ``train.ckpt_every`` steps, plus the final step."""
    from siclip.train.launch import resolve_max_steps

    return math.ceil(resolve_max_steps(cfg) / cfg.train.ckpt_every)


def val_metrics(cfg: SiclipCfg) -> list[str]:
    """The ``val/...`` metrics a run of ``cfg`` reports at each evaluation: zero-shot on ``eval.zeroshot_dir``
    (seen/unseen splits where the folder holds out classes), recall@K on ``eval.retrieval_shards``, and
    ``val/<benchmark>/<metric>`` for each of ``eval.benchmarks`` (reported when its dataset is found there)."""
    from siclip.eval.benchmarks import BENCHMARKS

    e = cfg.eval
    names: list[str] = []
    if e.zeroshot_dir:
        names += [f"zeroshot_top{k}{split}" for split in ("", "_seen", "_unseen") for k in (1, 5)]
    retrieval = [f"{way}_r@{k}" for k in e.recall_at for way in ("i2t", "t2i")]
    if e.retrieval_shards:
        names += retrieval
    for bench in e.benchmarks:
        if BENCHMARKS[bench].task == "classification":
            names += [f"{bench}/{m}" for m in ("top1", "top5", "mean_per_class_recall")]
        else:
            names += [f"{bench}/{m}" for m in retrieval]
    return [f"val/{n}" for n in names]


def _prepare(cfg: SiclipCfg) -> SiclipCfg:
    """Resolve the space file, make paths absolute, and make every report carry a fresh metric."""
    cfg = absolutize(resolve_tune(cfg))
    if cfg.tune.metric.startswith("val/"):
        allowed = val_metrics(cfg)
        if not allowed:
            raise ConfigError(
                f"tune.metric: got {cfg.tune.metric!r}, but no held-out data is set; allowed: set "
                "eval.zeroshot_dir / eval.retrieval_shards / eval.benchmarks, or a training metric such as "
                "'loss/total'"
            )
        if cfg.tune.metric not in allowed:
            raise ConfigError(
                f"tune.metric: got {cfg.tune.metric!r}, which this config's evaluation never reports; "
                f"allowed: {', '.join(allowed)}, or a training metric such as 'loss/total'"
            )
    ev, ck = cfg.train.eval_every, cfg.train.ckpt_every
    if cfg.tune.metric.startswith("val/") and (ev == 0 or ck % ev):
        # The scheduler compares trials at every report; a report without a new evaluation would carry a
        # stale (or no) metric, so trials evaluate at every checkpoint.
        print(f"siclip tune: train.eval_every {ev} -> {ck} (= train.ckpt_every) so every report is scored")
        cfg = replace(cfg, train=replace(cfg.train, eval_every=ck))
    return cfg


def _fix_device(cfg: SiclipCfg) -> SiclipCfg:
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


def _fit_resources(cfg: SiclipCfg) -> SiclipCfg:
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
            per = round(cfg.train.cpus_per_worker - excess / cfg.train.num_workers, 4)
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


def _build_scheduler(tune_cfg: TuneCfg, *, max_t: int) -> Any:
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


# ----------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    metric: float | None
    status: str
    """TERMINATED (ran every report), STOPPED (early, by the scheduler) or ERROR."""
    iterations: int
    step: int
    run_name: str
    error: str = ""
    """ERROR trials: the exception, on one line (Tune keeps the full trace in the trial's ``error.txt``)."""


@dataclass(frozen=True)
class SweepResult:
    experiment_dir: Path | str
    """The sweep's folder (a local path) or URI."""
    metric: str
    mode: str
    rows: tuple[TrialRow, ...]
    """Best first."""
    best: TrialRow | None
    best_config: Path | str | None
    """``best_config.yaml``: the best trial's full config, trainable with ``siclip train --config``."""
    param_keys: tuple[str, ...] = field(default=())

    @property
    def table(self) -> str:
        return format_table(self)

    @property
    def errored(self) -> tuple[TrialRow, ...]:
        """The trials that ended in ERROR (``siclip tune`` then exits non-zero)."""
        return tuple(r for r in self.rows if r.status == "ERROR")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _columns(result: SweepResult) -> list[str]:
    return ["trial_id", *result.param_keys, result.metric, "status", "reports", "step"]


def _cells(result: SweepResult, row: TrialRow) -> list[str]:
    params = [_fmt(row.params.get(k)) for k in result.param_keys]
    return [row.trial_id, *params, _fmt(row.metric), row.status, str(row.iterations), str(row.step)]


def format_table(result: SweepResult) -> str:
    """A Markdown table of the trials, best first, and a line naming the best config."""
    cols = _columns(result)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cells(result, row)) + " |" for row in result.rows]
    if result.best is not None:
        lines.append(
            f"\nbest: trial {result.best.trial_id} ({result.metric} = {_fmt(result.best.metric)}, "
            f"{result.mode}); config {result.best_config}"
        )
    else:
        lines.append(f"\nno trial reported {result.metric}")
    for row in result.errored:
        lines.append(f"ERROR: trial {row.trial_id} ({row.run_name}): {row.error or 'no message'}")
    return "\n".join(lines)


def _one_line(error: BaseException | None, limit: int = 300) -> str:
    """An exception as one line: its type and the last non-empty line of its message (Ray wraps the
    trial's own exception in a long trace whose last line is the cause)."""
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = f"{type(error).__name__}: {lines[-1] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _write_tables(result: SweepResult) -> None:
    folder = result.experiment_dir
    f = io.StringIO(newline="")
    writer = csv.writer(f)
    writer.writerow(_columns(result))
    for row in result.rows:
        params = [row.params.get(k, "") for k in result.param_keys]
        metric = "" if row.metric is None else row.metric
        writer.writerow([row.trial_id, *params, metric, row.status, row.iterations, row.step])
    storage.write_text(storage.join(folder, "trials.csv"), f.getvalue())
    storage.write_text(storage.join(folder, "trials.md"), format_table(result) + "\n")


def _rank_key(row: TrialRow, mode: str) -> tuple[int, int, float]:
    """Finished trials first, then by metric (missing last)."""
    finished = 0 if row.status == "TERMINATED" else 1
    if row.metric is None or not math.isfinite(row.metric):
        return (finished, 1, 0.0)
    return (finished, 0, -row.metric if mode == "max" else row.metric)


def _collect(
    grid: Any,
    cfg: SiclipCfg,
    *,
    base: dict[str, Any],
    experiment_dir: Path | str,
    param_keys: tuple[str, ...],
) -> SweepResult:
    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows = []
    for res in grid:
        m = dict(res.metrics or {})
        params = dict(res.config or {})  # the trial's own sampled values, whatever the space is now
        trial_id = str(m.get("trial_id") or Path(res.path).name)
        run_name = f"{cfg.tune.experiment_name}-{trial_id}"
        iterations = int(m.get("training_iteration", 0))
        if res.error is not None:
            status = "ERROR"
        elif iterations >= _expected_reports(trial_config(base, params, run_name=run_name)):
            status = "TERMINATED"
        else:
            status = STOPPED
        value = m.get(metric)
        rows.append(
            TrialRow(
                trial_id=trial_id,
                params=params,
                metric=float(value) if isinstance(value, int | float) else None,
                status=status,
                iterations=iterations,
                step=int(m.get("step", 0)),
                run_name=run_name,
                error=_one_line(res.error) if status == "ERROR" else "",
            )
        )
    rows.sort(key=lambda r: _rank_key(r, mode))
    param_keys = (*param_keys, *sorted({k for r in rows for k in r.params} - set(param_keys)))
    best = rows[0] if rows and rows[0].metric is not None and rows[0].status != "ERROR" else None
    best_path: Path | str | None = None
    if best is not None:
        best_cfg = trial_config(base, best.params, run_name=f"{cfg.tune.experiment_name}-best")
        best_path = storage.join(experiment_dir, "best_config.yaml")
        best_path = best_path if storage.is_remote(best_path) else Path(best_path)
        save_config(best_cfg, best_path)
    return SweepResult(
        experiment_dir=experiment_dir,
        metric=metric,
        mode=mode,
        rows=tuple(rows),
        best=best,
        best_config=best_path,
        param_keys=param_keys,
    )


def _fresh_name(runs_dir: str, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... : the first whose folder under ``runs_dir`` does not exist."""
    candidate, n = name, 1
    while storage.exists(f"{runs_dir}/{candidate}"):
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def _sweep_record(cfg: SiclipCfg, base: dict[str, Any]) -> dict[str, Any]:
    return {"space": cfg.tune.space, "num_samples": cfg.tune.num_samples, "base": base}


def _resume_base(cfg: SiclipCfg, experiment_path: str, base: dict[str, Any]) -> dict[str, Any]:
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
    cfg = _prepare(cfg)
    parse_space(cfg.tune.space, base=to_dict(cfg))  # fail on a bad space before Ray starts
    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards: got []; allowed: one or more shard paths or patterns")
    max_t = _expected_reports(cfg)

    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from siclip.ray_session import init_ray

    init_ray(cfg.ray)
    from siclip.train.launch import check_cluster_storage

    check_cluster_storage(cfg)
    cfg = _fix_device(cfg)
    cfg = _fit_resources(cfg)
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
        base = _resume_base(cfg, experiment_path, base)
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
                scheduler=_build_scheduler(cfg.tune, max_t=max_t),
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
    result = _collect(grid, cfg, base=base, experiment_dir=folder, param_keys=param_keys)
    _write_tables(result)
    return result
