"""Profiles cannot lose silently: every run states each profile switch, its value and where the value came from,
and no shipped config overrides a switch of the profile it runs under without a comment saying why."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from siclip.config import PROFILES, SiclipCfg, from_dict, resolve_switches, switch_report, to_dict

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _schema_default(dotted: str) -> Any:
    node: Any = SiclipCfg()
    return _get(node, dotted)


def _line_setting(text: str, dotted: str) -> str | None:
    """The config line that sets the switch's leaf key (block or flow style), or None."""
    leaf = dotted.rsplit(".", 1)[1]
    for line in text.splitlines():
        code = line.split("#", 1)[0]
        if re.search(rf"(^|[\s{{,]){re.escape(leaf)}\s*:", code):
            return line
    return None


def test_both_profiles_set_the_same_switches_and_siclip_keeps_the_schema_defaults() -> None:
    assert set(PROFILES["siclip"]) == set(PROFILES["paper"])
    for key, value in PROFILES["siclip"].items():
        assert _schema_default(key) == value, f"{key}: the siclip profile must be today's default"


@pytest.mark.parametrize("profile", ["siclip", "paper"])
@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_get_their_profiles_switches(path: Path, profile: str) -> None:
    assert SHIPPED, "no shipped configs found"
    text = path.read_text()
    report = resolve_switches(path, [f"profile={profile}"])
    assert report.profile == profile and report.profile_source == "command line"
    assert {s.key for s in report.switches} == set(PROFILES[profile])
    cfg = from_dict({**yaml.safe_load(text), "profile": profile})
    for s in report.switches:
        assert _get(cfg, s.key) == s.value, s.key  # the report shows what the run will use
        if s.value == PROFILES[profile][s.key]:
            continue
        line = _line_setting(text, s.key)
        assert line is not None and "#" in line, (
            f"{path.name} sets {s.key}={s.value!r} against profile {profile}'s "
            f"{PROFILES[profile][s.key]!r} without a comment saying why"
        )


def test_the_report_says_where_each_switch_came_from_and_flags_overrides() -> None:
    data = {"profile": "paper", "model": {"sasp": {"share": "qk", "qk_init": "zero"}}}
    report = switch_report(data, ["optim.grad_clip=2.0"], config_file="x.yaml")
    by_key = {s.key: s for s in report.switches}
    assert report.profile == "paper" and report.profile_source == "config file"
    assert by_key["model.sasp.share"].source == "config file"
    assert by_key["model.sasp.share"].overrides_profile  # qk, where the paper profile says mixer
    assert by_key["model.sasp.qk_init"].source == "config file"
    assert not by_key["model.sasp.qk_init"].overrides_profile  # given, but the profile's own value
    assert by_key["optim.grad_clip"].source == "command line" and by_key["optim.grad_clip"].value == 2.0
    assert by_key["model.sasp.layer_scale"].source == "profile"
    assert [s.key for s in report.overridden] == ["model.sasp.share", "optim.grad_clip"]
    text = "\n".join(report.lines())
    share_line = next(line for line in text.splitlines() if "model.sasp.share" in line)
    assert "x.yaml" in share_line and "override" in share_line.lower() and "mixer" in share_line
    table = report.markdown()
    assert all(f"`{k}`" in table for k in PROFILES["paper"]) and "overrides" in table.lower()
    # the profile from the command line beats the file's; a switch the command line gives beats both
    cli = switch_report(data, ["profile=siclip", "model.sasp.share=mixer"])
    assert cli.profile == "siclip" and cli.profile_source == "command line"
    assert {s.key: s.source for s in cli.switches}["model.sasp.share"] == "command line"


def test_ablation_rows_keep_the_switches_they_report() -> None:
    from siclip.ablate import ROWS, row_config

    base = from_dict({"profile": "paper"})
    for row in ROWS:
        cfg = row_config(base, row, seed=1, steps=5)
        assert {k: _get(cfg, k) for k in PROFILES["paper"]} == PROFILES["paper"], row


