"""The Ray-free parts of a sweep's Tune run: the scheduler a config names, and what ``--resume`` trains
(no Ray session needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from siclip.config import ConfigError, from_dict, to_dict
from siclip.sweep.run import SWEEP_FILE, resumed_base, tune_scheduler


@pytest.mark.parametrize(
    ("name", "kind"), [("asha", "ASHAScheduler"), ("median", "MedianStoppingRule"), ("fifo", "FIFOScheduler")]
)
def test_the_configured_scheduler_runs_the_sweep(name: str, kind: str) -> None:
    from ray.tune import schedulers

    cfg = from_dict({"tune": {"scheduler": name}})
    assert isinstance(tune_scheduler(cfg.tune, max_t=4), getattr(schedulers, kind))


SPACE = {"loss.fd_weight": {"loguniform": [500, 20000]}}


def _sweep_folder(tmp_path: Path, **sections: dict) -> str:
    """A sweep folder as ``siclip tune`` leaves it: ``sweep.json`` with its space, samples and base config."""
    cfg = from_dict({**sections, "tune": {"space": SPACE, "num_samples": 4}})
    folder = tmp_path / "exp"
    folder.mkdir()
    record = {"space": SPACE, "num_samples": 4, "base": to_dict(cfg)}
    (folder / SWEEP_FILE).write_text(json.dumps(record))
    return str(folder)


def test_resume_trains_the_sweeps_own_base_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _sweep_folder(tmp_path, loss={"crd_weight": 2.0})
    today = from_dict({"loss": {"crd_weight": 5.0}, "tune": {"space": SPACE, "num_samples": 4}})
    base = resumed_base(today, folder, to_dict(today))
    assert base["loss"]["crd_weight"] == 2.0
    assert "loss" in capsys.readouterr().out  # says which sections it did not take from today's config

    same = from_dict({"loss": {"crd_weight": 2.0}, "tune": {"space": SPACE, "num_samples": 4}})
    assert resumed_base(same, folder, to_dict(same)) == to_dict(same)
    assert "differ" not in capsys.readouterr().out


def test_resume_refuses_a_changed_space_or_sample_count(tmp_path: Path) -> None:
    folder = _sweep_folder(tmp_path)
    wider = from_dict({"tune": {"space": {"loss.fd_weight": {"loguniform": [100, 20000]}}, "num_samples": 4}})
    with pytest.raises(ConfigError, match=r"^tune\.space: "):
        resumed_base(wider, folder, to_dict(wider))
    more = from_dict({"tune": {"space": SPACE, "num_samples": 8}})
    with pytest.raises(ConfigError, match=r"^tune\.num_samples: got 8"):
        resumed_base(more, folder, to_dict(more))


def test_resume_without_a_sweep_record_keeps_todays_config(tmp_path: Path) -> None:
    today = from_dict({"loss": {"crd_weight": 5.0}})
    assert resumed_base(today, str(tmp_path), to_dict(today)) == to_dict(today)
