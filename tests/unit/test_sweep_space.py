"""Search-space parsing, space files and result tables of siclip.sweep (no Ray session needed)."""

from __future__ import annotations

import csv
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from siclip.config import ConfigError, SiclipCfg, from_dict, load_config, to_dict
from siclip.sweep import (
    SweepResult,
    TrialRow,
    format_table,
    load_space,
    parse_space,
    resolve_tune,
    trial_config,
)
from siclip.sweep.results import write_tables
from siclip.sweep.run import fit_resources

REPO = Path(__file__).resolve().parents[2]


def _samples(domain: object, n: int = 4000) -> np.ndarray:
    np.random.seed(0)
    return np.array(domain.sample(size=n), dtype=float)  # type: ignore[attr-defined]


def test_loguniform_is_uniform_in_log_space() -> None:
    space = parse_space({"loss.fd_weight": {"loguniform": [500, 20000]}})
    x = _samples(space["loss.fd_weight"])
    assert x.min() >= 500 and x.max() <= 20000
    # The median of a log-uniform variable is the geometric mean of its bounds (uniform's is the mean).
    assert abs(np.median(x) - math.sqrt(500 * 20000)) / math.sqrt(500 * 20000) < 0.1
    frac_low_decade = np.mean(x < 5000)  # log(10)/log(40) of the mass lies in [500, 5000]
    assert abs(frac_low_decade - math.log(10) / math.log(40)) < 0.03


def test_uniform_bounds_and_mean() -> None:
    x = _samples(parse_space({"loss.icl_temperature": {"uniform": [0.02, 0.2]}})["loss.icl_temperature"])
    assert x.min() >= 0.02 and x.max() <= 0.2
    assert abs(x.mean() - 0.11) < 0.005


def test_randint_includes_both_ends() -> None:
    x = _samples(
        parse_space({"loss.pm_negatives_per_anchor": {"randint": [1, 3]}})["loss.pm_negatives_per_anchor"]
    )
    assert set(x.astype(int).tolist()) == {1, 2, 3}


def test_choice_and_grid() -> None:
    space = parse_space(
        {
            "loss.pm_fusion": {"choice": ["prod_absdiff", "concat"]},
            "loss.crd_weight": {"grid": [0.5, 1.0, 2.0]},
        }
    )
    assert set(_samples_obj(space["loss.pm_fusion"])) == {"prod_absdiff", "concat"}
    assert space["loss.crd_weight"] == {"grid_search": [0.5, 1.0, 2.0]}


def _samples_obj(domain: object) -> list[object]:
    np.random.seed(0)
    return list(domain.sample(size=200))  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("key", "spec", "needle"),
    [
        ("loss.fd_wieght", {"loguniform": [500, 20000]}, "unknown key"),
        ("loss", {"uniform": [0, 1]}, "loss"),
        ("loss.fd_weight", {"loguniform": [0, 10]}, "bounds > 0"),
        ("loss.fd_weight", {"loguniform": [-5, 10]}, "bounds > 0"),
        ("loss.fd_weight", {"uniform": [10, 1]}, "low < high"),
        ("loss.fd_weight", {"uniform": [3, 3]}, "low < high"),
        ("loss.fd_weight", {"uniform": [1]}, "[low, high]"),
        ("loss.fd_weight", {"uniform": ["a", "b"]}, "two finite numbers"),
        ("loss.fd_weight", {"normal": [0, 1]}, "unknown distribution 'normal'"),
        ("loss.fd_weight", {"uniform": [0, 1], "choice": [1]}, "one of"),
        ("loss.fd_weight", 3.0, "one of"),
        ("loss.pm_fusion", {"choice": []}, "non-empty list"),
        ("loss.pm_fusion", {"grid": []}, "non-empty list"),
        ("loss.pm_fusion", {"choice": ["prod", "sum"]}, "'sum'"),
        ("loss.icl_temperature", {"uniform": [0.0, 0.5]}, "> 0.0"),
        ("loss.fd_weight", {"uniform": [-1.0, 1.0]}, ">= 0.0"),
        ("train.max_steps", {"uniform": [10, 20]}, "integer"),
        ("train.max_steps", {"randint": [10.5, 20]}, "two integers"),
        ("tune.num_samples", {"randint": [1, 4]}, "cannot be searched"),
        ("train.run_name", {"choice": ["a", "b"]}, "cannot be searched"),
    ],
)
def test_bad_space_names_its_key(key: str, spec: object, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_space({key: spec})
    message = str(err.value)
    assert message.startswith(f"tune.space.{key}:"), message
    assert needle in message
    assert "\n" not in message


def test_empty_space_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"^tune\.space:"):
        parse_space({})


