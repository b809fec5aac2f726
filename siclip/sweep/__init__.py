"""Ray Tune sweeps over the one config schema.

A sweep is the base config plus ``tune.space`` (and ``tune.space_file``): dotted config keys mapped to a
distribution. :mod:`siclip.sweep.space` checks it (and the metric) before Ray starts, :mod:`siclip.sweep.run`
runs the trials with Ray Tune, each one ``launch(cfg)`` in its own run folder, and
:mod:`siclip.sweep.results` ranks them and writes ``trials.csv``, ``trials.md`` and the best trial's full
config ``best_config.yaml`` into ``<train.runs_dir>/<tune.experiment_name>/`` (a folder or a URI such as
``s3://``). Importing this package does not import Ray.
"""

from siclip.sweep.results import SweepResult, TrialRow, format_table
from siclip.sweep.run import run_sweep
from siclip.sweep.space import DISTRIBUTIONS, load_space, parse_space, resolve_tune, trial_config, val_metrics

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
