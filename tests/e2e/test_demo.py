"""``siclip demo --quick`` end to end on the shared local Ray: every stage runs and the models learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from siclip.cli import main
from siclip.train.metrics_table import last_grad_shares

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/total"] for r in rows if "loss/total" in r]


def test_quick_demo_runs_every_stage(
    tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    # a log every 5 steps: enough points on each loss curve for a trend (the quick demo logs every 20)
    assert main(["demo", "--quick", "--out", str(out), "train.log_every=5"]) == 0
    printed = capsys.readouterr().out
    for stage in range(1, 7):
        assert f"=== {stage}/6" in printed
    # CC12M-SYN shards with a manifest whose counts add up
    manifest = json.loads((out / "world" / "web_syn" / "manifest.json").read_text())
    assert manifest["samples_in"] == manifest["samples_out"] + manifest["samples_skipped"] == 1200
    # both runs learned: over the whole curve, the last quarter's mean loss is clearly below the first's
    # (the teacher from scratch by 10 %, the inheriting student, which starts close, by 3 %)
    for run, margin in (("teacher", 0.10), ("demo-student", 0.03)):
        losses = _losses(out / run)
        quarter = len(losses) // 4
        assert quarter >= 1, (run, losses)
        early, late = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
        assert late < (1 - margin) * early, (run, losses)
    # siclip eval printed one JSON object per model, and the table was written
    evals = [json.loads(line) for line in printed.splitlines() if line.startswith('{"checkpoint"')]
    # 36 zero-shot classes: chance is 1/36; both models must be at least twice as good
    assert len(evals) == 2 and all(e["zeroshot_top1"] > 2 / 36 for e in evals), evals
    table = (out / "results.md").read_text()
    assert "| teacher |" in table and "| student |" in table
    # the student logged each loss term's gradient share (train.grad_share_every=10 in the quick demo)
    step, shares = last_grad_shares(out / "demo-student")
    assert step == 30 and set(shares) == {"clip", "fd", "crd", "icl", "pm"}, shares
    assert all(share > 0.0 for share in shares.values()), shares  # every term moves the student
    assert abs(sum(shares.values()) - 1) < 1e-6 and "student gradient share per loss term (step 30)" in table
    # the demo ends with its report: the path printed, the index page and its plots written
    assert f"report (plots of both runs): {out / 'report' / 'index.md'}" in printed
    index = (out / "report" / "index.md").read_text()
    assert "overlay_losses.png" in index and (out / "report" / "overlay_losses.png").stat().st_size > 0
    assert (out / "demo-student" / "report" / "grad_share.png").is_file()
