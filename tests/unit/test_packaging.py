"""The installed package stands alone: a wheel built from this checkout runs outside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import child_report, subprocess_env

REPO = Path(__file__).resolve().parents[2]


def _ok(*args: str, **kwargs: Any) -> str:
    """Run ``python args...``; its stdout, or the test fails naming how the child ended."""
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=600, check=False, **kwargs
    )
    assert done.returncode == 0, child_report(done)
    return done.stdout


def test_wheel_runs_outside_the_checkout(tmp_path: Path) -> None:
    wheel_dir, target, elsewhere = tmp_path / "wheel", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _ok("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), str(REPO))
    (wheel,) = wheel_dir.glob("siclip-*.whl")
    _ok("-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel))
    outside = {"cwd": elsewhere, "env": {**subprocess_env(), "PYTHONPATH": str(target)}}
    code = (
        "import json, siclip, siclip.demo as demo\n"
        "cfg = demo.demo_config('demo', root='out')\n"
        "teacher = demo.demo_config('demo_teacher', root='out')\n"
        "print(json.dumps({'package': siclip.__file__, 'student': cfg.model.name, 'teacher': teacher.model.name}))\n"
    )
    seen = yaml.safe_load(_ok("-c", code, **outside).strip().splitlines()[-1])
    assert seen["package"].startswith(str(target)), seen  # the wheel's copy, not the checkout's
    shipped = {
        p: yaml.safe_load((REPO / "configs" / f"{p}.yaml").read_text()) for p in ("demo", "demo_teacher")
    }
    assert seen["student"] == shipped["demo"]["model"]["name"]
    assert seen["teacher"] == shipped["demo_teacher"]["model"]["name"]
    assert "--quick" in _ok("-m", "siclip.cli", "demo", "--help", **outside)
