"""A sweep's config, checked before Ray starts: the search space, the space file, the metric, trial configs.

``tune.space`` (merged over ``tune.space_file``'s) maps dotted config keys to a distribution. Every key
must name a config value, every value a sampler may return must pass that field's checks, and every
combination of the keys' values must make a valid config with the base config (the rules between fields),
so a bad space fails with one line naming its key before any trial starts. :func:`trial_config` is one
trial's full config: the base config with its sampled values applied.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

from siclip.config import (
    ConfigError,
    SiclipCfg,
    TuneCfg,
    absolutize,
    apply_overrides,
    from_dict,
    read_yaml_mapping,
    replace,
    to_dict,
    typed_value,
)

__all__ = [
    "DISTRIBUTIONS",
    "load_space",
    "parse_space",
    "prepare_sweep",
    "resolve_tune",
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


def trial_config(base: dict[str, Any], params: dict[str, Any], *, run_name: str) -> SiclipCfg:
    """The full config of one trial: the base config dict with the sampled dotted values applied."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in sorted(params.items())]
    data = apply_overrides(base, [*overrides, f"train.run_name={json.dumps(run_name)}"])
    return from_dict(data)


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


def prepare_sweep(cfg: SiclipCfg) -> SiclipCfg:
    """The sweep's config before Ray starts: the space file resolved, paths absolute, ``tune.metric`` one
    that this config's evaluation reports (a ``val/...`` metric), and an evaluation at every report."""
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