def test_ablation_table_header_lists_the_switches() -> None:
    from siclip.ablate import format_table

    report = switch_report({"profile": "paper"}, ["model.sasp.share=qk"])
    metric = {"mean": 0.5, "std": 0.0}
    result = {
        "seeds": 1,
        "steps": 5,
        "rows": {"WI": {"zeroshot_top1": metric, "i2t_r@1": metric, "t2i_r@1": metric}},
        "switches": report.markdown(),
    }
    header = format_table(result).split("| row |")[0]
    assert all(k in header for k in PROFILES["paper"])
    share = next(line for line in header.splitlines() if "model.sasp.share" in line)
    assert "command line" in share and "overrides" in share.lower()


def test_siclip_train_prints_the_switches_before_it_launches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import siclip.train.launch as launch_mod
    from siclip.cli import main

    seen: dict[str, Any] = {}

    def fake_launch(cfg: SiclipCfg) -> Any:
        seen["out"] = capsys.readouterr().out  # what was printed before training started
        seen["cfg"] = cfg
        return SimpleNamespace(max_steps=1, location=str(tmp_path), metrics={})

    monkeypatch.setattr(launch_mod, "launch", fake_launch)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"profile": "paper", "model": {"sasp": {"qk_init": "inherit"}}}))
    assert main(["train", "--config", str(config), "model.sasp.share=qk", "train.max_steps=1"]) == 0
    out = seen["out"]
    for key, value in PROFILES["paper"].items():
        line = next(line for line in out.splitlines() if key in line)
        want = {"model.sasp.qk_init": "inherit", "model.sasp.share": "qk"}.get(key, value)
        assert repr(want) in line, line
        assert _get(seen["cfg"], key) == want
    assert "command line" in next(line for line in out.splitlines() if "model.sasp.share" in line)
    assert str(config) in next(line for line in out.splitlines() if "model.sasp.qk_init" in line)
    assert "paper" in out.splitlines()[0]


def test_to_dict_round_trip_keeps_switches() -> None:
    # the ablation and the sweep rebuild configs from to_dict: the profile must not re-apply over them
    cfg = from_dict({"profile": "paper", "model": {"sasp": {"share": "qk"}}})
    again = from_dict(to_dict(cfg))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_every_switch_is_documented_in_the_recipe() -> None:
    recipe = (REPO / "docs" / "RECIPE.md").read_text()
    missing = [k for k in PROFILES["paper"] if f"`{k}`" not in recipe]
    assert not missing, f"docs/RECIPE.md has no row for {missing}"


def test_siclip_tune_marks_searched_switches_and_heads_its_table_with_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import siclip.sweep as sweep
    from siclip.cli import main

    def fake_sweep(cfg: SiclipCfg, *, resume: bool = False) -> Any:
        return sweep.SweepResult(
            experiment_dir=str(tmp_path),
            metric="val/zeroshot_top1",
            mode="max",
            rows=(),
            best=None,
            best_config=None,
        )

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({"profile": "paper", "tune": {"space": {"optim.grad_clip": {"choice": [0.0, 1.0]}}}})
    )
    assert main(["tune", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    start, table = out.split("| trial_id", 1)[0], out.split("Profile `paper`", 1)[1]
    assert "tune.space" in next(line for line in start.splitlines() if "optim.grad_clip" in line)
    assert "model.sasp.share" in table and "tune.space" in table


def test_siclip_ablate_prints_the_switches_before_the_first_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import siclip.train.launch as launch_mod
    from siclip.ablate import run_ablation

    class Stop(Exception):
        pass

    def fake_launch(cfg: SiclipCfg) -> Any:
        raise Stop(capsys.readouterr().out)

    monkeypatch.setattr(launch_mod, "launch", fake_launch)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"profile": "paper", "model": {"name": "tiny-student"}}))
    with pytest.raises(Stop) as stopped:
        run_ablation(config=str(config), overrides=["model.sasp.share=qk"], rows=("WI",), out=None)
    printed = str(stopped.value)
    line = next(line for line in printed.splitlines() if "model.sasp.share" in line)
    assert "command line" in line and "override" in line.lower()
    assert all(k in printed for k in PROFILES["paper"])
