"""``siclip report``: the PNGs exist, open as images with content (not one colour), the pages reference them,
several runs are overlaid, and an ablation's bars are the mean and std over seeds."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from siclip.cli import main
from siclip.report import GROUPS, ablation_groups, write_report
from siclip.train.metrics_table import read_metrics


def _run(root: Path, name: str, *, scale: float = 1.0, steps: int = 30) -> Path:
    run = root / name
    run.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        row = {
            "step": step,
            "loss/total": scale * 5 / step,
            "loss/clip": scale * 3 / step,
            "loss/fd": scale * 2 / step,
            "optim/lr": 1e-3 * min(1.0, step / 10),
            "temp/clip": 0.07 + 0.001 * step,
            "perf/samples_per_s": 100.0,
        }
        if step in (1, 16):  # the trainer logs the weights when they change (loss.schedule: PM on at 16)
            row |= {
                "loss/weight/clip": 1.0,
                "loss/weight/fd": 4000.0,
                "loss/weight/pm": 0.0 if step == 1 else 0.1,
            }
        if step % 10 == 0:
            row |= {"grad_share/clip": 0.2, "grad_share/fd": 0.8}
            rows.append(row)
            rows.append({"step": step, "val/zeroshot_top1": scale * step / 100, "val/i2t_r@1": step / 200})
            continue
        rows.append(row)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _check_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        img.load()
        assert img.width > 100 and img.height > 100
        lo_hi = img.convert("L").getextrema()
        assert lo_hi[0] != lo_hi[1], f"{path} is one colour"


def _linked_images(page: Path) -> list[Path]:
    return [page.parent / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text())]


def test_one_run_page_and_plots(tmp_path) -> None:
    run = _run(tmp_path, "student")
    page = write_report([run])
    assert page == run / "report" / "report.md"
    images = _linked_images(page)
    assert sorted(p.name for p in images) == sorted(f"{g}.png" for g in GROUPS)
    for p in images:
        _check_png(p)
    text = page.read_text()
    assert "| val/zeroshot_top1 | 0.3000 |" in text  # the final evaluation, read from the last val row


def test_several_runs_overlaid_and_cli(tmp_path, capsys) -> None:
    a, b = _run(tmp_path, "web"), _run(tmp_path, "synthetic", scale=0.5)
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    index = Path(capsys.readouterr().out.strip().rsplit(" ", 1)[-1])
    assert index == tmp_path / "cmp" / "index.md"
    images = _linked_images(index)
    assert {p.name for p in images} == {f"overlay_{g}.png" for g in GROUPS}
    for p in images:
        _check_png(p)
    assert (a / "report" / "report.md").is_file() and (b / "report" / "report.md").is_file()
    assert "web/report/report.md" in index.read_text()


def test_loss_weights_have_their_own_panel(tmp_path) -> None:
    """Weights (0 when a term is off, 4000 for FD) are not drawn with the loss terms; zeros keep a log-like axis."""
    page = write_report([_run(tmp_path, "student")])
    captions = dict(re.findall(r"!\[([^\]]*)\]\([^)]+\)\s*\n\s*\*([^*]+)\*", page.read_text()))
    assert "loss/weight" not in captions["losses"] and "loss/fd" in captions["losses"]
    assert "log scale" in captions["losses"]
    weights = captions["loss_weights"]
    assert all(f"loss/weight/{t}" in weights for t in ("clip", "fd", "pm")) and "loss/fd," not in weights
    assert "symlog scale" in weights  # the zero weight is drawn, the others on a log axis
    for image in _linked_images(page):
        _check_png(image)


def test_missing_run_is_a_one_line_error(tmp_path, capsys) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_ablation_bars_are_mean_and_std_over_seeds(tmp_path) -> None:
    runs = [
        _run(tmp_path, "ablate-wi-s0", scale=1.0),
        _run(tmp_path, "ablate-wi-s1", scale=0.5),
        _run(tmp_path, "ablate-baseline-s0", scale=0.2),
        _run(tmp_path, "teacher"),  # not an ablation run: no bar
    ]
    groups = ablation_groups({r.name: read_metrics(r) for r in runs})
    assert set(groups) == {"wi", "baseline"}
    wi = [s["val/zeroshot_top1"] for s in groups["wi"]]
    assert wi == pytest.approx([0.3, 0.15])
    mean, std = sum(wi) / 2, math.sqrt(sum((x - sum(wi) / 2) ** 2 for x in wi) / 2)
    assert (mean, std) == pytest.approx((0.225, 0.075))
    index = write_report(runs, out=tmp_path / "ablation")
    chart = tmp_path / "ablation" / "ablation.png"
    assert chart in _linked_images(index)
    _check_png(chart)
