"""``train.use_gpu`` on clusters that scale: what auto means, and a sweep deciding once (no Ray started)."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from siclip import ray_compat, sweep
from siclip.config import SiclipCfg, apply_overrides, from_dict, to_dict
from siclip.sweep.run import fix_device
from siclip.train import launch


def _cfg(*overrides: str) -> SiclipCfg:
    return from_dict(apply_overrides(to_dict(SiclipCfg()), list(overrides)))


def _scaler(most: dict[str, float] | None, *, present: bool | None = None) -> ray_compat.Autoscaler:
    """An autoscaler that may launch ``most`` ({}: none runs; None: one runs and Ray does not say what)."""
    return ray_compat.Autoscaler(present=bool(most) if present is None else present, most=most or None)


@pytest.mark.parametrize(
    ("use_gpu", "gpus_now", "gpus_launchable", "expected"),
    [
        ("auto", 0, {}, False),  # a laptop or a CPU-only cluster
        ("auto", 2, {}, True),  # GPU nodes are up
        ("auto", 0, {"CPU": 40, "GPU": 4}, True),  # none up yet, but the autoscaler can launch four
        ("auto", 0, {"CPU": 40, "GPU": 0}, False),  # an autoscaler with CPU node types only
        ("yes", 0, {}, True),  # asks (and waits) even when nothing could grant it: no refusal up front
        ("no", 8, {"GPU": 8}, False),
    ],
)
def test_use_gpu_counts_gpus_the_autoscaler_can_launch(
    monkeypatch: pytest.MonkeyPatch, use_gpu: str, gpus_now: int, gpus_launchable: dict, expected: bool
) -> None:
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": float(gpus_now)})
    monkeypatch.setattr(ray_compat, "autoscaler", lambda: _scaler(dict(gpus_launchable)))
    assert launch.resolve_use_gpu(_cfg(f"train.use_gpu={use_gpu}")) is expected


def test_auto_refuses_where_an_autoscaler_runs_but_its_gpus_cannot_be_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from siclip.config import ConfigError

    monkeypatch.setattr(ray_compat, "autoscaler", lambda: _scaler(None, present=True))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    with pytest.raises(
        ConfigError, match=r"^train\.use_gpu: .*train\.use_gpu=yes.*train\.use_gpu=no"
    ) as info:
        launch.resolve_use_gpu(_cfg("train.use_gpu=auto"))
    assert "\n" not in str(info.value)
    for choice, expected in (("yes", True), ("no", False)):  # the choices it asks for are answered as asked
        assert launch.resolve_use_gpu(_cfg(f"train.use_gpu={choice}")) is expected
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 1.0})
    assert launch.resolve_use_gpu(_cfg("train.use_gpu=auto"))  # GPUs already up: nothing to guess


def test_a_sweep_fixes_the_device_once_for_every_trial(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(ray_compat, "autoscaler", lambda: _scaler({"GPU": 4}))
    fixed = fix_device(_cfg("train.use_gpu=auto"))
    assert fixed.train.use_gpu == "yes"
    # later, with GPU nodes gone, a trial built from the sweep's base config still says yes
    monkeypatch.setattr(ray_compat, "autoscaler", lambda: _scaler({}))
    trial = sweep.trial_config(to_dict(fixed), {"loss.pm_weight": 0.5}, run_name="t-1")
    assert trial.train.use_gpu == "yes" and launch.resolve_use_gpu(trial)
    assert fix_device(_cfg("train.use_gpu=auto")).train.use_gpu == "no"


def test_worker_start_timeout_is_validated() -> None:
    from siclip.config import ConfigError

    assert _cfg().train.worker_start_timeout_s == 900
    with pytest.raises(ConfigError, match=r"train\.worker_start_timeout_s"):
        _cfg("train.worker_start_timeout_s=0")


def test_a_bare_yaml_yes_or_no_is_the_choice_not_a_boolean(tmp_path: Path) -> None:
    from siclip.config import load_config

    for word in ("yes", "no"):
        path = tmp_path / f"{word}.yaml"
        path.write_text(f"train:\n  use_gpu: {word}\n")  # YAML 1.1 reads these as true / false
        assert load_config(path, check_files=False).train.use_gpu == word
