"""A run's metrics table (``metrics.jsonl``): where rank 0 logs every step's scalars, read back without Ray
by the demo, the ablation, the benchmarks and ``siclip report``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["METRICS_TABLE", "last_grad_shares", "read_metrics"]

METRICS_TABLE = "metrics.jsonl"
"""One JSON object per logged step in the run folder: ``{"step": N, "<metric>": value, ...}``."""


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics table (a folder or a URI), oldest first ([] when it has logged nothing)."""
    from siclip import storage

    try:
        text = storage.read_text(storage.join(run_dir, METRICS_TABLE))
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def last_grad_shares(run_dir: str | Path) -> tuple[int, dict[str, float]]:
    """The step and ``grad_share/<term>`` values last logged (``train.grad_share_every``); (0, {}) if none."""
    for row in reversed(read_metrics(run_dir)):
        shares = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("grad_share/")}
        if shares:
            return int(row["step"]), shares
    return 0, {}
