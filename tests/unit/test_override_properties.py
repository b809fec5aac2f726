"""Property tests of the ``key.sub=value`` override parser (``apply_overrides``) against the config schema.

For every scalar key of ``SiclipCfg`` (walked from the dataclasses, so new keys are covered as they come):
any in-range value written as YAML comes back unchanged through ``apply_overrides`` + ``from_dict`` (or, when
it breaks a rule between fields, is refused there and by the dataclasses alike); the last
override of a key wins without touching the others; an unknown key is a one-line error naming it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from siclip.config import ConfigError, SiclipCfg, apply_overrides, from_dict


def _leaves(cls: Any, prefix: str = "") -> list[tuple[str, Any, dict[str, Any]]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, prefix + f.name + ".")
        else:
            out.append((prefix + f.name, tp, dict(f.metadata)))
    return out


def _strategy(tp: Any, meta: dict[str, Any]) -> st.SearchStrategy[Any] | None:
    lo, hi = meta.get("min"), meta.get("max")
    if typing.get_origin(tp) is Literal:
        return st.sampled_from(typing.get_args(tp))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(
            min_value=int(lo if lo is not None else -(10**6)) + bool(meta.get("lo_open")),
            max_value=int(hi if hi is not None else 10**6),
        )
    if tp is float:
        low = float(lo) if lo is not None else -1e6
        return st.floats(
            min_value=low,
            max_value=float(hi) if hi is not None else 1e6,
            exclude_min=bool(meta.get("lo_open")),
            allow_nan=False,
        )
    if tp is str and not meta:  # path-like strings are checked by load_config, not here
        # the parser trims surrounding white space (str.strip: also Unicode spaces such as U+00A0)
        return st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=20).filter(
            lambda s: s == s.strip()
        )
    return None


SCALARS = [(k, tp, m) for k, tp, m in _leaves(SiclipCfg) if _strategy(tp, m) is not None]
KEYS = [k for k, _, _ in SCALARS]


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).removesuffix("\n...\n").strip()


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@st.composite
def key_and_value(draw: st.DrawFn) -> tuple[str, Any]:
    key, tp, meta = draw(st.sampled_from(SCALARS))
    strategy = _strategy(tp, meta)
    assert strategy is not None
    return key, draw(strategy)


def test_the_schema_walk_finds_the_scalar_keys() -> None:
    assert {"optim.lr", "loss.pm_negatives", "train.max_steps", "train.progress", "train.run_name"} <= set(
        KEYS
    )


def _replaced(cfg: Any, dotted: str, value: Any) -> Any:
    """``cfg`` with one dotted value changed by ``dataclasses.replace`` (no YAML, no binder)."""
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _replaced(getattr(cfg, head), rest, value)})


def _built_or_refused_alike(pairs: list[tuple[str, Any]]) -> Any:
    """The config the overrides build, or None when it breaks a rule between fields (an in-range
    ``caption.min_actors`` above ``caption.num_actors``, ...): then building the same values directly
    must fail too, so the YAML path refuses nothing the dataclasses accept."""
    try:
        return from_dict(apply_overrides({}, [f"{k}={_yaml(v)}" for k, v in pairs]))
    except ConfigError:
        with pytest.raises(ConfigError):
            cfg = SiclipCfg()
            for k, v in pairs:
                cfg = _replaced(cfg, k, v)
        return None


@settings(max_examples=150, deadline=None)
@given(pair=key_and_value())
def test_any_in_range_value_written_as_yaml_round_trips(pair: tuple[str, Any]) -> None:
    key, value = pair
    cfg = _built_or_refused_alike([pair])
    if cfg is None:
        return
    got = _get(cfg, key)
    if isinstance(value, float):
        assert math.isclose(got, value, rel_tol=1e-12, abs_tol=0.0), (key, value, got)
    else:
        assert got == value and type(got) is type(value), (key, value, got)


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(key_and_value(), min_size=1, max_size=6))
def test_the_last_override_of_a_key_wins_and_others_are_kept(pairs: list[tuple[str, Any]]) -> None:
    cfg = _built_or_refused_alike(pairs)
    if cfg is None:
        return
    last = dict(pairs)
    for key, value in last.items():
        got = _get(cfg, key)
        assert math.isclose(got, value, rel_tol=1e-12) if isinstance(value, float) else got == value, key
    untouched = next((k for k in KEYS if k not in last), None)
    if untouched is not None:
        assert _get(cfg, untouched) == _get(SiclipCfg(), untouched)


SECTIONS = [n for n, tp in typing.get_type_hints(SiclipCfg).items() if dataclasses.is_dataclass(tp)]
"""Top-level keys that hold a section (``profile`` is a plain value)."""


def test_a_key_under_a_plain_value_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides({}, ["profile.x=1"])
    assert str(err.value) == "profile: is a value (one of 'siclip', 'paper'), not a section"


@settings(max_examples=60, deadline=None)
@given(
    section=st.sampled_from(SECTIONS),
    name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
)
def test_an_unknown_key_is_a_one_line_error_naming_it(section: str, name: str) -> None:
    key = f"{section}.{name}"
    if (
        key in KEYS
        or any(k.startswith(key + ".") for k in KEYS)
        or any(k == key for k, _, _ in _leaves(SiclipCfg))
    ):
        return
    with pytest.raises(ConfigError) as err:
        apply_overrides({}, [f"{key}=1"])
    msg = str(err.value)
    assert msg.startswith(f"{key}: unknown key; valid keys here: ") and "\n" not in msg


@settings(max_examples=40, deadline=None)
@given(text=st.text(st.characters(codec="ascii", exclude_categories=("Cc",)), max_size=15))
def test_only_the_first_equals_sign_splits_key_from_value(text: str) -> None:
    value = "a=" + text
    got = from_dict(apply_overrides({}, [f"train.run_name={_yaml(value)}"])).train.run_name
    assert got == value
