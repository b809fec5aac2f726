"""Mappings to typed configs and back: types and ranges checked, the profile applied, ``key=value``
overrides; no file system here (:mod:`siclip.config.loading` reads and writes the YAML files).

:func:`from_dict` is the one binder: a config file's mapping, a Ray worker's copy (:func:`to_dict` on the
driver) and every sweep trial go through it. Each value is coerced to its field's type and checked against
its range (the field's ``metadata``, :mod:`siclip.config.schema`); the dataclasses' ``__post_init__`` rules
run when each section is built. Errors are :class:`~siclip.config.schema.ConfigError` naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from typing import Any, Literal

import yaml

from siclip.config.schema import ConfigError, SiclipCfg

__all__ = [
    "PROFILES",
    "SWITCHES",
    "apply_overrides",
    "apply_profile",
    "from_dict",
    "has_dotted",
    "to_dict",
    "typed_value",
]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}")
        return _build(typing.cast(type, tp), value, prefix=key + ".")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and ("off" if not value else "on") in allowed:
            value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
        elif isinstance(value, bool) and ("no" if not value else "yes") in allowed:
            value = "yes" if value else "no"  # ... and a bare yes/no (train.use_gpu: yes)
        if value not in allowed:
            raise ConfigError(f"{key}: got {value!r}; allowed: {', '.join(repr(a) for a in allowed)}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}")
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}; expected a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}; expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: got {value!r}; expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}; expected a string")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")  # a schema bug, not a user error


def _check_range(key: str, value: Any, meta: Any) -> None:
    lo, hi, lo_open = meta.get("min"), meta.get("max"), meta.get("lo_open", False)
    if lo is None and hi is None:
        return
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        too_low = lo is not None and (v <= lo if lo_open else v < lo)
        too_high = hi is not None and v > hi
        if too_low or too_high:
            lo_txt = "" if lo is None else f"{'>' if lo_open else '>='} {lo}"
            hi_txt = "" if hi is None else f"<= {hi}"
            allowed = " and ".join(t for t in (lo_txt, hi_txt) if t)
            raise ConfigError(f"{key}: got {v!r}; allowed: {allowed}")


def _build(cls: type, data: dict[str, Any], *, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        key = prefix + unknown[0]
        raise ConfigError(f"{key}: unknown key; valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        key = prefix + name
        coerced = _coerce(key, value, hints[name])
        _check_range(key, coerced, names[name].metadata)
        kwargs[name] = coerced
    return cls(**kwargs)


PROFILES: dict[str, dict[str, Any]] = {
    # today's choices: each equals the schema's default, so `profile: siclip` changes nothing
    "siclip": {
        "model.sasp.qk_init": "inherit",
        "model.sasp.inherit_mlp": True,
        "model.sasp.mlp_init": "torch",
        "model.sasp.layer_scale": 0.0,
        "model.sasp.share": "qk",
        "model.freeze_bn_stats": True,
        "model.freeze_logit_scale": False,
        "model.reset_logit_scale": False,
        "loss.crd_teacher_scale": "fixed",
        "loss.crd_student_scale": "own",
        "loss.icl_scale": "exp",
        "optim.grad_clip": 1.0,
        "optim.beta2": 0.98,
        "optim.eps": 1e-6,
        "optim.loss_group": "by_shape",
    },
    # the authors' code (Alexios-hub/LightClip, ws_light_mobileclip_s0) where the paper's text is silent;
    # docs/RECIPE.md gives each switch's source file and why
    "paper": {
        "model.sasp.qk_init": "zero",
        "model.sasp.inherit_mlp": False,
        "model.sasp.mlp_init": "trunc_normal",
        "model.sasp.layer_scale": 1e-5,
        "model.sasp.share": "mixer",
        "model.freeze_bn_stats": False,
        "model.freeze_logit_scale": True,
        "model.reset_logit_scale": True,
        "loss.crd_teacher_scale": "matched",
        "loss.crd_student_scale": "clip",
        "loss.icl_scale": "raw",
        "optim.grad_clip": 0.0,
        "optim.beta2": 0.999,
        "optim.eps": 1e-8,
        "optim.loss_group": "one",
    },
}
"""Per profile, the dotted keys it sets (every profile sets the same keys: the profile *switches*); a key
the config or the command line gives explicitly is left alone, and
:func:`~siclip.config.switches.resolve_switches` says so."""

SWITCHES: tuple[str, ...] = tuple(PROFILES["paper"])
"""The profile switches: the keys whose value depends on ``profile``."""


def has_dotted(data: dict[str, Any], dotted: str) -> bool:
    """Whether the nested mapping ``data`` sets the dotted key ``dotted`` (``model.sasp.share``) itself."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def apply_profile(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its profile's switch values filled in wherever ``data`` does not set the key itself."""
    data = dict(data or {})
    profile = _coerce("profile", data.get("profile", "siclip"), typing.get_type_hints(SiclipCfg)["profile"])
    out = apply_overrides(data, [])
    for dotted, value in PROFILES[profile].items():
        if not has_dotted(data, dotted):
            _set_dotted(out, dotted, value)
    return out


def typed_value(dotted: str, value: Any) -> Any:
    """``value`` as the config holds it at ``dotted`` (type and range checked, as :func:`from_dict` does).

    Only that field is checked; the rules between fields run when the value goes into a config (e.g. with
    :func:`~siclip.config.schema.replace`). Raises :class:`ConfigError` naming the key.
    """
    cls: Any = SiclipCfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            raise ConfigError(f"{path}: unknown key; valid keys here: {', '.join(sorted(fields))}")
        tp = typing.get_type_hints(cls)[part]
        if i == len(parts) - 1:
            coerced = _coerce(path, value, tp)
            _check_range(path, coerced, fields[part].metadata)
            return coerced
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"{path}: is a value ({_type_name(tp)}), not a section")
        cls = tp
    raise ConfigError(f"{dotted}: got an empty key")  # pragma: no cover - split() gives one part at least


def from_dict(data: dict[str, Any]) -> SiclipCfg:
    """Build (and type-check) a config from a nested dict, its profile applied; does not touch the file system."""
    return _build(SiclipCfg, apply_profile(data or {}))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML-safe nested dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    cls: Any = SiclipCfg
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        is_dc = dataclasses.is_dataclass(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)} if is_dc else {}
        if is_dc and part not in fields:
            raise ConfigError(f"{path}: unknown key; valid keys here: {', '.join(sorted(fields))}")
        if i == len(parts) - 1:
            node[part] = value
            return
        tp = typing.get_type_hints(cls)[part] if is_dc else None
        if is_dc and not (dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict):
            raise ConfigError(f"{path}: is a value ({_type_name(tp)}), not a section")
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{path}: got {child!r}; expected a mapping")
        node = child
        cls = tp if is_dc else None


def _split_top_level(text: str) -> list[str]:
    """Split ``a, b{1,2}, c`` on commas outside braces (brace patterns are not YAML)."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        items.append(cur.strip())
    return items


def _parse_value(raw: str) -> Any:
    """A YAML value; shard patterns such as ``[dir/s-{000..009}.tar]`` that YAML rejects stay strings."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        text = raw.strip()
        if text.startswith("[") and text.endswith("]"):
            return _split_top_level(text[1:-1])
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, returning a new dict."""
    out = yaml.safe_load(yaml.safe_dump(data or {})) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: an override must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        _set_dotted(out, key, _parse_value(raw))
    return out
