"""Training on a CPU never reaches a kernel that crashes on its instruction set.

oneDNN's AVX2 kernels (``ONEDNN_MAX_CPU_ISA=AVX2`` makes any x86 machine use them) crash in the backward pass
of channels-last convolutions that every FastViT stem has. Each test trains in a child process with those
kernels, so a crash fails the test with the signal named instead of killing the test runner.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from siclip.train.memory_format import ENV_FORCE, cpu_channels_last_ok, memory_format_for
from tests.helpers import AVX2_KERNELS, child_report, subprocess_env


def _child(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # a fresh cache folder: the child probes for itself instead of reading another process's answer
    full_env = {**subprocess_env(), **AVX2_KERNELS, "XDG_CACHE_HOME": str(tmp_path / "cache"), **env}
    full_env.pop(ENV_FORCE, None)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=600, check=False
    )


def test_the_training_step_survives_avx2_kernels(tmp_path: Path) -> None:
    """The demo student (frozen, inheriting) and the full-training baseline each train a few steps."""
    code = (
        "import json, torch\n"
        "torch.set_num_threads(1)\n"
        "from siclip.bench.gpu import run_bench_gpu\n"
        "result, _ = run_bench_gpu(model='tiny-student', batch=4, steps=2, warmup=1, device='cpu', out=None)\n"
        "print(json.dumps({k: r['bad_steps'] for k, r in result['rows'].items()}))\n"
    )
    proc = _child(code, tmp_path)
    assert proc.returncode == 0, child_report(proc)
    bad_steps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(bad_steps) == 2 and set(bad_steps.values()) == {0}, bad_steps


def test_the_chosen_format_trains_the_stem_convolution_that_crashes(tmp_path: Path) -> None:
    """Whatever the probe decides on this machine, the FastViT stem's 1x1 stride-2 convolution on 3 channels
    (the kernel that crashes on AVX2 in channels-last) trains in that format; the probe's own crash is a no."""
    code = (
        "import torch\n"
        "from siclip.train.memory_format import memory_format_for\n"
        "fmt = memory_format_for('cpu')\n"
        "conv = torch.nn.Conv2d(3, 32, 1, stride=2).to(memory_format=fmt)\n"
        "x = torch.randn(4, 3, 64, 64).contiguous(memory_format=fmt)\n"
        "for _ in range(3):\n"
        "    conv(x).square().mean().backward()\n"
        "print('format', fmt)\n"
    )
    proc = _child(code, tmp_path)
    assert proc.returncode == 0, child_report(proc)
    assert "format torch." in proc.stdout


def test_a_child_killed_by_a_signal_is_reported_by_name(tmp_path: Path) -> None:
    proc = _child("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", tmp_path)
    assert proc.returncode == -signal.SIGSEGV
    assert "SIGSEGV" in child_report(proc)


@pytest.mark.parametrize(("value", "expected"), [("1", torch.channels_last), ("0", torch.contiguous_format)])
def test_the_user_can_force_the_cpu_format(
    value: str, expected: torch.memory_format, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_FORCE, value)
    cpu_channels_last_ok.cache_clear()
    try:
        assert memory_format_for("cpu") == expected
        assert memory_format_for(torch.device("cuda", 0)) == torch.channels_last  # cuDNN: always
        assert memory_format_for("meta") == torch.contiguous_format  # other devices: NCHW
    finally:
        cpu_channels_last_ok.cache_clear()
