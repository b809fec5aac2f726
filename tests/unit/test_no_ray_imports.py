"""Models, losses, task, the loop, the training loader and the data build's Ray-free parts must import (and run)
without Ray: a fresh interpreter proves it."""

from __future__ import annotations

import subprocess
import sys

PURE_MODULES = [
    "siclip.config",
    "siclip.models.sasp",
    "siclip.models.simplify",
    "siclip.models.mct",
    "siclip.models.presets",
    "siclip.models.inherit",
    "siclip.models.build",
    "siclip.models.registry",
    "siclip.openclip_compat",
    "siclip.losses.terms",
    "siclip.losses.total",
    "siclip.task",
    "siclip.train.loop",
    "siclip.train.checkpoint",
    "siclip.train.metrics_table",
    "siclip.train.run_log",
    "siclip.report",
    "siclip.sweep",
    "siclip.eval.benchmarks",
    "siclip.data.loader",
    "siclip.data.prepare",
    "siclip.data.commit",
]


def test_pure_modules_import_without_ray() -> None:
    code = (
        "import sys, importlib\n"
        f"for m in {PURE_MODULES!r}:\n"
        "    importlib.import_module(m)\n"
        "leaked = sorted(k for k in sys.modules if k == 'ray' or k.startswith('ray.'))\n"
        "print('LEAKED', leaked)\n"
        "sys.exit(1 if leaked else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
