"""Benchmark and ablation Markdown tables written to a file or URI: every script writes its Markdown the same way."""

from __future__ import annotations

from pathlib import Path

__all__ = ["save_table"]


def save_table(table: str, out: str | Path | None) -> None:
    """Write ``table`` (plus a final newline) to ``out`` (a path, its folder created, or a URI such as
    ``s3://``); ``None``/empty skips it."""
    if not out:
        return
    from siclip import storage

    storage.write_text(out, table + "\n")
