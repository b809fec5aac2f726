"""The paper's results table: a checkpoint's numbers on the six datasets next to published reference numbers.

Only numbers copied from a named public source are listed (values in %). The SiCLIP paper's per-dataset
numbers are not: its full text was not available to us (``docs/method.md``), so the table says so
instead of guessing. MobileCLIP-S0's numbers are CLIP_benchmark outputs: COCO is the 2014 Karpathy 5k
test split, not COCO 2017 val, so a checkpoint evaluated on the 2017 layout is marked as such.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from siclip.eval.markdown_tables import save_table

__all__ = ["COLUMNS", "REFERENCES", "format_paper_table", "json_path", "paper_table", "write_paper_table"]

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("imagenet1k", "top1", "IN-1k"),
    ("imagenetv2", "top1", "IN-V2"),
    ("imagenet_r", "top1", "IN-R"),
    ("imagenet_sketch", "top1", "IN-Sketch"),
    ("mscoco", "i2t_r@1", "COCO I2T R@1"),
    ("mscoco", "t2i_r@1", "COCO T2I R@1"),
    ("flickr30k", "i2t_r@1", "Flickr I2T R@1"),
    ("flickr30k", "t2i_r@1", "Flickr T2I R@1"),
)
"""(dataset, metric, header): zero-shot top-1 on the ImageNets, recall@1 both ways on COCO and Flickr30k."""

REFERENCES: tuple[dict[str, Any], ...] = (
    {
        "model": "MobileCLIP-S0",
        "trained_on": "DataCompDR-1B, 13 B samples seen",
        "source": "apple/ml-mobileclip, results/mobileclip_s0.jsonl (CLIP_benchmark output), commit a2e4041",
        "values": {
            "imagenet1k/top1": 67.79,
            "imagenetv2/top1": 59.94,
            "imagenet_r/top1": 78.64,
            "imagenet_sketch/top1": 55.52,
            "mscoco/i2t_r@1": 58.74,
            "mscoco/t2i_r@1": 40.44,
            "flickr30k/i2t_r@1": 85.90,
            "flickr30k/t2i_r@1": 67.68,
        },
    },
    {
        "model": "TinyCLIP ViT-39M/16 Text-19M",
        "trained_on": "YFCC-15M",
        "source": "microsoft/Cream, TinyCLIP/README.md (model zoo; ImageNet-1k only)",
        "values": {"imagenet1k/top1": 63.5},
    },
    {
        "model": "TinyCLIP ViT-8M/16 Text-3M",
        "trained_on": "YFCC-15M",
        "source": "microsoft/Cream, TinyCLIP/README.md (model zoo; ImageNet-1k only)",
        "values": {"imagenet1k/top1": 41.1},
    },
)

SICLIP_NOTE = (
    "SiCLIP (Liu, arXiv 2411.14789): per-dataset numbers not listed; the paper's full text was not available "
    "to us. Its claims: best COCO retrieval among models trained on <= 20 M samples, Flickr30k on par with "
    "TinyCLIP with about 3 % of its samples."
)


def paper_table(results: dict[str, dict[str, Any]], *, name: str) -> dict[str, Any]:
    """The table as data: per column, this checkpoint's value in % (or ``None`` with the absence reason)
    and each reference's value."""
    ours: dict[str, Any] = {}
    absent: dict[str, str] = {}
    layouts: dict[str, str] = {}
    for dataset, metric, _ in COLUMNS:
        r = results.get(dataset, {"status": "absent", "reason": "not evaluated"})
        key = f"{dataset}/{metric}"
        if r.get("status") == "ok" and isinstance(r.get(metric), float) and not math.isnan(r[metric]):
            ours[key] = round(100 * r[metric], 2)
            layouts[dataset] = r.get("layout", "")
        else:
            ours[key] = None
            absent[dataset] = r.get("reason", f"no {metric}")
    return {
        "columns": [{"key": f"{d}/{m}", "header": h} for d, m, h in COLUMNS],
        "rows": [{"model": name, "trained_on": "this checkpoint", "source": "siclip eval", "values": ours}]
        + [dict(r) for r in REFERENCES],
        "absent": absent,
        "layouts": layouts,
        "notes": [SICLIP_NOTE],
    }


def format_paper_table(table: dict[str, Any]) -> str:
    """Markdown: one row per model, ``absent`` / ``-`` where there is no number, then sources and notes."""
    cols = table["columns"]
    lines = [
        "# Zero-shot results: this checkpoint next to published numbers (%)",
        "",
        "| model | trained on | " + " | ".join(c["header"] for c in cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    ours_name = table["rows"][0]["model"]
    for row in table["rows"]:
        cells = []
        for c in cols:
            value = row["values"].get(c["key"])
            if value is not None:
                cells.append(f"{value:.1f}")
            else:
                cells.append("absent" if row["model"] == ours_name else "-")
        lines.append(f"| {row['model']} | {row['trained_on']} | " + " | ".join(cells) + " |")
    lines += ["", "Sources:"]
    lines += [f"- {r['model']}: {r['source']}" for r in table["rows"][1:]]
    if table["absent"]:
        lines += ["", "Absent datasets (not evaluated, nothing substituted):"]
        lines += [f"- {d}: {reason}" for d, reason in table["absent"].items()]
    if table["layouts"].get("mscoco") == "coco2017":
        lines += [
            "",
            "COCO here is the 2017 val split (5k); the references use the 2014 Karpathy 5k test split.",
        ]
    lines += ["", *table["notes"]]
    return "\n".join(lines)


def json_path(out: str | Path) -> str:
    """Where :func:`write_paper_table` puts the JSON copy of the Markdown table ``out``."""
    return os.path.splitext(str(out))[0] + ".json"


def write_paper_table(results: dict[str, dict[str, Any]], *, name: str, out: str | Path) -> str:
    """Write ``out`` (Markdown; a path or a URI such as ``s3://``) and the same table as JSON next to it
    (:func:`json_path`); returns ``out``."""
    table = paper_table(results, name=name)
    save_table(format_paper_table(table), out)
    save_table(json.dumps(table, indent=2), json_path(out))
    return str(out)