def test_key_is_checked_against_the_base_config() -> None:
    # Sampled values are applied to the real base config, so each must pass that field's schema check.
    base = to_dict(from_dict({"train": {"max_steps": 10}}))
    assert parse_space({"train.max_steps": {"randint": [5, 50]}}, base=base)
    with pytest.raises(ConfigError, match=r"^tune\.space\.model\.sasp\.share:"):
        parse_space({"model.sasp.share": {"choice": ["qk", "heads"]}}, base=base)


@pytest.mark.parametrize(
    ("space", "keys"),
    [
        # 3 workers would split a global batch of 8 into 2 per rank (6 in all)
        ({"train.num_workers": {"choice": [1, 3]}}, ["train.num_workers=3"]),
        ({"train.num_workers": {"randint": [1, 4]}}, ["train.num_workers=3"]),  # 3 lies between the ends
        (
            {"loss.local": {"choice": [False, True]}, "loss.gather": {"grid": [True, False]}},
            ["loss.gather=false", "loss.local=true"],
        ),
        (
            {
                "train.num_workers": {"grid": [2, 4]},
                "data.batch_size": {"choice": [8, 6]},
                "optim.lr": {"loguniform": [1e-4, 1e-2]},
            },
            ["data.batch_size=6", "train.num_workers=4"],
        ),
        (
            # a key with one value is still needed: the base config's worker count would make it valid
            {
                "train.num_workers": {"choice": [3]},
                "data.batch_size": {"choice": [8, 9]},
                "optim.lr": {"loguniform": [1e-4, 1e-2]},
            },
            ["train.num_workers=3", "data.batch_size=8"],
        ),
    ],
)
def test_an_invalid_combination_fails_before_any_trial(space: dict, keys: list[str]) -> None:
    base = to_dict(from_dict({"data": {"batch_size": 8}}))
    with pytest.raises(ConfigError) as err:
        parse_space(space, base=base)
    message = str(err.value)
    assert message.startswith("tune.space.") and "\n" not in message, message
    for key in keys:
        assert key in message, message
    assert "optim.lr" not in message, message  # only the keys the failure needs


def test_combinations_are_judged_together_not_against_the_base_value() -> None:
    # 4 workers alone would not divide the base batch of 6, but every sampled batch here is a multiple of 4
    base = to_dict(from_dict({"data": {"batch_size": 6}}))
    assert parse_space(
        {"train.num_workers": {"grid": [2, 4]}, "data.batch_size": {"grid": [8, 16]}}, base=base
    )
    assert parse_space(
        {"caption.min_actors": {"choice": [2, 3]}, "caption.num_actors": {"choice": [3, 4]}}, base=base
    )


