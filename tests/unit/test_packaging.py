"""The installed package stands alone: a wheel built from this checkout runs outside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import child_report, subprocess_env

REPO = Path(__file__).resolve().parents[2]


def test_wheel_runs_outside_the_checkout(tmp_path: Path) -> None:
    wheel_dir, target, elsewhere = tmp_path / "wheel", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert build.returncode == 0, child_report(build)
    (wheel,) = wheel_dir.glob("siclip-*.whl")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert install.returncode == 0, child_report(install)
    env = {**subprocess_env(), "PYTHONPATH": str(target)}
    code = (
        "import json, siclip, siclip.demo as demo\n"
        "cfg = demo.demo_config('demo', root='out')\n"
        "teacher = demo.demo_config('demo_teacher', root='out')\n"
        "print(json.dumps({'package': siclip.__file__, 'student': cfg.model.name, 'teacher': teacher.model.name}))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, child_report(run)
    seen = yaml.safe_load(run.stdout.strip().splitlines()[-1])
    assert seen["package"].startswith(str(target)), seen  # the wheel's copy, not the checkout's
    shipped = {
        p: yaml.safe_load((REPO / "configs" / f"{p}.yaml").read_text()) for p in ("demo", "demo_teacher")
    }
    assert seen["student"] == shipped["demo"]["model"]["name"]
    assert seen["teacher"] == shipped["demo_teacher"]["model"]["name"]
    helped = subprocess.run(
        [sys.executable, "-m", "siclip.cli", "demo", "--help"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert helped.returncode == 0 and "--quick" in helped.stdout, child_report(helped)
