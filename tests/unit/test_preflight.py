"""Paths a cluster cannot see fail before any work, in one line naming the key and what to set (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest

from siclip.config import ConfigError, SiclipCfg, apply_overrides, from_dict, to_dict
from siclip.preflight import check_job_paths, check_shared_run_folder, filesystem_type

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "siclip_s0_cc12m.yaml"
TRAIN = ("data", "model", "teacher", "eval", "train")
JOB = "gcs://_ray_pkg_0123.zip"


def _cfg(*overrides: str) -> SiclipCfg:
    from siclip.config import load_config

    return load_config(RECIPE, list(overrides), check_files=False)


def _one_line(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_outside_a_job_nothing_is_checked(tmp_path: Path) -> None:
    check_job_paths(_cfg(), job_working_dir=None, sections=TRAIN, cwd=str(tmp_path))


def test_the_documented_submit_names_each_path_the_cluster_cannot_see(tmp_path: Path) -> None:
    # the job's upload: tracked files only; the weights (*.pt) are excluded, /data is not on this head
    (tmp_path / "configs").mkdir()
    with pytest.raises(ConfigError) as exc:
        check_job_paths(_cfg(), job_working_dir=JOB, sections=TRAIN, cwd=str(tmp_path))
    line = _one_line(exc)
    assert line.startswith("data.train_shards: got '/data/cc12m_syn/") and "s3://BUCKET" in line

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"")
    ok_data = [f"data.train_shards=[{shards}/00000.tar]", "eval.zeroshot_dir=", "eval.classnames_file="]
    ok_data += ["eval.retrieval_shards=[]"]
    with pytest.raises(ConfigError) as exc:
        check_job_paths(_cfg(*ok_data), job_working_dir=JOB, sections=TRAIN, cwd=str(tmp_path))
    line = _one_line(exc)
    assert line.startswith("model.source: got 'checkpoints/mobileclip_s0.pt', not in the job's upload")
    assert "*.pt" in line

    weights = ["model.source=s3://b/mobileclip_s0.pt", "teacher.source=s3://b/mobileclip_s0.pt"]
    with pytest.raises(ConfigError) as exc:
        check_job_paths(
            _cfg(*ok_data, *weights, "train.runs_dir=runs"),
            job_working_dir=JOB,
            sections=TRAIN,
            cwd=str(tmp_path),
        )
    line = _one_line(exc)
    assert line.startswith("train.runs_dir: got 'runs', a folder inside this job's temporary copy")

    for runs in ("s3://b/runs", str(tmp_path / "shared-runs")):
        check_job_paths(
            _cfg(*ok_data, *weights, f"train.runs_dir={runs}"),
            job_working_dir=JOB,
            sections=TRAIN,
            cwd=str(tmp_path),
        )


def test_a_relative_input_that_was_uploaded_is_fine(tmp_path: Path) -> None:
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "space.yaml").write_text("space: {}\n")
    cfg = from_dict(
        apply_overrides(to_dict(SiclipCfg()), ["tune.space_file=tune/space.yaml", "train.runs_dir=/x"])
    )
    check_job_paths(cfg, job_working_dir=JOB, sections=("tune", "train"), cwd=str(tmp_path))
    # caption.output_dir is relative by default, but `siclip train` does not write it
    check_job_paths(cfg, job_working_dir=JOB, sections=("train",), cwd=str(tmp_path))
    with pytest.raises(ConfigError, match=r"^caption\.output_dir: got 'data/cc12m_syn'"):
        check_job_paths(cfg, job_working_dir=JOB, sections=("caption",), cwd=str(tmp_path))


MOUNTS = """\
overlay / overlay rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
fs-1.efs.us-west-2.amazonaws.com:/ /mnt/efs nfs4 rw,vers=4.1 0 0
s3fs /mnt/s3 fuse.s3fs rw 0 0
"""


def test_the_mount_holding_a_path_is_found() -> None:
    assert filesystem_type("/mnt/efs/siclip/runs", MOUNTS) == "nfs4"
    assert filesystem_type("/mnt/efsx", MOUNTS) == "overlay"  # a prefix of the name is not the mount
    assert filesystem_type("/home/ray/runs", MOUNTS) == "overlay"
    assert filesystem_type("/mnt/s3/runs", MOUNTS) == "fuse.s3fs"


def test_a_node_local_run_folder_is_refused_on_a_cluster_that_has_or_can_get_more_nodes() -> None:
    def cfg(runs: str) -> SiclipCfg:
        return from_dict(apply_overrides(to_dict(SiclipCfg()), [f"train.runs_dir={runs}"]))

    check_shared_run_folder(cfg("/home/ray/runs"), nodes=1, can_add_nodes=False, mounts=MOUNTS)  # one machine
    for shared in ("/mnt/efs/siclip/runs", "/mnt/s3/runs", "s3://bucket/runs"):
        check_shared_run_folder(cfg(shared), nodes=3, can_add_nodes=True, mounts=MOUNTS)
    with pytest.raises(
        ConfigError, match=r"^train\.runs_dir: got '/home/ray/runs', on a node-local overlay disk"
    ):
        check_shared_run_folder(cfg("/home/ray/runs"), nodes=1, can_add_nodes=True, mounts=MOUNTS)
    with pytest.raises(ConfigError, match=r"node-local tmpfs disk of a cluster with 2 node\(s\)"):
        check_shared_run_folder(cfg("/tmp/runs"), nodes=2, can_add_nodes=False, mounts=MOUNTS)
