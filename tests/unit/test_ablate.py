"""The ablation's rows and its summary table (the training itself is the same ``launch`` as ``siclip train``)."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest

from siclip.ablate import (
    ROWS,
    ablation_table_path,
    compare_claims,
    curves_dir,
    format_table,
    regime_checks,
    row_config,
    run_ablation,
    save_curve,
    summarize,
)
from siclip.config import ConfigError, SiclipCfg


def test_rows_switch_the_paper_components() -> None:
    base = SiclipCfg()
    baseline = row_config(base, "baseline", 2, 80)
    assert not baseline.model.inherit and not baseline.teacher.enabled and baseline.loss.fd_weight == 0
    assert baseline.train.seed == 2 and baseline.train.max_steps == 80
    assert baseline.train.run_name == "ablate-baseline-s2"
    wi = row_config(base, "WI", 0, 80)
    assert wi.model.inherit and wi.loss.pm_weight == 0 and wi.loss.icl_weight == 0
    wikd = row_config(base, "WIKD", 0, 80)
    assert wikd.loss.fd_weight == base.loss.fd_weight and wikd.loss.pm_weight == 0
    full = row_config(base, "WIKD+PM", 0, 80)
    assert full.loss == base.loss
    real = row_config(base, "WIKD+PM, web captions only", 0, 80)
    assert real.data.synthetic == "off" and real.train.run_name == "ablate-wikd-pm-web-captions-only-s0"
    assert real.loss == base.loss and real.model == base.model
    web = row_config(base, "baseline, web captions only", 0, 80)
    assert web.data.synthetic == "off" and base.data.synthetic == baseline.data.synthetic == "sum"
    assert web.model == baseline.model and web.loss == baseline.loss and web.teacher == baseline.teacher
    assert len({row_config(base, r, 0, 80).train.run_name for r in ROWS}) == len(ROWS)
    assert row_config(base, "WIKD+PM", 1, 80, tag="pm20").train.run_name == "ablate-wikd-pm-pm20-s1"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rows": ("WIKD",), "tag": "a b"}, r"^ablate --tag: got 'a b'"),
        ({"rows": ("WIKD", "KD-only")}, r"^ablate --row: got 'KD-only'; allowed: 'baseline', 'baseline, web"),
        ({"config": "configs/demo.yaml", "quick": True}, r"^ablate --quick: only for the demo world; got it"),
    ],
)
def test_bad_rows_and_tags_fail_before_any_work(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        run_ablation(out_dir=str(tmp_path / "never"), **kwargs)
    assert not (tmp_path / "never").exists()


def test_summary_means_spreads_and_shares() -> None:
    runs = {
        "WI": [
            {"zeroshot_top1": 0.5, "i2t_r@1": 0.2, "t2i_r@1": 0.4, "grad_share/clip": 1.0},
            {"zeroshot_top1": 0.6, "i2t_r@1": 0.1, "t2i_r@1": 0.3, "grad_share/clip": 1.0},
        ],
        "WIKD+PM": [
            {
                "zeroshot_top1": 0.7,
                "i2t_r@1": 0.3,
                "t2i_r@1": 0.5,
                "grad_share/fd": 0.9,
                "grad_share/pm": 0.1,
            },
            {
                "zeroshot_top1": 0.7,
                "i2t_r@1": 0.3,
                "t2i_r@1": 0.5,
                "grad_share/fd": 0.7,
                "grad_share/pm": 0.3,
            },
        ],
    }
    rows = summarize(runs)
    assert rows["WI"]["zeroshot_top1"]["mean"] == pytest.approx(0.55)
    assert rows["WI"]["zeroshot_top1"]["std"] == pytest.approx(statistics.pstdev([0.5, 0.6]))
    assert rows["WIKD+PM"]["grad_share/fd"]["mean"] == pytest.approx(0.8)
    table = format_table({"seeds": 2, "steps": 80, "rows": rows, "overrides": ["loss.pm_weight=20"]})
    lines = table.splitlines()
    assert lines[0] == "# Ablation on the demo world (2 seed(s), 80 student steps each)"
    assert lines[2].startswith("Produced by `siclip ablate`; overrides: `loss.pm_weight=20`.")
    assert "| WI | 55.0 ± 5.0 | 15.0 ± 5.0 | 35.0 ± 5.0 | clip 100 |" in lines
    assert "| WIKD+PM | 70.0 ± 0.0 | 30.0 ± 0.0 | 50.0 ± 0.0 | fd 80, pm 20 |" in lines


def test_table_and_curve_paths_never_overwrite_the_papers_table() -> None:
    assert ablation_table_path(None) == "benchmarks/ablation-demo.md"
    assert ablation_table_path(None, "pm20") == "benchmarks/ablation-demo-pm20.md"
    assert ablation_table_path("my/cc12m_subset.yaml") == "benchmarks/ablation-cc12m_subset.md"
    assert ablation_table_path("my/cc12m_subset.yaml", "t") == "benchmarks/ablation-cc12m_subset-t.md"
    assert curves_dir("benchmarks/ablation.md") == Path("benchmarks/ablation-curves")
    assert curves_dir(None) is None


def test_curve_csv_merges_rows_of_one_step_and_keeps_only_losses_and_metrics(tmp_path: Path) -> None:
    rows = [
        {"step": 20, "loss/total": 3.0, "loss/clip": 2.5, "optim/lr": 1e-3, "perf/samples_per_s": 9.0},
        {"step": 40, "loss/total": 2.0, "loss/clip": 1.5},
        {"step": 40, "val/zeroshot_top1": 0.25},
        {"step": 41, "grad_share/clip": 1.0},
        {"step": 60, "loss/total": 1.0, "loss/clip": 0.5},
    ]
    path = tmp_path / "curves" / "baseline-s0.csv"
    save_curve(rows, path)
    with open(path) as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["step", "loss/clip", "loss/total", "val/zeroshot_top1"]
    assert [r["step"] for r in table] == ["20", "40", "60"]
    assert table[1] == {"step": "40", "loss/clip": "1.5", "loss/total": "2.0", "val/zeroshot_top1": "0.25"}
    assert table[0]["val/zeroshot_top1"] == "" and float(table[2]["loss/total"]) == 1.0


def _runs(values: dict[str, list[tuple[float, float, float]]]) -> dict[str, list[dict[str, float]]]:
    """Row -> per seed (top-1 all, seen, unseen), retrieval fixed."""
    return {
        row: [
            {
                "zeroshot_top1": t,
                "zeroshot_top1_seen": s,
                "zeroshot_top1_unseen": u,
                "i2t_r@1": 0.1,
                "t2i_r@1": 0.2,
            }
            for t, s, u in seeds
        ]
        for row, seeds in values.items()
    }


def test_claims_pair_rows_by_seed_and_read_their_primary_metric() -> None:
    wi = [(0.60, 0.80, 0.20), (0.62, 0.82, 0.22), (0.61, 0.80, 0.23)]
    wikd = [(0.63, 0.79, 0.31), (0.60, 0.78, 0.24), (0.64, 0.80, 0.32)]
    per_row = _runs({"WI": wi, "WIKD": wikd})
    (claim,) = compare_claims(per_row)  # only the claims whose two rows ran
    assert claim["claim"] == "WIKD > WI" and claim["primary"] == "zeroshot_top1_unseen"
    d = [wikd[s][2] - wi[s][2] for s in range(3)]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    got = claim["diffs"]["zeroshot_top1_unseen"]
    assert got["mean"] == pytest.approx(mean)
    assert got["low"] == pytest.approx(mean - 4.303 * sd / math.sqrt(3), abs=1e-4)
    assert claim["verdict"] == ("holds" if got["low"] > 0 else "not shown")
    # without seen/unseen metrics (the default world) the claim falls back to top-1 on all classes
    plain = {
        r: [{"zeroshot_top1": v[0], "i2t_r@1": 0.1, "t2i_r@1": 0.2} for v in seeds]
        for r, seeds in (("WI", wi), ("WIKD", wikd))
    }
    (fallback,) = compare_claims(plain)
    assert fallback["primary"] == "zeroshot_top1" and "zeroshot_top1_unseen" not in fallback["diffs"]


def test_table_has_teacher_seen_unseen_gap_shares_intervals_and_regime_checks() -> None:
    per_row = _runs(
        {
            "baseline": [(0.20, 0.28, 0.04), (0.22, 0.30, 0.06), (0.21, 0.29, 0.05)],
            "WI": [(0.50, 0.70, 0.10), (0.52, 0.71, 0.14), (0.51, 0.70, 0.13)],
        }
    )
    teacher = {
        "zeroshot_top1": 0.81,
        "zeroshot_top1_seen": 0.82,
        "zeroshot_top1_unseen": 0.79,
        "i2t_r@1": 0.3,
    }
    result = {
        "seeds": 3,
        "steps": 200,
        "rows": summarize(per_row),
        "teacher": teacher,
        "comparisons": compare_claims(per_row),
        "regime": regime_checks(teacher, per_row),
    }
    table = format_table(result)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("| row | zeroshot_top1"))
    assert header.split(" | ")[1:4] == ["zeroshot_top1", "zeroshot_top1_seen", "zeroshot_top1_unseen"]
    assert "| teacher (one run) | 81.0 | 82.0 | 79.0 | 30.0 | - | - |" in lines
    assert any(line.startswith("| WI | 51.0 ± 0.8 | 70.3 ± 0.5 | 12.3 ± 1.7 |") for line in lines)
    # WI's share of the gap on all classes: (0.51 - 0.21) / (0.81 - 0.21) = 50 %
    share = next(line for line in lines if line.startswith("| WI | ") and "%" in line)
    assert share.split(" | ")[1] == "50 %"
    claim = next(line for line in lines if line.startswith("| WI > baseline |"))
    assert "holds" in claim and "+30.0 [" in claim
    assert [c["ok"] for c in result["regime"]] == [True, True]
    assert "not in regime" not in table


def test_held_out_table_path_and_config_conflict(tmp_path: Path) -> None:
    assert ablation_table_path(None, held_out=True) == "benchmarks/ablation.md"
    assert ablation_table_path(None, "siclip", held_out=True) == "benchmarks/ablation-siclip.md"
    with pytest.raises(ConfigError, match="--held-out"):
        run_ablation(out_dir=str(tmp_path / "never"), config="configs/demo.yaml", held_out=True)
    assert not (tmp_path / "never").exists()
    assert "WI, web captions only" in ROWS
