"""``train.use_gpu: auto`` against real clusters: a ``ray start --autoscaling-config`` head with a GPU node type
(Ray's fake multi-node provider, all its nodes on this machine) and the plain local Ray.

Ray 2.60's autoscaler publishes the names of its node types, not their resources, so on the autoscaling
cluster ``auto`` cannot know whether GPU nodes could come: it must refuse in one line naming
``train.use_gpu``, never quietly train on the head's CPUs. The driver runs in a subprocess connected by
address, so the shared in-process ``ray_session`` is untouched. The head node is isolated: free ports, its
own short ``--temp-dir``, ``RAY_AUTH_MODE=disabled`` for it and its driver alike (nothing of it outlives the
test), ``RAY_ADDRESS`` unset, and its own session, whose processes teardown kills by id (``ray stop`` would
kill every Ray process on the machine, other sessions' included).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")

# A head with one CPU and no GPU; a GPU node type the autoscaler may launch, none running (min_workers 0),
# as on aws_gpu.yaml or a KubeRay cluster scaled to zero.
_FAKE_CLUSTER = {
    "cluster_name": "siclip-fake",
    "max_workers": 2,
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 1,
    "provider": {"type": "fake_multinode"},
    "auth": {"ssh_user": "ubuntu"},
    "head_node_type": "ray.head.default",
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "gpu_worker": {
            "resources": {"CPU": 1, "GPU": 1},
            "node_config": {},
            "min_workers": 0,
            "max_workers": 2,
        },
    },
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}

# Run by the driver subprocess: wait for the autoscaler's first report, then ask what siclip decides.
_DRIVER = r"""
import json, sys, time
import ray
from ray.experimental.internal_kv import _internal_kv_get
from siclip import ray_compat
from siclip.config import ConfigError, apply_overrides, from_dict, to_dict, SiclipCfg
from siclip.train.launch import check_cluster_storage, resolve_use_gpu

ray.init(address=sys.argv[1])
deadline = time.monotonic() + 90
while b"autoscaler_report" not in (_internal_kv_get("__autoscaling_status") or b""):
    assert time.monotonic() < deadline, "the autoscaler never reported"
    time.sleep(0.5)

def cfg(*overrides):
    return from_dict(apply_overrides(to_dict(SiclipCfg()), list(overrides)))

out = {"gpus_now": ray.cluster_resources().get("GPU", 0), "present": ray_compat.autoscaler().present}
for choice in ("auto", "yes", "no"):
    try:
        out[choice] = resolve_use_gpu(cfg(f"train.use_gpu={choice}"))
    except ConfigError as e:
        out[choice] = "ConfigError: " + str(e)
try:
    check_cluster_storage(cfg(f"train.runs_dir={sys.argv[2]}"))
    out["local_runs_dir"] = "accepted"
except ConfigError as e:
    out["local_runs_dir"] = "ConfigError: " + str(e)
print("RESULT " + json.dumps(out))
"""


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            ports.add(int(s.getsockname()[1]))
    return sorted(ports)


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # field 6 of /proc/PID/stat is the session id (after the ")" that ends the command name)
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                pids.append(int(entry.name))
    return pids


def _kill_session(sid: int) -> None:
    """Stop every process `ray start` left behind in its session: TERM, a grace period, then KILL."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 3.0)):
        for pid in _session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        RAY_AUTH_MODE="disabled",  # the same for the node and its driver; the node lives for this test only
        RAY_USAGE_STATS_ENABLED="0",
        RAY_FAKE_CLUSTER="1",  # required by Ray's fake multi-node provider
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
    )
    return env


@pytest.fixture(scope="module")
def autoscaling_head() -> Iterator[str]:
    """A head started with an autoscaling config that has a GPU node type; yields its GCS address."""
    temp_dir = Path(tempfile.mkdtemp(prefix="sa", dir="/tmp"))  # short: Unix socket paths are limited
    config = temp_dir / "cluster.yaml"
    config.write_text(yaml.safe_dump(_FAKE_CLUSTER))
    env = _env()
    proc = None
    try:
        for attempt in range(3):
            gcs, agent, client, metrics = _free_ports(4)
            cmd = [
                RAY,
                "start",
                "--head",
                f"--port={gcs}",
                f"--dashboard-agent-listen-port={agent}",
                f"--ray-client-server-port={client}",
                f"--metrics-export-port={metrics}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                "--num-gpus=0",
                "--include-dashboard=false",
                f"--autoscaling-config={config}",
                f"--temp-dir={temp_dir / 'r'}",
                "--disable-usage-stats",
            ]
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            out, _ = proc.communicate(timeout=120)
            if proc.returncode == 0:
                break
            _kill_session(proc.pid)  # a port taken since it was picked: clean up, try other ports
            if attempt == 2:
                pytest.fail(f"ray start failed 3 times (rc {proc.returncode}):\n{out[-3000:]}")
        yield f"127.0.0.1:{gcs}"
    finally:
        if proc is not None:
            _kill_session(proc.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _decide(address: str, runs_dir: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, address, str(runs_dir)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=REPO,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"driver failed (rc {done.returncode}):\n{done.stderr[-4000:]}"
    return dict(json.loads(lines[-1].removeprefix("RESULT ")))


def test_auto_refuses_in_one_line_where_the_autoscaler_may_launch_gpus(
    autoscaling_head: str, tmp_path: Path
) -> None:
    got = _decide(autoscaling_head, tmp_path / "runs")
    assert got["gpus_now"] == 0 and got["present"] is True
    auto = str(got["auto"])
    assert auto.startswith("ConfigError: train.use_gpu:"), (
        auto
    )  # not a silent False (CPU training on the head)
    assert "train.use_gpu=yes" in auto and "train.use_gpu=no" in auto and "\n" not in auto
    assert got["yes"] is True and got["no"] is False  # the answers it asks for are taken as given
    # nodes the autoscaler adds would not see a folder on the head's disk
    assert str(got["local_runs_dir"]).startswith("ConfigError: train.runs_dir"), got["local_runs_dir"]


@pytest.mark.usefixtures("ray_session")
def test_a_local_ray_has_no_autoscaler_and_auto_means_its_own_gpus() -> None:
    """The plain local Ray runs a monitor too (mirroring its one node): that is not an autoscaler."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_get

    from siclip import ray_compat
    from siclip.config import SiclipCfg
    from siclip.train.launch import resolve_use_gpu

    deadline = time.monotonic() + 60
    while b"autoscaler_report" not in (_internal_kv_get("__autoscaling_status") or b""):
        assert time.monotonic() < deadline, "the local monitor never reported"
        time.sleep(0.5)
    assert ray_compat.autoscaler() == ray_compat.NO_AUTOSCALER
    assert resolve_use_gpu(SiclipCfg()) is (ray.cluster_resources().get("GPU", 0) > 0)