def test_the_sweep_refuses_an_invalid_combination_before_ray_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import siclip.ray_session
    from siclip.cli import main

    def no_ray(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray started although the search space is invalid")

    monkeypatch.setattr(siclip.ray_session, "init_ray", no_ray)
    shard = tmp_path / "s-000000.tar"
    shard.write_bytes(b"")
    args = [
        f"data.train_shards=[{shard}]",
        "data.batch_size=8",
        f"train.runs_dir={tmp_path / 'runs'}",
        "train.max_steps=4",
        "tune.metric=loss/total",
        "tune.mode=min",
        "tune.space={train.num_workers: {choice: [1, 3]}}",
    ]
    config = tmp_path / "base.yaml"
    config.write_text("train: {progress: false}\n")
    assert main(["tune", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tune.space.train.num_workers" in err and "3" in err, err
    assert not (tmp_path / "runs").exists()


def test_space_file_merges_under_config_space(tmp_path: Path) -> None:
    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        yaml.safe_dump(
            {
                "tune": {
                    "space": {
                        "loss.fd_weight": {"loguniform": [500, 20000]},
                        "loss.crd_weight": {"uniform": [0.1, 2.0]},
                    },
                    "num_samples": 12,
                    "scheduler": "median",
                }
            }
        )
    )
    cfg = from_dict(
        {
            "tune": {
                "space_file": str(space_file),
                "space": {"loss.crd_weight": {"choice": [1.0, 2.0]}},
                "scheduler": "fifo",
            }
        }
    )
    space = load_space(cfg)
    assert space == {
        "loss.fd_weight": {"loguniform": [500, 20000]},
        "loss.crd_weight": {"choice": [1.0, 2.0]},
    }
    resolved = resolve_tune(cfg)
    assert resolved.tune.space == space
    assert resolved.tune.num_samples == 12  # from the file: the config left the default
    assert resolved.tune.scheduler == "fifo"  # the config's own value wins
    assert resolved.tune.space_file == ""


def test_bare_space_file_and_bad_space_files(tmp_path: Path) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text("space:\n  loss.pm_weight: {loguniform: [0.01, 1.0]}\n")
    assert load_space(from_dict({"tune": {"space_file": str(bare)}})) == {
        "loss.pm_weight": {"loguniform": [0.01, 1.0]}
    }
    extra = tmp_path / "extra.yaml"
    extra.write_text("tune: {space: {}}\nloss: {fd_weight: 1.0}\n")
    with pytest.raises(ConfigError, match=r"^tune\.space_file: .*'loss'"):
        load_space(from_dict({"tune": {"space_file": str(extra)}}))
    typo = tmp_path / "typo.yaml"
    typo.write_text("tune: {num_sample: 3}\n")
    with pytest.raises(ConfigError, match=r"tune\.num_sample"):
        load_space(from_dict({"tune": {"space_file": str(typo)}}))


def test_default_sweep_recipe_parses() -> None:
    path = REPO / "tune" / "lambdas_tau.yaml"
    cfg = load_config(path, check_files=False)
    resolved = resolve_tune(cfg)
    space = parse_space(resolved.tune.space, base=to_dict(resolved))
    for key in (
        "loss.fd_weight",
        "loss.crd_weight",
        "loss.icl_weight",
        "loss.pm_weight",
        "loss.icl_temperature",
        "loss.crd_student_temperature",
        "loss.crd_teacher_temperature",
    ):
        assert key in space
    assert resolved.tune.scheduler == "asha" and resolved.tune.metric == "val/zeroshot_top1"
    fd = _samples(space["loss.fd_weight"], 500)
    assert fd.min() >= 500 and fd.max() <= 20000
    # As a space file under another config (the documented use), it gives the same space.
    other = from_dict({"tune": {"space_file": str(path)}})
    assert load_space(other) == resolved.tune.space


def test_trial_config_applies_sampled_values() -> None:
    base = to_dict(from_dict({"loss": {"fd_weight": 4000.0}}))
    cfg = trial_config(
        base,
        {"loss.fd_weight": 1234.5, "loss.pm_fusion": "concat", "optim.lr": 1e-05},
        run_name="exp-abc_00001",
    )
    assert cfg.loss.fd_weight == 1234.5
    assert cfg.loss.pm_fusion == "concat"
    assert cfg.optim.lr == 1e-05  # survives YAML 1.1 reading "1e-05" as a string
    assert cfg.train.run_name == "exp-abc_00001"
    assert cfg.loss.crd_weight == 1.0


def _result(tmp_path: Path) -> SweepResult:
    rows = (
        TrialRow("t_00001", {"loss.fd_weight": 800.0}, 0.61, "TERMINATED", 4, 40, "exp-t_00001"),
        TrialRow("t_00000", {"loss.fd_weight": 4000.0}, 0.55, "TERMINATED", 4, 40, "exp-t_00000"),
        TrialRow("t_00002", {"loss.fd_weight": 19000.0}, 0.2, "STOPPED", 1, 10, "exp-t_00002"),
    )
    return SweepResult(
        experiment_dir=tmp_path,
        metric="val/zeroshot_top1",
        mode="max",
        rows=rows,
        best=rows[0],
        best_config=tmp_path / "best_config.yaml",
        param_keys=("loss.fd_weight",),
    )


def test_tables_are_written_and_parse(tmp_path: Path) -> None:
    result = _result(tmp_path)
    write_tables(result)
    with open(tmp_path / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial_id"] for r in rows] == ["t_00001", "t_00000", "t_00002"]
    assert float(rows[0]["loss.fd_weight"]) == 800.0
    assert rows[2]["status"] == "STOPPED" and rows[2]["reports"] == "1"
    md = (tmp_path / "trials.md").read_text()
    assert md == format_table(result) + "\n"
    header, rule, first = md.splitlines()[:3]
    assert header.split("|")[1:-1] == [
        " trial_id ",
        " loss.fd_weight ",
        " val/zeroshot_top1 ",
        " status ",
        " reports ",
        " step ",
    ]
    assert rule.count("---") == 6
    assert "t_00001" in first and "0.61" in first
    assert "best: trial t_00001" in md
    assert result.table == format_table(result)


def test_driver_sliver_is_taken_from_the_workers_or_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr("siclip.ray_compat.max_cluster_resources", dict)  # no autoscaler
    demo = from_dict({"train": {"cpus_per_worker": 2.0}, "tune": {"cpus_per_trial": 0.01}})
    assert fit_resources(demo).train.cpus_per_worker == pytest.approx(1.99)
    fits = from_dict({"train": {"cpus_per_worker": 0.99}, "tune": {"cpus_per_trial": 0.01}})
    assert fit_resources(fits) == fits
    greedy = from_dict({"train": {"cpus_per_worker": 2.0}, "tune": {"cpus_per_trial": 1.0}})
    with pytest.raises(ConfigError, match=r"^tune\.cpus_per_trial: got 1; .*cluster has 2") as err:
        fit_resources(greedy)
    assert "none fits" in str(err.value)  # the workers alone take every CPU
    # the workers leave half a CPU: the error says how much the driver may have
    half = from_dict({"train": {"cpus_per_worker": 1.5}, "tune": {"cpus_per_trial": 1.0}})
    with pytest.raises(ConfigError, match=r"^tune\.cpus_per_trial: got 1; ") as err:
        fit_resources(half)
    assert "allowed: <= 0.5" in str(err.value) and "none fits" not in str(err.value)


def test_the_driver_sliver_taken_from_several_workers_leaves_a_trial_that_fits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 0.01 / 3 workers does not round evenly: each worker gives up a little more, never less
    cfg = _sweep_on(
        monkeypatch,
        {"CPU": 3.0},
        {},
        train={"num_workers": 3, "cpus_per_worker": 1.0},
        data={"batch_size": 3},
        tune={"cpus_per_trial": 0.01, "max_concurrent_trials": 1},
    )
    assert 0.99 < cfg.train.cpus_per_worker < 1.0
    assert 3 * cfg.train.cpus_per_worker + cfg.tune.cpus_per_trial <= 3.0
    assert cfg.tune.max_concurrent_trials == 1


def _sweep_on(monkeypatch: pytest.MonkeyPatch, now: dict, most: dict, **sections: dict) -> SiclipCfg:
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(now))
    monkeypatch.setattr("siclip.ray_compat.max_cluster_resources", lambda: dict(most))
    return fit_resources(from_dict(sections))


def test_concurrent_trials_are_capped_at_what_the_cluster_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    # 2 CPUs, two trials of 0.01 + 1.5 CPUs each: only one fits at a time
    two_cpus = {"CPU": 2.0}
    tune = {"max_concurrent_trials": 2, "cpus_per_trial": 0.01}
    cfg = _sweep_on(monkeypatch, two_cpus, {}, train={"cpus_per_worker": 1.5}, tune=tune)
    assert cfg.tune.max_concurrent_trials == 1
    cfg = _sweep_on(monkeypatch, two_cpus, {}, train={"cpus_per_worker": 0.99}, tune=tune)
    assert cfg.tune.max_concurrent_trials == 2  # 2 x 1.0 fits
    # 8 concurrent trials of 1 GPU worker on a cluster whose autoscaler allows 4 GPUs: 4 at a time
    gpu = {"use_gpu": "yes", "cpus_per_worker": 1.0}
    eight = {"max_concurrent_trials": 8, "cpus_per_trial": 0.01}
    cfg = _sweep_on(monkeypatch, {"CPU": 8.0}, {"CPU": 64.0, "GPU": 4.0}, train=gpu, tune=eight)
    assert cfg.tune.max_concurrent_trials == 4
    # two workers per trial: 2 trials
    cfg = _sweep_on(monkeypatch, {"CPU": 64.0, "GPU": 4.0}, {}, train={**gpu, "num_workers": 2}, tune=eight)
    assert cfg.tune.max_concurrent_trials == 2
    # GPUs the cluster does not have yet and no known autoscaler limit: nothing to cap against
    cfg = _sweep_on(monkeypatch, {"CPU": 8.0}, {}, train=gpu, tune=eight)
    assert cfg.tune.max_concurrent_trials == 8


def test_a_driver_gpu_that_starves_the_workers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = {"use_gpu": "yes"}
    with pytest.raises(ConfigError, match=r"^tune\.gpus_per_trial: got 1; .*holds 1; allowed: 0") as err:
        _sweep_on(monkeypatch, {"CPU": 8.0, "GPU": 1.0}, {}, train=gpu, tune={"gpus_per_trial": 1.0})
    assert "\n" not in str(err.value)
    cfg = _sweep_on(monkeypatch, {"CPU": 8.0, "GPU": 2.0}, {}, train=gpu, tune={"gpus_per_trial": 1.0})
    assert cfg.tune.max_concurrent_trials == 1


def test_an_errored_trial_is_named_and_the_command_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import siclip.sweep
    from siclip.cli import main

    ok = _result(tmp_path)
    bad = TrialRow(
        "t_00003", {"loss.fd_weight": 900.0}, None, "ERROR", 0, 0, "exp-t_00003", "ValueError: boom"
    )
    failed = replace(ok, rows=(*ok.rows, bad))
    assert failed.errored == (bad,) and ok.errored == ()
    table = format_table(failed)
    assert "| t_00003 |" in table and "ERROR" in table
    assert any("t_00003" in line and "ValueError: boom" in line for line in table.splitlines()[-3:])

    config = tmp_path / "base.yaml"
    config.write_text("train: {progress: false}\n")
    for result, code in ((ok, 0), (failed, 1)):
        monkeypatch.setattr(siclip.sweep, "run_sweep", lambda cfg, resume=False, result=result: result)
        assert main(["tune", "--config", str(config)]) == code
        out, err = capsys.readouterr()
        assert "| t_00001 |" in out
        assert ("t_00003" in err) == (code == 1), err
