"""``ray job submit`` against a real, separate head node: the cluster recipe of cluster/README.md, end to end.

The test starts its own head node as a subprocess (``ray start --head``) rather than using the shared
in-process ``ray_session``: job submission needs the dashboard's job server, and a separate node proves
that the working-dir upload plus the installed package are all a cluster needs. The node is isolated from
any Ray session of the same pytest process: free ports for everything that has a fixed default,
``RAY_ADDRESS`` unset, its own short ``--temp-dir``, token auth with a token file of its own (never
``~/.ray/auth_token``), and its own process group, which teardown kills by id (``ray stop`` would kill
every Ray process on the machine, other sessions' included).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _candidate_ports(n: int) -> list[int]:
    """``n`` distinct ports, free when looked at; `ray start` binds them itself, so another process can still
    take one in between: the head-node fixture then retries with new ones instead of failing."""
    ports: set[int] = set()
    while len(ports) < n:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            ports.add(int(s.getsockname()[1]))
    return sorted(ports)


@dataclass(frozen=True)
class HeadNode:
    address: str
    """The dashboard (job server) URL, bound to 127.0.0.1."""
    env: dict[str, str]
    """Environment for every ``ray`` CLI call against this node (auth mode and token file)."""
    temp_dir: Path


def _node_env(temp_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(key, None)
    token_file = temp_dir / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    # Set explicitly: with RAY_AUTH_MODE unset, Ray 2.60 guesses from ~/.ray/auth_token, which another
    # session's ray.init() may have written, and the head node and the job client could disagree.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # The job driver runs `siclip` from the head node's PATH: the project's venv.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _kill_group(pgid: int, temp_dir: Path) -> None:
    """Stop every process of the node: its process group, then any straggler naming our temp dir."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    for pid in _pids_naming(str(temp_dir)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pids_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def head_node() -> Iterator[HeadNode]:
    """A Ray head node with a dashboard on 127.0.0.1 and token auth, stopped at teardown."""
    # Short: Ray puts Unix sockets under it and socket paths are limited to ~107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="sj", dir="/tmp"))
    env = _node_env(temp_dir)
    for attempt in range(3):
        gcs, dash_port, agent, client = _candidate_ports(4)
        cmd = [
            RAY,
            "start",
            "--head",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--dashboard-agent-listen-port={agent}",
            f"--ray-client-server-port={client}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir / 'r'}",
            "--disable-usage-stats",
        ]
        # A new session: the daemons `ray start` leaves behind keep its process group, so teardown can
        # kill exactly them.
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        out, _ = proc.communicate(timeout=120)
        if proc.returncode == 0:
            break
        _kill_group(proc.pid, temp_dir)  # a port taken since it was picked: clean up, try other ports
        if attempt == 2:
            shutil.rmtree(temp_dir, ignore_errors=True)
            pytest.fail(f"ray start failed 3 times (rc {proc.returncode}):\n{out[-3000:]}")
    try:
        yield HeadNode(address=f"http://127.0.0.1:{dash_port}", env=env, temp_dir=temp_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_group(proc.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray(node: HeadNode, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RAY, *args], env=node.env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _submit(
    node: HeadNode, job_id: str, entrypoint: list[str], *, timeout: float, runtime_env: Path | None = None
) -> str:
    """Submit with the working-dir upload, wait for the end, fail unless it succeeded; return its logs."""
    submitted = _ray(
        node,
        "job",
        "submit",
        "--address",
        node.address,
        "--submission-id",
        job_id,
        "--working-dir",
        str(REPO),
        *(["--runtime-env", str(runtime_env)] if runtime_env else []),
        "--",
        *entrypoint,
        timeout=timeout,
    )
    status = _ray(node, "job", "status", "--address", node.address, job_id, timeout=60)
    logs = _ray(node, "job", "logs", "--address", node.address, job_id, timeout=60)
    if f"Job '{job_id}' succeeded" not in status.stdout + status.stderr:
        pytest.fail(
            f"job {job_id} did not succeed (submit rc {submitted.returncode}):\n"
            f"{status.stdout[-2000:]}{status.stderr[-2000:]}\n--- job logs ---\n{logs.stdout[-6000:]}"
        )
    return logs.stdout


def test_dashboard_is_bound_to_loopback_and_requires_the_token(head_node: HeadNode) -> None:
    listening = _ray(head_node, "job", "list", "--address", head_node.address, timeout=60)
    assert listening.returncode == 0, listening.stderr
    wrong = head_node.temp_dir / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    refused = subprocess.run(
        [RAY, "job", "list", "--address", head_node.address],
        env=dict(head_node.env, RAY_AUTH_TOKEN_PATH=str(wrong)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode != 0
    assert "Invalid authentication token" in refused.stderr, refused.stderr[-2000:]
    port = int(head_node.address.rsplit(":", 1)[1])
    outward = socket.gethostbyname(socket.gethostname())
    if not outward.startswith("127."):
        with socket.socket() as s, pytest.raises(OSError):
            s.settimeout(2)
            s.connect((outward, port))


def _tiny_demo_inputs(root: Path) -> None:
    """The demo world's shards and a random tiny teacher where configs/demo.yaml expects trained weights."""
    from safetensors.torch import save_file

    from siclip.models.presets import build_preset
    from tests.helpers import tiny_world

    tiny_world(str(root))
    weights = root / "teacher" / "final" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in build_preset("tiny-teacher").state_dict().items()}, str(weights))


def demo_overrides(root: Path, *, run_name: str) -> list[str]:
    """configs/demo.yaml moved onto ``root`` and cut to a few steps (the overrides the README's recipe takes)."""
    weights = root / "teacher" / "final" / "model.safetensors"
    return [
        f"data.train_shards=[{root}/world/web/web-*.tar]",
        "data.batch_size=16",
        "data.loader_workers=0",
        "data.shuffle_buffer=50",
        f"model.source={weights}",
        f"teacher.source={weights}",
        "eval.zeroshot_dir=",
        "eval.classnames_file=",
        "eval.retrieval_shards=[]",
        f"train.runs_dir={root}/runs",
        f"train.run_name={run_name}",
        "train.max_steps=6",
        "train.ckpt_every=3",
        "train.log_every=2",
        "train.eval_every=0",
        "train.cpus_per_worker=1",
        "train.progress=false",
        "optim.warmup_steps=2",
    ]


def test_submit_siclip_train_demo(head_node: HeadNode, tmp_path: Path) -> None:
    from siclip.config import load_config

    root = tmp_path / "demo"
    _tiny_demo_inputs(root)
    overrides = demo_overrides(root, run_name="jobtest")
    # Fail here, not in the job, on a bad override (the sections `siclip train` checks).
    load_config(REPO / "configs/demo.yaml", overrides, check_files=("data", "model", "teacher", "eval"))
    entry = ["siclip", "train", "--config", "configs/demo.yaml", *overrides]
    t0 = time.monotonic()
    logs = _submit(head_node, f"train-{secrets.token_hex(3)}", entry, timeout=400)
    print(f"train job: {time.monotonic() - t0:.1f} s")
    assert "finished at step 6" in logs

    run = root / "runs" / "jobtest"
    resolved = load_config(run / "config.yaml", check_files=False)
    assert resolved.train.max_steps == 6 and resolved.data.batch_size == 16
    assert list((run / "tb").glob("events.out.tfevents.*"))
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert checkpoints and any(p.is_file() for p in checkpoints[-1].rglob("*"))
    assert (run / "final" / "model.safetensors").is_file()


def test_a_job_writing_into_its_uploaded_copy_fails_before_any_work(
    head_node: HeadNode, tmp_path: Path
) -> None:
    root = tmp_path / "demo"
    _tiny_demo_inputs(root)
    overrides = [o for o in demo_overrides(root, run_name="lost") if not o.startswith("train.runs_dir=")]
    entry = ["siclip", "train", "--config", "configs/demo.yaml", *overrides, "train.runs_dir=runs"]
    job_id = f"badpath-{secrets.token_hex(3)}"
    submit = ["job", "submit", "--address", head_node.address, "--submission-id", job_id]
    _ray(head_node, *submit, "--working-dir", str(REPO), "--", *entry, timeout=300)
    status = _ray(head_node, "job", "status", "--address", head_node.address, job_id, timeout=60)
    logs = _ray(head_node, "job", "logs", "--address", head_node.address, job_id, timeout=60).stdout
    assert "failed" in (status.stdout + status.stderr).lower(), status.stdout + logs[-3000:]
    errors = [line for line in logs.splitlines() if line.startswith("siclip: error:")]
    assert errors == [
        "siclip: error: train.runs_dir: got 'runs', a folder inside this job's temporary copy of the working "
        "dir (lost when the job ends, unseen by other nodes); allowed: a path every node mounts (e.g. /data/... "
        "on KubeRay, /mnt/efs/... on AWS) or s3://BUCKET/..."
    ], logs[-3000:]
    assert "worker group" not in logs  # refused before Ray Train started anything
