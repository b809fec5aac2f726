"""``ray.env_vars`` values (endpoints, keys) never reach a saved config: a run's config.yaml, the TensorBoard
config text and a sweep's best_config.yaml all go through ``save_config`` / ``config_yaml``. No Ray."""

from __future__ import annotations

from pathlib import Path

import yaml

from siclip.config import config_yaml, load_config, save_config

SECRET = "wJalrXUtnFEMI-not-a-real-key"
ENV = [
    f"ray.env_vars.AWS_SECRET_ACCESS_KEY={SECRET}",
    "ray.env_vars.AWS_ENDPOINT_URL=http://minio.internal:9000",
]


def test_saved_config_holds_no_env_var_values_and_loads_back(tmp_path: Path) -> None:
    cfg = load_config(None, [*ENV, "loss.pm_weight=0.3", "train.run_name=r"])
    assert cfg.ray.env_vars["AWS_SECRET_ACCESS_KEY"] == SECRET  # the run itself still has them
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    text = path.read_text()
    assert SECRET not in text and "minio.internal" not in text
    assert "AWS_SECRET_ACCESS_KEY" in text and "AWS_ENDPOINT_URL" in text  # the names, to pass them again
    back = load_config(path)
    assert back.ray.env_vars == {}
    assert (back.loss.pm_weight, back.train.run_name) == (0.3, "r")  # everything else read back unchanged
    assert load_config(path, ENV) == cfg


def test_tensorboard_text_holds_no_env_var_values() -> None:
    text = config_yaml(load_config(None, ENV))
    assert SECRET not in text and "minio.internal" not in text
    assert yaml.safe_load(text)["ray"]["env_vars"] == {}


def test_a_config_without_env_vars_is_saved_as_before(tmp_path: Path) -> None:
    cfg = load_config(None, ["loss.fd_weight=10"])
    save_config(cfg, tmp_path / "c.yaml")
    assert not (tmp_path / "c.yaml").read_text().startswith("#")
    assert load_config(tmp_path / "c.yaml") == cfg
