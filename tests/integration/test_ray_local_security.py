"""A local Ray started by siclip is not reachable from the network and its token is private: every Ray
process of the node listens on loopback only, and ``~/.ray/auth_token`` (written by Ray) is 0600.

Run in a subprocess with its own HOME, so the token is the one this Ray writes and the suite's shared Ray is
untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROBE = r"""
import json, sys
import psutil, ray
from siclip.config import load_config
from siclip.ray_session import init_ray

init_ray(load_config(None, ["ray.num_cpus=1", "ray.object_store_memory_mb=128", *sys.argv[1:]]).ray)
session = ray._private.worker._global_node.get_session_dir_path().rsplit("/", 1)[-1]
listening = set()
for proc in psutil.process_iter(["cmdline"]):
    try:
        if session in " ".join(proc.info["cmdline"] or []):
            listening |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == "LISTEN"}
    except psutil.Error:
        pass
print(json.dumps({"nodes": [n["NodeManagerAddress"] for n in ray.nodes()], "listening": sorted(listening)}))
ray.shutdown()
"""


def _probe(tmp_path: Path, *overrides: str) -> dict[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env |= {"HOME": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(Path.cwd())}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *overrides], capture_output=True, text=True, env=env, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_local_ray_listens_on_loopback_only_and_its_token_is_private(tmp_path: Path) -> None:
    got = _probe(tmp_path)
    assert got["nodes"] == ["127.0.0.1"]
    assert got["listening"], "no listening socket found for the session's processes"
    loopback = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
    assert set(got["listening"]) <= loopback, got["listening"]  # not 0.0.0.0, ::, nor the machine's address
    token = tmp_path / ".ray" / "auth_token"
    assert token.is_file() and token.stat().st_mode & 0o777 == 0o600
