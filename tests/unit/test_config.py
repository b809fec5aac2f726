"""The config schema: YAML + dotted overrides, and one clear error per bad key, type, range or path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from siclip.config import (
    ConfigError,
    SiclipCfg,
    absolutize,
    apply_overrides,
    expand_shards,
    from_dict,
    load_config,
    replace,
    save_config,
    to_dict,
)


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_follow_the_paper() -> None:
    cfg = SiclipCfg()
    assert (cfg.loss.fd_weight, cfg.loss.crd_weight, cfg.loss.icl_weight, cfg.loss.pm_weight) == (
        4000,
        1,
        1,
        0.1,
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (1e-3, 0.1, 10_000)


def test_yaml_and_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, {"optim": {"lr": 0.01}, "train": {"max_steps": 7}})
    cfg = load_config(
        p, ["optim.lr=3e-4", "loss.pm_weight=0", "model.sasp.share=block", "eval.recall_at=[1,2]"]
    )
    assert cfg.optim.lr == 3e-4
    assert cfg.train.max_steps == 7
    assert cfg.loss.pm_weight == 0.0 and isinstance(cfg.loss.pm_weight, float)
    assert cfg.model.sasp.share == "block"
    assert cfg.eval.recall_at == (1, 2)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optim.lrr=1"], "optim.lrr: unknown key; valid keys here: beta1"),
        (["nosuch.x=1"], "nosuch: unknown key"),
        (["optim.lr=fast"], "optim.lr: got 'fast'; expected a number"),
        (["train.max_steps=1.5"], "train.max_steps: got 1.5; expected an integer"),
        (["optim.lr=-1"], "optim.lr: got -1.0; allowed: > 0.0"),
        (["data.synthetic_p=2"], "data.synthetic_p: got 2.0; allowed: >= 0.0 and <= 1.0"),
        (["model.sasp.share=all"], "model.sasp.share: got 'all'; allowed: 'qk', 'block', 'none'"),
        (["train.progress=maybe"], "train.progress: got 'maybe'; expected true or false"),
        (["optim.lr"], "override must look like key.sub=value"),
        (["optim.lr.x=1"], "optim.lr: is a value"),
        (["data.batch_size=3", "train.num_workers=2"], "data.batch_size: got 3; allowed: a multiple"),
        (["eval.templates=[nothing]"], "eval.templates[0]: got 'nothing'"),
        (["loss.local=true", "loss.gather=false"], "loss.local: got true; allowed: false when loss.gather"),
        (
            ["train.find_unused_parameters=maybe"],
            "train.find_unused_parameters: got 'maybe'; allowed: 'auto'",
        ),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_paths_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.train_shards: got .*no such shard file"):
        load_config(None, [f"data.train_shards=[{tmp_path}/s-{{000..002}}.tar]"])
    with pytest.raises(ConfigError, match=r"eval.zeroshot_dir: got .*no such directory"):
        load_config(None, [f"eval.zeroshot_dir={tmp_path}/nope"])
    with pytest.raises(ConfigError, match=r"model.source: got .*no such checkpoint file"):
        load_config(None, [f"model.source={tmp_path}/w.safetensors"])
    with pytest.raises(ConfigError, match=r"--config: got .*no such file"):
        load_config(tmp_path / "missing.yaml")
    # URIs are not checked locally, and a section filter skips other stages
    load_config(None, ["data.train_shards=[s3://bucket/x-{0..9}.tar]"])
    load_config(None, [f"eval.zeroshot_dir={tmp_path}/nope"], check_files=("data",))


def test_shard_expansion(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"s-{i:03d}.tar").write_bytes(b"")
    assert expand_shards([f"{tmp_path}/s-{{000..002}}.tar"]) == [
        str(tmp_path / f"s-{i:03d}.tar") for i in range(3)
    ]
    assert expand_shards([f"{tmp_path}/s-*.tar"]) == [str(tmp_path / f"s-{i:03d}.tar") for i in range(3)]
    assert expand_shards(["s3://b/x-{0..1}.tar"]) == ["s3://b/x-0.tar", "s3://b/x-1.tar"]
    cfg = load_config(None, [f"data.train_shards=[{tmp_path}/s-{{000..002}}.tar]"])
    assert len(expand_shards(cfg.data.train_shards)) == 3


def test_round_trip_through_yaml_and_dict(tmp_path: Path) -> None:
    cfg = load_config(None, ["loss.fd_weight=123", "tune.space={loss.pm_weight: {uniform: [0, 1]}}"])
    assert from_dict(to_dict(cfg)) == cfg
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    with pytest.raises(ConfigError):
        apply_overrides({}, ["a.b=1"])


def test_absolutize_makes_local_paths_absolute(tmp_path: Path) -> None:
    cfg = absolutize(
        load_config(
            None, ["data.train_shards=[x.tar, s3://b/y.tar]", "eval.zeroshot_dir=zs"], check_files=False
        ),
        tmp_path,
    )
    assert cfg.data.train_shards == (str(tmp_path / "x.tar"), "s3://b/y.tar")
    assert cfg.train.runs_dir == str(tmp_path / "runs")
    assert cfg.eval.zeroshot_dir == str(tmp_path / "zs")  # a folder the run reads


def test_yaml_off_is_the_literal_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, {"data": {"synthetic": False}})).data.synthetic == "off"
    assert load_config(None, ["data.synthetic=off"]).data.synthetic == "off"


def test_paper_recipe_parses() -> None:
    cfg = load_config(Path(__file__).parents[2] / "configs" / "siclip_s0_cc12m.yaml", check_files=False)
    assert cfg.data.batch_size == 1536 and cfg.train.epochs == 32 and cfg.optim.warmup_steps == 10_000
    assert len(expand_shards(cfg.data.train_shards)) == 1243


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"data": {"batch_size": 8}, "train": {"num_workers": 3}}, "data.batch_size: got 8"),
        ({"loss": {"local": True, "gather": False}}, "loss.local: got true"),
        ({"caption": {"min_actors": 3, "num_actors": 2}}, "caption.min_actors: got 3"),
        ({"eval": {"templates": ["no slot"]}}, "eval.templates[0]: got 'no slot'"),
        ({"loss": {"schedule": [{"from_step": 5}, {"from_step": 5}]}}, "loss.schedule[1].from_step"),
    ],
)
def test_rules_between_fields_hold_however_a_config_is_built(data: dict, needle: str) -> None:
    # from_dict is what the Ray boundary, each sweep trial and the demo build with; it checks as load_config does
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_changing_a_config_in_code_is_checked_too() -> None:
    good = from_dict({})
    with pytest.raises(ConfigError, match=r"^data\.batch_size: got 256"):
        replace(good, train=replace(good.train, num_workers=3))
    with pytest.raises(ConfigError, match=r"^loss\.local"):
        replace(good, loss=replace(good.loss, local=True, gather=False))
    assert replace(good, train=replace(good.train, num_workers=4)).train.num_workers == 4
