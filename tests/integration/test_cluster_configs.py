"""The cluster recipes in cluster/ parse, validate and agree with the repo: no cloud, no Ray session.

Ray's own launcher validation (schema + defaults merge) runs on the AWS config; the KubeRay manifests are
checked for the fields that matter to siclip (GPU limits and tolerations, token auth, ClusterIP-only
dashboard, shared storage, RayJob lifecycle); every ``siclip`` entrypoint must name a config that exists
and overrides that the config schema accepts; the job runtime env must pin exactly pyproject's stack.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from packaging.requirements import Requirement

from siclip.config import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
IMAGE_WORKDIR = "/home/ray/siclip"  # cluster/Dockerfile's WORKDIR: the repo root inside the image


def _docs(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d is not None]
    assert docs, f"{name} is empty"
    return docs


def _one(name: str) -> dict[str, Any]:
    (doc,) = _docs(name)
    return doc


def _uncommented(path: Path) -> str:
    return "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())


def _check_siclip_command(argv: list[str], *, base: Path = REPO) -> None:
    """``siclip <cmd> [sub] --config FILE key=value...``: FILE exists, and the overrides are valid keys."""
    assert argv[0] == "siclip", argv
    from siclip.cli import main

    subcommand = argv[1 : argv.index("--config")]
    with pytest.raises(SystemExit) as help_exit:  # the subcommand exists (argparse exits 0 after --help)
        main([*subcommand, "--help"])
    assert help_exit.value.code == 0, f"siclip {' '.join(subcommand)} is not a command"
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv[argv.index("--config") + 2 :] if "=" in a]
    path = base / config
    assert path.is_file(), f"{config} is referenced by a cluster recipe but not in the repo"
    # Types, ranges and unknown keys; paths are the cluster's, not this machine's, except recipes that
    # travel with the repo (a space file, a data recipe).
    load_config(path, overrides, check_files=False)
    for value in (o.split("=", 1)[1] for o in overrides):
        if value.startswith(("configs/", "tune/", "data/")):
            assert (base / value).is_file(), f"{value} is named by a cluster recipe but not in the repo"


# ------------------------------------------------------------------------------------------ every file
@pytest.mark.parametrize("name", sorted(p.name for p in CLUSTER.glob("*.yaml")))
def test_every_yaml_parses_and_exposes_nothing_on_all_interfaces(name: str) -> None:
    _docs(name)
    assert "0.0.0.0" not in _uncommented(CLUSTER / name), f"{name} binds or opens something to 0.0.0.0"


def test_the_expected_recipes_exist() -> None:
    names = {p.name for p in CLUSTER.iterdir()}
    want = {"README.md", "runtime_env.yaml", "aws_gpu.yaml", "kuberay_raycluster.yaml", "kuberay_rayjob.yaml"}
    assert want <= names


# ------------------------------------------------------------------------------------------ runtime env
def test_runtime_env_is_valid_and_pins_pyproject_stack_minus_ray() -> None:
    from ray.runtime_env import RuntimeEnv

    env = _one("runtime_env.yaml")
    RuntimeEnv(**env)  # Ray's own field validation
    assert "working_dir" not in env, "the working dir comes from --working-dir on the command line"
    assert env["env_vars"]["WDS_SECURE"] == "1"

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]

    def norm(spec: str) -> tuple[str, str]:
        req = Requirement(spec)
        return req.name.lower().replace("_", "-"), str(req.specifier)

    want = {norm(d) for d in deps if Requirement(d).name.lower() != "ray"}
    got = {norm(p) for p in env["pip"]["packages"]}
    assert got == want
    assert not any(name == "ray" for name, _ in got), "never reinstall Ray per job"


# ------------------------------------------------------------------------------------------ AWS launcher
def test_aws_config_passes_ray_launcher_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _one("aws_gpu.yaml")
    prepared = prepare_config(copy.deepcopy(raw))  # merges the AWS defaults; no cloud calls
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    # Our start commands replace the defaults (whose dashboard listens on 0.0.0.0).
    assert prepared["head_start_ray_commands"] == raw["head_start_ray_commands"]
    assert prepared["worker_start_ray_commands"] == raw["worker_start_ray_commands"]


def test_aws_config_is_cpu_head_plus_single_gpu_workers() -> None:
    cfg = _one("aws_gpu.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and all(w["resources"]["GPU"] == 1 for w in workers)
    for w in workers:
        assert re.fullmatch(r"g[56]\.\d*x?large", w["node_config"]["InstanceType"])
        assert 0 <= w["min_workers"] <= w["max_workers"] <= cfg["max_workers"]
    # Enough CPUs per GPU worker for the paper config's Ray Train worker.
    paper = REPO / "configs/siclip_s0_cc12m.yaml"
    if paper.is_file():
        need = load_config(paper, check_files=False).train.cpus_per_worker
        assert all(w["resources"]["CPU"] >= need for w in workers)


def test_aws_config_dashboard_auth_and_network_are_closed() -> None:
    cfg = _one("aws_gpu.yaml")
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "RAY_AUTH_MODE=token" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for rule in cfg["provider"]["security_group"]["IpPermissions"]:
        for cidr in rule.get("IpRanges", []):
            assert cidr["CidrIp"].endswith("/32"), f"{rule} admits more than one address"
        assert (rule["FromPort"], rule["ToPort"]) == (22, 22), (
            "only SSH is opened; the dashboard is tunnelled"
        )


def test_aws_config_installs_the_repo_it_mounts() -> None:
    cfg = _one("aws_gpu.yaml")
    remote, local = next((r, lo) for r, lo in cfg["file_mounts"].items() if "siclip" in r)
    assert (REPO / local / "pyproject.toml").is_file(), "file_mounts must be relative to the repo root"
    assert f"pip install -e {remote}" in cfg["setup_commands"]
    assert "rayproject/ray:" + ray.__version__ in cfg["docker"]["image"]
    assert "-py311-" in cfg["docker"]["image"]  # pyproject: requires-python ~=3.11
    assert ".gitignore" in cfg["rsync_filter"]


# ------------------------------------------------------------------------------------------ KubeRay
def _cluster_specs() -> dict[str, dict[str, Any]]:
    return {
        "RayCluster": _one("kuberay_raycluster.yaml")["spec"],
        "RayJob": _one("kuberay_rayjob.yaml")["spec"]["rayClusterSpec"],
    }


def _containers(spec: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [(g["template"]["spec"], c) for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_kinds_and_versions() -> None:
    assert {(d["apiVersion"], d["kind"]) for d in _docs("kuberay_raycluster.yaml")} == {
        ("ray.io/v1", "RayCluster")
    }
    assert {(d["apiVersion"], d["kind"]) for d in _docs("kuberay_rayjob.yaml")} == {("ray.io/v1", "RayJob")}
    for spec in _cluster_specs().values():
        assert spec["rayVersion"] == ray.__version__
    base = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert base and base.group(1) == f"rayproject/ray:{ray.__version__}-py311-gpu"


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_cluster_gpu_auth_dashboard_storage(kind: str) -> None:
    spec = _cluster_specs()[kind]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert "dashboard-host" not in spec["headGroupSpec"]["rayStartParams"]
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    pod = gpu["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])

    (pvc,) = _docs("kuberay_storage.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    images = set()
    for pod_spec, container in _containers(spec):
        images.add(container["image"])
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod_spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        # Every pod sees the same storage at the same path: Ray Train's storage_path must be shared.
        assert [(claims[n], mounts[n]) for n in claims] == [(pvc["metadata"]["name"], "/data")]
    assert len(images) == 1


def test_kuberay_images_match() -> None:
    images = {c["image"] for spec in _cluster_specs().values() for _, c in _containers(spec)}
    assert len(images) == 1


def test_rayjob_runs_the_paper_recipe_and_cleans_up() -> None:
    job = _one("kuberay_rayjob.yaml")["spec"]
    assert job["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode"}
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] > 0
    from ray.runtime_env import RuntimeEnv

    renv = yaml.safe_load(job["runtimeEnvYAML"])
    assert renv["working_dir"] == IMAGE_WORKDIR
    # the working dir exists only inside the image; validate everything else with Ray's own checker
    RuntimeEnv(**{k: v for k, v in renv.items() if k != "working_dir"})
    argv = shlex.split(job["entrypoint"])
    assert argv[:4] == ["siclip", "train", "--config", "configs/siclip_s0_cc12m.yaml"]
    overrides = dict(a.split("=", 1) for a in argv[4:])
    assert overrides["train.runs_dir"].startswith("/data/"), "runs must go to the shared volume"
    _check_siclip_command(argv)


# ------------------------------------------------------------------------------------------ README
def _readme_commands() -> list[list[str]]:
    text = (CLUSTER / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    joined = "\n".join(b.replace("\\\n", " ") for b in blocks)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0]
        if " -- siclip " in line:
            commands.append(shlex.split(line.split(" -- ", 1)[1]))
    return commands


def test_readme_jobs_name_real_configs_and_valid_overrides() -> None:
    commands = _readme_commands()
    assert {tuple(c[:2]) for c in commands} >= {("siclip", "train"), ("siclip", "data"), ("siclip", "tune")}
    missing = sorted({c for c in (a[a.index("--config") + 1] for a in commands) if not (REPO / c).is_file()})
    assert not missing, f"cluster/README.md names configs that are not in the repo: {missing}"
    for argv in commands:
        _check_siclip_command(argv)


def test_readme_submits_to_loopback_with_the_runtime_env() -> None:
    text = (CLUSTER / "README.md").read_text()
    for address in re.findall(r"--address ([^\s`]+)", text):
        assert address == "http://127.0.0.1:8265"
    assert "--runtime-env cluster/runtime_env.yaml" in text
    assert "RAY_AUTH_MODE=token" in text


# ----------------------------------------------------------------------- network policy, ports, GPU pods, zones
def _pod_labels(spec: dict[str, Any]) -> list[dict[str, str]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [g["template"]["metadata"]["labels"] for g in groups]


def test_kuberay_networkpolicy_admits_ray_ports_only_from_the_cluster_s_pods() -> None:
    (policy,) = _docs("kuberay_networkpolicy.yaml")
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for spec in _cluster_specs().values():  # the policy covers every Ray pod of both recipes
        for labels in _pod_labels(spec):
            assert selector.items() <= labels.items(), labels
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    own, job_api, metrics = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": selector}}]}  # Ray's ports: own pods only
    assert job_api["ports"] == [{"protocol": "TCP", "port": 8265}]  # everything else only the job API
    peers = job_api["from"]
    assert any("namespaceSelector" in p and "podSelector" not in p for p in peers)  # the operator
    job_name = _one("kuberay_rayjob.yaml")["metadata"]["name"]
    submitter = [p["podSelector"]["matchLabels"] for p in peers if "podSelector" in p]
    assert submitter == [{"batch.kubernetes.io/job-name": job_name}]  # K8sJobMode's submitter Job
    # Prometheus scrapes Ray's metrics port from one named namespace, and nothing else from there
    assert metrics["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert [set(p) for p in metrics["from"]] == [{"namespaceSelector"}]


def test_networkpolicy_namespaces_are_parameters_the_readme_sets() -> None:
    """The README's sed replaces the operator and monitoring namespaces, and only them."""
    text = (CLUSTER / "README.md").read_text()
    (sed,) = [
        line for line in text.splitlines() if line.startswith("sed ") and "kuberay_networkpolicy" in line
    ]
    edits = re.findall(r'-e "s/(.+?)/(.+?)/"', sed)
    assert len(edits) == 2
    source = (CLUSTER / "kuberay_networkpolicy.yaml").read_text()
    values = {"$OPERATOR_NS": "kuberay-system", "$MONITORING_NS": "prom"}
    out = source
    for pattern, repl in edits:  # sed's basic regex here is Python's too (": name$", per line)
        out = re.sub(pattern, ": " + values[repl.split(": ", 1)[1]], out, flags=re.M)
    (policy,) = [d for d in yaml.safe_load_all(out) if d]
    namespaces = [
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for rule in policy["spec"]["ingress"]
        for p in rule.get("from", [])
        if "namespaceSelector" in p
    ]
    assert namespaces == ["kuberay-system", "prom"]
    assert len(out.splitlines()) == len(source.splitlines())


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_lists_no_ray_client_port_and_says_what_kuberay_binds(kind: str) -> None:
    spec = _cluster_specs()[kind]
    ports = [p["containerPort"] for _, c in _containers(spec) for p in c.get("ports", [])]
    assert 10001 not in ports and {6379, 8265} <= set(ports)
    text = (
        CLUSTER / ("kuberay_raycluster.yaml" if kind == "RayCluster" else "kuberay_rayjob.yaml")
    ).read_text()
    assert "--dashboard-host=0.0.0.0" in text or "on 0.0.0.0 inside the pod" in text  # the truth, in comments
    assert "binds it to the pod IP" not in text and "binds the dashboard to the pod IP" not in text


