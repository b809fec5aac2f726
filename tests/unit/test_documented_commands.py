"""Every ``ray job submit ... -- siclip ...`` command of cluster/README.md passes the checks siclip makes before
any work, run the way the job would run them. No Ray, no cluster: the cluster is modelled.

For each command: the upload Ray makes of ``--working-dir .`` (the repo's files minus git-ignored ones and
the ``excludes`` of ``--runtime-env``) becomes the job's working dir, with ``RAY_JOB_CONFIG_JSON_ENV_VAR``
naming it as Ray does; ``main(argv)`` runs the command's real pre-submit path (config, overrides, paths
against the upload and the head's filesystem), and the run folder check of a cluster of the section's
shape (several nodes that can grow; what every node mounts). Only the final ``launch`` / ``run_sweep`` /
``run_pipeline`` is replaced, by a stub that stops there. The head's filesystem: ``/data`` is mapped to a
temporary folder that holds the user's files only in sections whose nodes mount it (KubeRay's PVC);
``$PWD`` (the rehearsal on one machine) is a checkout whose ``runs/demo`` ``siclip demo --quick`` made.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
README = REPO / "cluster" / "README.md"
TUNE_README = REPO / "tune" / "README.md"


@dataclass(frozen=True)
class ClusterModel:
    mounted: tuple[str, ...]
    """Absolute prefixes every node mounts (shared storage holding the user's data), as written in the docs."""
    nodes: int
    can_grow: bool


SECTIONS = {
    "Jobs": ClusterModel(mounted=(), nodes=2, can_grow=True),  # "every input and output on S3"
    "Rehearse locally": ClusterModel(mounted=("$PWD",), nodes=1, can_grow=False),
    "AWS with the Ray cluster launcher": ClusterModel(mounted=(), nodes=2, can_grow=True),  # no shared FS
    "Kubernetes with KubeRay": ClusterModel(mounted=("/data",), nodes=2, can_grow=True),  # the RWX PVC
}


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(section, the ``ray job submit`` options, the siclip argv) for every job in the READMEs' bash blocks
    (tune/README.md's cluster sweep is judged as a job of cluster/README.md's "Jobs" section)."""
    found = []
    sections = re.split(r"^## ", README.read_text(), flags=re.M)[1:]
    tune_jobs = [
        s for s in re.split(r"^## ", TUNE_README.read_text(), flags=re.M)[1:] if "ray job submit" in s
    ]
    for section in sections + ["Jobs\n" + s for s in tune_jobs]:
        title = section.splitlines()[0].split(" (")[0].split(":")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", section, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0]
                if " -- siclip " in line:
                    submit, command = line.split(" -- ", 1)
                    found.append((title, submit, shlex.split(command)))
    return found


COMMANDS = documented_commands()


def _runtime_env_excludes(submit: str) -> list[str]:
    match = re.search(r"--runtime-env (\S+)", submit)
    if not match and "$RAY" in submit:  # the Jobs section's RAY=... variable
        match = re.search(r"--runtime-env (\S+)", README.read_text().split('RAY="', 1)[1].split('"', 1)[0])
    if not match:
        return []
    return list(yaml.safe_load((REPO / match[1]).read_text()).get("excludes", []))


def _excluded(path: str, patterns: list[str]) -> bool:
    parts = path.split("/")
    for pattern in patterns:
        if pattern.endswith("/"):  # a folder at any depth, as .gitignore reads it
            name = pattern.rstrip("/")
            if "/" in name:
                if path.startswith(name + "/"):
                    return True
            elif name in parts[:-1]:
                return True
        elif any(fnmatch.fnmatch(p, pattern) for p in parts) or fnmatch.fnmatch(path, pattern):
            return True
    return False


def _upload(into: Path, excludes: list[str]) -> Path:
    """What ``--working-dir .`` uploads: files git does not ignore, minus the runtime env's excludes."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file() and not _excluded(rel, excludes):
            (into / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, into / rel)
    return into


def _on_head(text: str, roots: dict[str, Path]) -> str:
    """Paths as the modelled head sees them: ``/data`` and ``$PWD`` under the test's folders."""
    text = text.replace("$PWD", str(roots["$PWD"]))
    return re.sub(r"(?<![\w.:/-])/data(?=/)", str(roots["/data"]), text)


def _provide_user_files(cfg: Any, prefixes: list[Path]) -> None:
    """The user's data on the mounted storage: every configured path under ``prefixes`` exists."""
    from braceexpand import braceexpand

    from siclip.config import to_dict

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(node, list | tuple):
            for v in node:
                walk(v, key)
        elif isinstance(node, str) and any(node.startswith(str(p) + "/") for p in prefixes):
            for path in map(Path, braceexpand(node)):
                if key.endswith("_dir"):
                    path.mkdir(parents=True, exist_ok=True)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()

    walk(to_dict(cfg), "")


class _WouldStart(Exception):
    pass


def _run_presubmit(
    argv: list[str],
    model: ClusterModel,
    roots: dict[str, Path],
    upload: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[int, str]:
    import siclip.data.pipeline as pipeline
    import siclip.ray_session as ray_session
    import siclip.train.launch as launch
    from siclip import config as config_module
    from siclip.cli import main
    from siclip.preflight import check_shared_run_folder

    mounted = [roots[m] for m in model.mounted]
    mounts = "\n".join(["/dev/root / ext4 rw 0 0", *(f"server:/x {p} nfs4 rw 0 0" for p in mounted)])

    def cluster_storage(cfg: Any) -> None:  # what train and tune check once Ray is up, on this cluster
        check_shared_run_folder(cfg, nodes=model.nodes, can_add_nodes=model.can_grow, mounts=mounts)
        raise _WouldStart

    def would_start(*_: Any, **__: Any) -> None:
        raise _WouldStart

    real_load = config_module.load_config

    def load_and_provide(*args: Any, **kwargs: Any) -> Any:
        cfg = real_load(*args, **kwargs)
        _provide_user_files(cfg, mounted)
        return cfg

    monkeypatch.setattr("siclip.cli.load_config", load_and_provide)
    # these read the user's data and run folder (on S3 here): the cluster has them, the test does not
    monkeypatch.setattr(launch, "resolve_max_steps", lambda *a, **k: 1)
    monkeypatch.setattr(launch, "check_resume_compatible", lambda *a, **k: None)
    monkeypatch.setattr(launch, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(ray_session, "init_ray", lambda *a, **k: None)  # the sweep's
    monkeypatch.setattr(launch, "check_cluster_storage", cluster_storage)
    monkeypatch.setattr(pipeline, "run_pipeline", would_start)  # the data build checks nothing more first
    monkeypatch.chdir(upload)
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": str(upload)}})
    )
    try:
        code = main([_on_head(a, roots) for a in argv[1:]])
    except _WouldStart:
        return 0, ""
    return code, "exit before the work started"


def test_the_readme_documents_jobs_in_every_section() -> None:
    assert {s for s, _, _ in COMMANDS} == set(SECTIONS)
    assert {tuple(c[:2]) for _, _, c in COMMANDS} >= {
        ("siclip", "train"),
        ("siclip", "data"),
        ("siclip", "tune"),
    }


@pytest.mark.parametrize(
    ("section", "submit", "argv"), COMMANDS, ids=[f"{s}: {' '.join(c[1:3])}" for s, _, c in COMMANDS]
)
def test_documented_command_passes_the_presubmit_check(
    section: str,
    submit: str,
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    roots = {"/data": tmp_path / "head" / "data", "$PWD": tmp_path / "checkout"}
    upload = _upload(tmp_path / "upload", _runtime_env_excludes(submit))
    for rel in ("configs", "data", "tune"):  # the recipes' own /data paths, as the head resolves them
        for f in (upload / rel).rglob("*.yaml") if (upload / rel).is_dir() else ():
            f.write_text(_on_head(f.read_text(), roots))
    code, why = _run_presubmit(argv, SECTIONS[section], roots, upload, monkeypatch)
    assert code == 0, f"{section}: `{shlex.join(argv)}` fails: {capsys.readouterr().err.strip() or why}"


def test_the_model_catches_what_a_job_would_refuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The recipe as it stands (relative runs_dir, excluded weights, /data nobody mounts) is refused."""
    roots = {"/data": tmp_path / "head" / "data", "$PWD": tmp_path / "checkout"}
    upload = _upload(tmp_path / "upload", _runtime_env_excludes("$RAY"))
    argv = ["siclip", "train", "--config", "configs/siclip_s0_cc12m.yaml"]
    code, _ = _run_presubmit(argv, SECTIONS["Jobs"], roots, upload, monkeypatch)
    assert code == 2 and "siclip: error:" in capsys.readouterr().err
    assert not _excluded("configs/siclip_s0_cc12m.yaml", _runtime_env_excludes("$RAY"))
    assert _excluded("checkpoints/mobileclip_s0.pt", ["*.pt"]) and _excluded("a/runs/x", ["runs/"])
