"""Regenerate the README's report figures (docs/report_losses.png, docs/report_loss_weights.png).

An 80-step run of the paper recipe (configs/siclip_s0_cc12m.yaml) with the tiny presets on a small demo
world, on CPU, PM switched on at step 30 by ``loss.schedule`` (so one weight is 0 for a while), then
``siclip report`` on it. Takes a few minutes on a laptop; starts a local Ray::

    python docs/make_report_figures.py [WORK_DIR]
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent


def main(work: Path) -> None:
    from siclip.cli import main as siclip
    from siclip.data.demo_world import generate_demo_world
    from siclip.models.presets import build_preset
    from siclip.train.checkpoint import save_student

    world = generate_demo_world(
        work / "world",
        image_size=64,
        n_web=400,
        n_clean=120,
        n_retrieval=60,
        n_zeroshot_per_class=2,
        samples_per_shard=150,
    )
    teacher = save_student(build_preset("tiny-teacher"), work / "teacher")
    schedule = [{"from_step": 0, "weights": {"pm": 0.0}}, {"from_step": 30, "weights": {"pm": 0.1}}]
    overrides = [
        "model.name=tiny-student",
        f"model.source={teacher}",
        "teacher.name=tiny-teacher",
        f"teacher.source={teacher}",
        f"data.train_shards={json.dumps(world.web_shards)}",
        "data.batch_size=16",
        "data.loader_workers=0",
        "train.max_steps=80",
        "train.cpus_per_worker=1",
        "train.use_gpu=no",
        "train.log_every=5",
        "train.ckpt_every=80",
        "train.eval_every=0",
        f"train.runs_dir={work / 'runs'}",
        "train.run_name=tiny-student",
        f"loss.schedule={json.dumps(schedule)}",
        "eval.zeroshot_dir=''",
        "eval.classnames_file=''",
        "eval.retrieval_shards=[]",
    ]
    config = str(REPO / "configs" / "siclip_s0_cc12m.yaml")
    if siclip(["train", "--config", config, *overrides]) != 0:
        raise SystemExit("training failed")
    run = work / "runs" / "tiny-student"
    if siclip(["report", str(run)]) != 0:
        raise SystemExit("report failed")
    shutil.copyfile(run / "report" / "losses.png", DOCS / "report_losses.png")
    shutil.copyfile(run / "report" / "loss_weights.png", DOCS / "report_loss_weights.png")
    print(f"wrote {DOCS / 'report_losses.png'} and {DOCS / 'report_loss_weights.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="siclip-figures-")))
