"""The one configuration schema of siclip: frozen ``*Cfg`` dataclasses, YAML loading, dotted overrides.

Every stage (data build, training, evaluation, sweeps, Ray) reads one :class:`SiclipCfg`. An unknown key, a
wrong type, an out-of-range value, a rule between fields or a missing file each raise :class:`ConfigError`
naming the key, the bad value and what is allowed. The modules, one job each:

- ``schema``: the dataclasses, each field's type, range and path kind (its ``metadata``), and the rules
  between fields (``data.batch_size`` a multiple of ``train.num_workers``, ``loss.local`` needs
  ``loss.gather``, ...) in the ``__post_init__`` of the dataclass that owns them (the section, or
  :class:`SiclipCfg` for rules spanning sections), so every way of building a config checks them:
  :func:`from_dict`, :func:`load_config`, :func:`replace` and direct construction alike;
- ``binding``: mappings to typed configs and back (:func:`from_dict`, :func:`to_dict`, :func:`typed_value`):
  types and ranges checked from each field's metadata, the profile applied (:data:`PROFILES`), ``key=value``
  overrides (:func:`apply_overrides`); no file system;
- ``paths``: URIs, shard patterns (:func:`expand_shards`), local paths made absolute for Ray workers, and
  :func:`check_paths`, the one step that looks at the file system;
- ``loading``: YAML files in (:func:`load_config`: read, override, bind, check paths) and out
  (:func:`save_config`, ``ray.env_vars`` redacted);
- ``switches``: the profile switches as a run resolved them, with their sources (:func:`resolve_switches`).

The typed config crosses into Ray as a plain dict (:func:`to_dict`) and is rebuilt, and so checked again, on
the far side (:func:`from_dict`); every sweep trial is built the same way. Import the names from
``siclip.config``; the modules are its layout, not its interface.
"""

from __future__ import annotations

from siclip.config.binding import (
    PROFILES,
    SWITCHES,
    apply_overrides,
    apply_profile,
    from_dict,
    to_dict,
    typed_value,
)
from siclip.config.loading import config_yaml, load_config, read_yaml_mapping, redacted, save_config
from siclip.config.paths import (
    TRAIN_SECTIONS,
    absolutize,
    check_paths,
    expand_shards,
    is_uri,
    is_weights_file,
)
from siclip.config.schema import (
    BenchmarkName,
    BenchmarkRootsCfg,
    CaptionCfg,
    ConfigError,
    DataCfg,
    EvalCfg,
    LossCfg,
    LossStageCfg,
    ModelCfg,
    OptimCfg,
    RayCfg,
    SaspCfg,
    SiclipCfg,
    TeacherCfg,
    TrainCfg,
    TuneCfg,
    replace,
    walk_fields,
)
from siclip.config.switches import SwitchReport, SwitchValue, resolve_switches, switch_report

__all__ = [
    "PROFILES",
    "SWITCHES",
    "TRAIN_SECTIONS",
    "BenchmarkName",
    "BenchmarkRootsCfg",
    "CaptionCfg",
    "ConfigError",
    "DataCfg",
    "EvalCfg",
    "LossCfg",
    "LossStageCfg",
    "ModelCfg",
    "OptimCfg",
    "RayCfg",
    "SaspCfg",
    "SiclipCfg",
    "SwitchReport",
    "SwitchValue",
    "TeacherCfg",
    "TrainCfg",
    "TuneCfg",
    "absolutize",
    "apply_overrides",
    "apply_profile",
    "check_paths",
    "config_yaml",
    "expand_shards",
    "from_dict",
    "is_uri",
    "is_weights_file",
    "load_config",
    "read_yaml_mapping",
    "redacted",
    "replace",
    "resolve_switches",
    "save_config",
    "switch_report",
    "to_dict",
    "typed_value",
    "walk_fields",
]
