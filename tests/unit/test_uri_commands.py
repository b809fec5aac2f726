"""Commands that take a run folder, a checkpoint or a config accept an ``s3://`` URI (a local moto server) and
keep their outputs there: ``siclip report``, ``siclip eval --suite`` and ``siclip train --config``. No Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from siclip import storage
from siclip.cli import main
from siclip.config import SiclipCfg, load_config, save_config
from tests.s3_server import BUCKET, s3_env  # noqa: F401  (the fixture)


@pytest.fixture
def root(s3_env: dict[str, str], tmp_path: Path) -> str:  # noqa: F811
    return f"s3://{BUCKET}/{tmp_path.name}"


def _metrics_run(location: str, steps: int = 12) -> None:
    rows = [
        {"step": s, "loss/total": 4.0 / s, "optim/lr": 1e-3, "val/zeroshot_top1": s / 100}
        for s in range(1, steps)
    ]
    storage.write_text(storage.join(location, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))


def _s3_fs():  # type: ignore[no-untyped-def]
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _s3_listing(location: str) -> list[str]:
    return sorted(p.rsplit("/", 1)[-1] for p in _s3_fs().find(location.removeprefix("s3://")))


def test_report_of_an_s3_run_is_written_beside_it(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = storage.join(root, "runs", "student")
    _metrics_run(run)
    assert main(["report", run]) == 0
    page = capsys.readouterr().out.strip().rsplit(" ", 1)[-1]
    assert page == storage.join(run, "report", "report.md")
    text = storage.read_text(page)
    assert "| val/zeroshot_top1 | 0.1100 |" in text  # the last val row, read from S3
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images and set(images) <= set(_s3_listing(storage.join(run, "report")))
    assert not Path("s3:").exists()  # nothing written to a local folder named after the URI


def test_report_of_s3_runs_into_a_local_folder(
    root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = storage.join(root, "runs", "web"), storage.join(root, "runs", "syn")
    _metrics_run(a)
    _metrics_run(b, steps=6)
    out = tmp_path / "cmp"
    assert main(["report", a, b, "--out", str(out)]) == 0
    index = Path(capsys.readouterr().out.strip().rsplit(" ", 1)[-1])
    assert index == out / "index.md"
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", index.read_text()):
        assert (out / image).stat().st_size > 0
    assert (out / "web" / "report.md").is_file() and (out / "syn" / "report.md").is_file()
    assert _s3_listing(a) == ["metrics.jsonl"]  # the store is only read


def test_report_of_a_missing_s3_run_is_a_one_line_error(
    root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", storage.join(root, "runs", "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such run folder" in err and "nope" in err and len(err.strip().splitlines()) == 1


def test_eval_suite_writes_its_table_beside_an_s3_checkpoint(
    root: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from safetensors.torch import save_model

    from siclip.models.presets import build_preset

    torch.manual_seed(0)
    save_model(build_preset("tiny-teacher"), str(tmp_path / "model.safetensors"))
    final = storage.join(root, "runs", "r1", "final")
    storage.upload(tmp_path / "model.safetensors", storage.join(final, "model.safetensors"))
    cfg = tmp_path / "cfg.yaml"
    roots = {
        n: str(tmp_path / "absent") for n in ("imagenet1k", "imagenetv2", "imagenet_r", "imagenet_sketch")
    }
    roots |= {"mscoco": str(tmp_path / "absent"), "flickr30k": str(tmp_path / "absent")}
    cfg.write_text(
        yaml.safe_dump(
            {"model": {"name": "tiny-teacher", "sasp": {"replace": "none"}}, "eval": {"roots": roots}}
        )
    )
    for checkpoint in (final, storage.join(final, "model.safetensors")):  # a folder, then the file in it
        assert (
            main(
                ["eval", "--config", str(cfg), "--checkpoint", checkpoint, "--suite", "paper", "--name", "r1"]
            )
            == 0
        )
        assert json.loads(capsys.readouterr().out)["checkpoint"] == checkpoint  # stdout: one JSON object
        table = json.loads(storage.read_text(storage.join(final, "paper_table.json")))
        assert table["rows"][0]["model"] == "r1" and set(table["absent"]) == set(roots)
        assert "MobileCLIP-S0" in storage.read_text(storage.join(final, "paper_table.md"))
        assert _s3_listing(final) == ["model.safetensors", "paper_table.json", "paper_table.md"]
        _s3_fs().rm([f"{final.removeprefix('s3://')}/paper_table.{ext}" for ext in ("json", "md")])
    assert not Path("s3:").exists()


def test_train_reads_its_config_from_s3(
    root: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import siclip.train.launch as launch_module

    saved = load_config(None, ["train.max_steps=7", "loss.pm_weight=0.3", "train.run_name=from-s3"])
    uri = storage.join(root, "sweep", "best_config.yaml")
    save_config(saved, uri)
    assert load_config(uri) == saved

    launched: list[SiclipCfg] = []

    def fake_launch(cfg: SiclipCfg) -> None:
        launched.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(launch_module, "launch", fake_launch)
    with pytest.raises(SystemExit):
        main(["train", "--config", uri, "train.max_steps=9"])
    assert len(launched) == 1
    got = launched[0]
    assert (got.train.max_steps, got.loss.pm_weight, got.train.run_name) == (9, 0.3, "from-s3")

    assert main(["train", "--config", storage.join(root, "sweep", "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "missing.yaml" in err and "no such file" in err