def test_rayjob_frees_its_gpu_pod_soon_after_the_job_and_asks_for_gpus() -> None:
    job = _one("kuberay_rayjob.yaml")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and 0 < job["ttlSecondsAfterFinished"] <= 600
    assert "train.use_gpu=yes" in shlex.split(job["entrypoint"])
    recipe = load_config(REPO / "configs" / "siclip_s0_cc12m.yaml", check_files=False)
    assert recipe.train.use_gpu == "yes" and recipe.train.worker_start_timeout_s >= 600


def test_aws_workers_share_one_zone_and_have_an_s3_instance_profile() -> None:
    cfg = _one("aws_gpu.yaml")
    zones = [z.strip() for z in str(cfg["provider"]["availability_zone"]).split(",")]
    assert len(zones) == 1 and zones[0].startswith(cfg["provider"]["region"])
    worker = cfg["available_node_types"]["worker.gpu"]["node_config"]
    profile = worker["IamInstanceProfile"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", profile["Arn"])
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(Requirement(d).name == "s3fs" for d in deps)
    assert "s3fs" in {Requirement(p).name for p in _one("runtime_env.yaml")["pip"]["packages"]}


# --------------------------------------------------------------------------------- worker images, driver, Docker build
def test_aws_workers_name_an_ami_and_refuse_a_driver_torch_cannot_use(tmp_path: Path) -> None:
    import subprocess
    import sys

    import torch

    cfg = yaml.safe_load((CLUSTER / "aws_gpu.yaml").read_text())
    assert re.fullmatch(
        r"ami-[0-9a-f]{8,17}", cfg["available_node_types"]["worker.gpu"]["node_config"]["ImageId"]
    )
    assert ">= 580" in (CLUSTER / "aws_gpu.yaml").read_text()  # the requirement, stated where the AMI is set
    (check,) = cfg["worker_setup_commands"]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    got = subprocess.run(["bash", "-c", check], capture_output=True, text=True, env=env, timeout=120)
    if torch.cuda.is_available():
        assert got.returncode == 0, got.stderr
    else:  # this machine: what a worker on an AMI with too old a driver would print
        assert got.returncode != 0 and "580" in got.stderr and "ImageId" in got.stderr


def _dockerfile_guard() -> str:
    text = (CLUSTER / "Dockerfile").read_text().replace("\\\n", "")
    (guard,) = [line[4:] for line in text.splitlines() if line.startswith("RUN ") and "BuildKit" in line]
    return guard


@pytest.mark.parametrize("copied", [".git", ".venv", "runs"])
def test_dockerfile_stops_a_build_that_ignored_its_dockerignore(tmp_path: Path, copied: str) -> None:
    import subprocess

    ignored = (CLUSTER / "Dockerfile.dockerignore").read_text().split()
    assert copied in ignored  # what BuildKit leaves out is what the check looks for
    (tmp_path / "siclip").mkdir()
    ok = subprocess.run(["sh", "-c", _dockerfile_guard()], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / copied).mkdir()
    bad = subprocess.run(["sh", "-c", _dockerfile_guard()], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0 and "BuildKit" in bad.stderr and copied in bad.stderr
    assert "BuildKit" in (CLUSTER / "Dockerfile").read_text().split("FROM", 1)[0]  # said before the build
