"""Benchmark and ablation tables: every script writes its Markdown the same way."""

from __future__ import annotations

from pathlib import Path

__all__ = ["save_table"]


def save_table(table: str, out: str | Path | None) -> None:
    """Write ``table`` (plus a final newline) to ``out``, creating its folder; ``None``/empty skips it."""
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table + "\n")
