"""Before any captioning: the output must be somewhere every writer can write and the driver can see.

A machine-local ``caption.output_dir`` on a cluster of several nodes, or one an autoscaler can grow, is
refused (actors on other nodes would write shards the manifest and a rerun never see); an output nobody can
write is found by writing and deleting a probe file, not after every shard was captioned and discarded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray

import siclip.data.pipeline as pipeline
from siclip import preflight, ray_compat
from siclip.config import ConfigError, from_dict
from siclip.data.commit import probe_output
from tests.data_fixtures import good_sample, write_tar
from tests.s3_server import S3Server, s3_server  # noqa: F401  (the fixture)


class _Reached(Exception):
    """The build got past the checks under test (to the GPU/CPU check)."""


def _cfg(tmp_path: Path, out: str) -> Any:
    write_tar(tmp_path / "00000.tar", good_sample("a", 0))
    return from_dict(
        {
            "caption": {
                "input_shards": [str(tmp_path / "00000.tar")],
                "output_dir": out,
                "model": "siclip-tiny-coca",
                "source": "",
            }
        }
    )


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A fake cluster: how many nodes are alive, what the autoscaler may add, the output's filesystem."""
    state: dict[str, Any] = {"nodes": 1, "max": {}, "fs": "ext4"}
    monkeypatch.setattr("siclip.ray_session.init_ray", lambda *_: None)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}] * state["nodes"] + [{"Alive": False}])
    monkeypatch.setattr(
        ray_compat,
        "autoscaler",
        lambda: ray_compat.Autoscaler(present=bool(state["max"]), most=state["max"] or None),
    )
    monkeypatch.setattr(preflight, "filesystem_type", lambda path, mounts=None: state["fs"])

    def reached() -> dict[str, float]:
        raise _Reached

    monkeypatch.setattr(ray, "cluster_resources", reached)
    return state


@pytest.mark.parametrize(("nodes", "grows"), [(3, False), (1, True)])
def test_a_node_local_output_is_refused_on_a_cluster_of_several_nodes(
    tmp_path: Path, cluster: dict[str, Any], nodes: int, grows: bool
) -> None:
    cluster["nodes"], cluster["max"] = nodes, ({"GPU": 8.0} if grows else {})
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError) as info:
        pipeline.run_pipeline(_cfg(tmp_path, out), progress=False)
    message = str(info.value)
    assert (
        message.startswith(f"caption.output_dir: got {out!r}, on a node-local ext4 disk")
        and "\n" not in message
    )
    assert f"{nodes} node(s)" in message and ("can grow" in message) == grows


def test_shared_or_single_node_outputs_pass(tmp_path: Path, cluster: dict[str, Any]) -> None:
    out = str(tmp_path / "out")
    with pytest.raises(_Reached):  # one fixed node: its own disk is fine
        pipeline.run_pipeline(_cfg(tmp_path, out), progress=False)
    cluster["nodes"], cluster["fs"] = 4, "nfs4"
    with pytest.raises(_Reached):  # several nodes, a mount they share
        pipeline.run_pipeline(_cfg(tmp_path, out), progress=False)


def test_an_output_nobody_can_write_stops_the_build_before_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("the build started")

    monkeypatch.setattr("siclip.ray_session.init_ray", refuse)
    (tmp_path / "a-file").write_text("not a folder")
    out = str(tmp_path / "a-file" / "cc12m_syn")  # cannot be made, even by root
    with pytest.raises(ConfigError) as info:
        pipeline.run_pipeline(_cfg(tmp_path, out), progress=False)
    message = str(info.value)
    assert message.startswith(f"caption.output_dir: got {out!r}; cannot write there") and "\n" not in message
    assert "NotADirectoryError" in message


def test_the_probe_leaves_nothing_and_names_an_s3_failure(s3_server: S3Server) -> None:  # noqa: F811
    fs = s3_server.filesystem()
    fs.mkdir("outputs")
    assert probe_output("s3://outputs/cc12m_syn") == ""
    assert fs.ls("outputs", refresh=True) == []  # written and deleted
    assert "bucket does not exist" in probe_output("s3://no-such-bucket/cc12m_syn")
