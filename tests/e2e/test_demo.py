"""``siclip demo --quick`` end to end on the shared local Ray: every stage runs and the models learn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from siclip.cli import main
from siclip.train.worker import last_grad_shares

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/total"] for r in rows if "loss/total" in r]


def test_quick_demo_runs_every_stage(
    tmp_path: Path, ray_session: None, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stage in range(1, 7):
        assert f"=== {stage}/6" in printed
    # CC12M-SYN shards with a manifest whose counts add up
    manifest = json.loads((out / "world" / "web_syn" / "manifest.json").read_text())
    assert manifest["samples_in"] == manifest["samples_out"] + manifest["samples_skipped"] == 1200
    # both runs learned: the contrastive loss fell
    for run in ("teacher", "demo-student"):
        losses = _losses(out / run)
        assert losses[-1] < losses[0], (run, losses)
    # siclip eval printed one JSON object per model, and the table was written
    evals = [json.loads(line) for line in printed.splitlines() if line.startswith('{"checkpoint"')]
    assert len(evals) == 2 and all(0.0 <= e["zeroshot_top1"] <= 1.0 for e in evals)
    table = (out / "results.md").read_text()
    assert "| teacher |" in table and "| student |" in table
    # the student logged each loss term's gradient share (train.grad_share_every=10 in the quick demo)
    step, shares = last_grad_shares(out / "demo-student")
    assert step == 30 and set(shares) == {"clip", "fd", "crd", "icl", "pm"}, shares
    assert abs(sum(shares.values()) - 1) < 1e-6 and "student gradient share per loss term (step 30)" in table
    # the demo ends with its report: the path printed, the index page and its plots written
    assert f"report (plots of both runs): {out / 'report' / 'index.md'}" in printed
    index = (out / "report" / "index.md").read_text()
    assert "overlay_losses.png" in index and (out / "report" / "overlay_losses.png").stat().st_size > 0
    assert (out / "demo-student" / "report" / "grad_share.png").is_file()
