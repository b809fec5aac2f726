"""Config files in and out: a YAML file (a path or a URI) read into a checked config, and the config saved
as YAML with ``ray.env_vars`` redacted.

:func:`load_config` is how every command builds its config: the file's mapping, the command line's
``key=value`` overrides and the profile bound by :func:`~siclip.config.binding.from_dict` (types, ranges,
the rules between fields), then the paths checked (:func:`~siclip.config.paths.check_paths`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml

from siclip import storage
from siclip.config.binding import apply_overrides, from_dict, to_dict
from siclip.config.paths import check_paths
from siclip.config.schema import ConfigError, SiclipCfg

__all__ = ["config_yaml", "load_config", "read_yaml_mapping", "redacted", "save_config"]


def _yaml_problem(path: str, exc: yaml.YAMLError) -> str:
    """``file:line:column: not valid YAML: problem`` on one line (PyYAML's own message spans several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return f"{where}: not valid YAML: {problem}"


def read_yaml_mapping(path: str | os.PathLike[str], *, key: str) -> dict[str, Any]:
    """A YAML file (a path or a URI such as ``s3://``) holding a mapping; errors name ``key`` (the option or
    config key that gave the path)."""
    try:
        text = storage.read_text(path)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise ConfigError(f"{key}: got {str(path)!r}; no such file") from exc
    except (ValueError, OSError) as exc:  # an unknown scheme, no access, ... : one line with the cause
        raise ConfigError(f"{key}: got {str(path)!r}; cannot read it ({' '.join(str(exc).split())})") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: {_yaml_problem(str(path), exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    check_files: bool | tuple[str, ...] = True,
) -> SiclipCfg:
    """Load a YAML config, apply dotted overrides, validate types, ranges and (optionally) paths.

    ``check_files`` may be a tuple of section names to check only those stages' paths.
    """
    data = read_yaml_mapping(path, key="--config") if path is not None else {}
    data = apply_overrides(data, list(overrides))
    cfg = from_dict(data)
    if check_files:
        check_paths(cfg, sections=check_files if isinstance(check_files, tuple) else None)
    return cfg


def redacted(cfg: SiclipCfg) -> SiclipCfg:
    """``cfg`` without the values of ``ray.env_vars`` (they may hold credentials): what every saved copy holds."""
    return dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, env_vars={}))


def config_yaml(cfg: SiclipCfg) -> str:
    """The config as YAML for every saved copy (a run's ``config.yaml``, its TensorBoard text, a sweep's
    ``best_config.yaml``): ``load_config`` reads it back unchanged except ``ray.env_vars``, whose values are
    never written; a comment names the variables that were set, to pass again (``ray.env_vars.NAME=...``)."""
    text = yaml.safe_dump(to_dict(redacted(cfg)), sort_keys=False)
    if cfg.ray.env_vars:
        names = ", ".join(sorted(str(k) for k in cfg.ray.env_vars))
        text = (
            f"# ray.env_vars had values for {names}; not saved (they may hold credentials): pass them again "
            "as ray.env_vars.NAME=value where needed\n" + text
        )
    return text


def save_config(cfg: SiclipCfg, path: str | os.PathLike[str]) -> None:
    """Write the resolved config (a path or a URI) as :func:`config_yaml`: what ``load_config`` reads back
    unchanged, ``ray.env_vars`` values left out."""
    storage.write_text(path, config_yaml(cfg))
