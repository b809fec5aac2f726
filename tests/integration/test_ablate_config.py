"""``siclip ablate --config FILE``: the rows train on the data that config names (here a "user's own" set,
the tiny world's clean split), nothing of the demo is prepared, and each run's curve lands next to the table."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_world, write_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_rows_run_on_the_configs_own_data_and_save_curves(ray_session: None, tmp_path: Path) -> None:
    from siclip.ablate import run_ablation

    tiny_world(str(tmp_path))
    own_data = str(tmp_path / "world" / "clean" / "clean-*.tar")
    cfg = write_config(
        tmp_path,
        "demo",
        [
            f"data.train_shards=[{own_data}]",
            "data.batch_size=16",
            "data.loader_workers=0",
            "data.shuffle_buffer=50",
            "model.source=",
            "teacher.source=",
            "train.log_every=2",
            "train.eval_every=4",
            "train.ckpt_every=4",
            "train.grad_share_every=0",
            "train.cpus_per_worker=1",
            "train.progress=false",
            "optim.warmup_steps=1",
        ],
        out="my_subset.yaml",
    )
    table_path = tmp_path / "bench" / "ablation-my_subset.md"
    result, table = run_ablation(
        config=str(cfg),
        rows=("baseline, web captions only",),
        steps=4,
        out_dir=str(tmp_path / "no-demo-here"),
        out=str(table_path),
    )
    assert not (tmp_path / "no-demo-here").exists()  # no demo world, captioner or teacher was prepared

    run = tmp_path / "ablate-baseline-web-captions-only-s0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert [Path(p).name for p in saved["data"]["train_shards"]] == ["clean-*.tar"]
    assert saved["data"]["synthetic"] == "off" and saved["model"]["inherit"] is False
    assert table_path.read_text().startswith(f"# Ablation on `{cfg}` (1 seed(s), 4 student steps each)")
    row = result["rows"]["baseline, web captions only"]
    assert 0.0 <= row["zeroshot_top1"]["mean"] <= 1.0 and "| baseline, web captions only |" in table

    with open(tmp_path / "bench" / "ablation-my_subset-curves" / "baseline-web-captions-only-s0.csv") as f:
        curve = list(csv.DictReader(f))
    # step 1 holds the loss weights as the run starts (``loss/weight/*``); the losses are logged every 2 steps
    assert [int(r["step"]) for r in curve] == [1, 2, 4]
    assert curve[0]["loss/weight/clip"] == "1.0" and curve[0]["loss/total"] == ""
    assert all(float(r["loss/total"]) > 0 for r in curve[1:])
    assert 0.0 <= float(curve[-1]["val/zeroshot_top1"]) <= 1.0
