"""Which memory format a training step uses on a device, chosen so that no known-bad kernel is reached.

Channels-last (NHWC) convolutions are faster for these conv nets on CUDA (cuDNN) and, on some CPUs, on
oneDNN. But oneDNN's AVX2 kernels for the backward pass of a channels-last 1x1 stride-2 convolution on three
input channels (exactly the FastViT stem's shortcut branch) crash the process with SIGSEGV (torch 2.14.1,
oneDNN 3.12; reproducible on any x86 machine with ``ONEDNN_MAX_CPU_ISA=AVX2``). So:

- CUDA: channels-last.
- CPU: channels-last only after a one-time probe in a child process has run those convolutions forward and
  backward without dying; a crash, an error or a time-out in the probe means NCHW. The answer is cached per
  process and on disk (``$XDG_CACHE_HOME/siclip``, default ``~/.cache/siclip``), keyed by the CPU's model and
  flags, torch's version and every ``ONEDNN_*``/``DNNL_*`` variable, so each new process (every Ray Train
  worker) does not pay the probe again. ``SICLIP_CPU_CHANNELS_LAST=1`` (or ``0``) skips the probe and forces
  the choice.
- anything else (MPS, ...): NCHW.

Ray-free: the training loop and the benchmarks call it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["ENV_FORCE", "cpu_channels_last_ok", "exit_description", "memory_format_for", "place"]

LOG = logging.getLogger(__name__)

ENV_FORCE = "SICLIP_CPU_CHANNELS_LAST"
"""``1``/``0``: use (or not) channels-last on CPU without probing; unset or ``auto``: probe."""

PROBE_TIMEOUT_S = 60.0
"""A probe that crashes dies in about 2 s; one that hangs anyway counts as a no."""

# The convolutions a FastViT/MCi step runs, channels-last, forward and backward, a few times: the stem's 1x1
# stride-2 branch on 3 channels (the kernel that crashes on AVX2), a 3x3 stride-2 stem conv, a depthwise 7x7
# (RepMixer/ConvFFN) and a pointwise conv. One thread: with two, the crashing kernel's heap corruption hung
# the probe in 2 of 8 runs here (spinning OpenMP threads) instead of killing it; with one, 0 of 8.
_PROBE = """
import torch
from torch import nn
torch.set_num_threads(1)
torch.manual_seed(0)
cl = torch.channels_last
net = nn.Sequential(
    nn.Conv2d(3, 32, 1, stride=2), nn.Conv2d(32, 32, 3, stride=2, padding=1),
    nn.Conv2d(32, 32, 7, padding=3, groups=32), nn.BatchNorm2d(32), nn.GELU(), nn.Conv2d(32, 64, 1),
).to(memory_format=cl)
stem = nn.Conv2d(3, 16, 3, stride=2, padding=1).to(memory_format=cl)
for _ in range(3):
    x = torch.randn(4, 3, 64, 64).to(memory_format=cl).requires_grad_(True)
    (net(x).square().mean() + stem(x).square().mean()).backward()
print("channels-last ok")
"""


def exit_description(returncode: int) -> str:
    """How a child process ended: ``killed by SIGSEGV`` (the signal named) or ``exit status N``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _cache_file() -> Path:
    """The probe's answer for this CPU, torch build, interpreter and oneDNN settings."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        cpu = [ln for ln in cpuinfo.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        cpu = [platform.processor()]
    onednn = sorted((k, v) for k, v in os.environ.items() if k.startswith(("ONEDNN_", "DNNL_")))
    ident = json.dumps([torch.__version__, platform.machine(), sys.executable, cpu, onednn, _PROBE])
    key = hashlib.sha256(ident.encode()).hexdigest()[:20]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "siclip"
    return root / f"channels-last-probe-{key}.json"


def _probe() -> tuple[bool, str]:
    """Run the channels-last convolutions in a child process: (survived, what happened)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, f"no answer in {PROBE_TIMEOUT_S:.0f} s"
    except OSError as exc:
        return False, f"could not start: {exc}"
    if done.returncode == 0 and "channels-last ok" in done.stdout:
        return True, "ok"
    return False, exit_description(done.returncode)


@functools.cache
def cpu_channels_last_ok() -> bool:
    """Whether channels-last convolutions train without crashing on this CPU (probed once, then cached)."""
    forced = os.environ.get(ENV_FORCE, "auto").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    if forced not in ("", "auto"):
        LOG.warning(f"siclip: {ENV_FORCE}={forced!r} is not 1, 0 or auto; probing")
    cache = _cache_file()
    try:
        saved = json.loads(cache.read_text())
        ok, outcome, fresh = bool(saved["ok"]), str(saved["outcome"]), False
    except (OSError, ValueError, KeyError, TypeError):
        (ok, outcome), fresh = _probe(), True
        try:  # best effort: an unwritable cache only means the next process probes again
            cache.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=cache.parent, delete=False, suffix=".tmp") as f:
                json.dump({"ok": ok, "outcome": outcome}, f)
            os.replace(f.name, cache)
        except OSError:
            pass
    if not ok:
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
        LOG.log(
            logging.WARNING if fresh else logging.INFO,
            f"siclip: channels-last convolutions failed in a probe on this CPU ({outcome}"
            f"{', ONEDNN_MAX_CPU_ISA=' + isa if isa else ''}); training on CPU uses NCHW",
        )
    return ok


def memory_format_for(device: torch.device | str) -> torch.memory_format:
    """The memory format images and conv weights take for training on ``device``."""
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and cpu_channels_last_ok()):
        return torch.channels_last
    return torch.contiguous_format


def place(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Move ``module`` to ``device`` in the memory format the training step uses there (in place)."""
    return module.to(torch.device(device)).to(memory_format=memory_format_for(device))
