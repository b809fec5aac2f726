"""The data build's pre-flight checks, without a Ray cluster: GPUs and CPUs counted over every actor pool, and
on an autoscaling cluster whose GPU workers are at zero, a request and a bounded wait instead of a refusal."""

from __future__ import annotations

import time

import pytest
import ray
import ray.autoscaler.sdk as autoscaler_sdk

from siclip import ray_compat
from siclip.config import ConfigError, from_dict
from siclip.data.pipeline import check_resources
from siclip.ray_compat import NO_AUTOSCALER, Autoscaler


def _cfg(**caption: object) -> object:
    return from_dict({"caption": {"num_gpus_per_actor": 1.0, "num_cpus_per_actor": 1.0, **caption}})


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    resources = {"CPU": 16.0, "GPU": 1.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    monkeypatch.setattr(ray_compat, "autoscaler", lambda: NO_AUTOSCALER)  # what is there is all there is
    return resources


def test_one_pool_fits_one_gpu(cluster: dict[str, float]) -> None:
    check_resources(_cfg(), 1.0)  # type: ignore[arg-type]


def test_captioner_and_teacher_pools_need_their_gpus_together(cluster: dict[str, float]) -> None:
    with pytest.raises(RuntimeError, match=r"captioner and teacher pools need at least .* = 2 GPUs"):
        check_resources(_cfg(teacher_embeddings=True), 1.0)  # type: ignore[arg-type]
    cluster["GPU"] = 2.0
    check_resources(_cfg(teacher_embeddings=True), 1.0)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"= 4 GPUs but the Ray cluster has 2"):
        check_resources(_cfg(teacher_embeddings=True, min_actors=2, num_actors=4), 1.0)  # type: ignore[arg-type]


def test_a_fractional_teacher_shares_the_captioners_gpu(cluster: dict[str, float]) -> None:
    """caption.teacher_gpus_per_actor: the light teacher forward packs beside a captioner on one GPU."""
    cluster["GPU"] = 1.5
    check_resources(_cfg(teacher_embeddings=True, teacher_gpus_per_actor=0.5), 1.0)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="teacher_gpus_per_actor") as info:
        check_resources(_cfg(teacher_embeddings=True, teacher_gpus_per_actor=0.75), 1.0)  # type: ignore[arg-type]
    assert "1.75 GPUs" in str(info.value) and "has 1.5" in str(info.value)


def test_a_teacher_share_between_minus_one_and_zero_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"caption\.teacher_gpus_per_actor: got -0\.5"):
        _cfg(teacher_gpus_per_actor=-0.5)


def test_pools_leave_a_cpu_for_reading(cluster: dict[str, float]) -> None:
    cluster.update(CPU=4.0, GPU=8.0)
    with pytest.raises(RuntimeError, match="leaves no CPU for reading shards"):
        check_resources(_cfg(teacher_embeddings=True, num_cpus_per_actor=2.0), 1.0)  # type: ignore[arg-type]


def test_min_actors_above_num_actors_is_a_config_error() -> None:
    from siclip.config import ConfigError, load_config

    with pytest.raises(
        ConfigError, match=r"^caption.min_actors: got 3; allowed: at most caption.num_actors \(2\)$"
    ):
        load_config(None, ["caption.min_actors=3", "caption.num_actors=2"], check_files=False)


def test_a_cpu_only_cluster_captions_on_cpus(cluster: dict[str, float]) -> None:
    """Ray lists no "GPU" key on a cluster without GPUs: that is 0 GPUs, not an error."""
    del cluster["GPU"]
    check_resources(_cfg(num_gpus_per_actor=0.0), 1.0)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError) as info:
        check_resources(_cfg(), 1.0)  # type: ignore[arg-type]
    message = str(info.value)  # names the key, what the pool needs, what the cluster has, and the way out
    assert message.startswith("caption.num_gpus_per_actor=1") and "\n" not in message
    assert "= 1 GPUs but the Ray cluster has 0" in message and "0: caption on CPUs" in message


def test_a_cluster_listing_no_cpus_has_none_to_give(cluster: dict[str, float]) -> None:
    del cluster["CPU"]
    with pytest.raises(RuntimeError) as info:
        check_resources(_cfg(), 0.5)  # type: ignore[arg-type]
    assert str(info.value) == (
        "caption.num_cpus_per_actor=1 leaves no CPU for reading shards: the cluster has 0 CPUs, the captioner "
        "pool needs 1 x 1 x 1 = 1 and a read task 0.5. Lower caption.num_cpus_per_actor or caption.min_actors."
    )


class _Autoscaler:
    """A fake autoscaling cluster: GPU nodes come up after ``boot_polls`` looks, if ever; time is simulated."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, *, most: dict[str, float] | None, boot_polls: int | None
    ) -> None:
        self.now, self.looks, self.requests = 0.0, 0, []
        self.boot_polls, self.sleeps = boot_polls, []
        monkeypatch.setattr(ray_compat, "autoscaler", lambda: Autoscaler(present=True, most=most))
        monkeypatch.setattr(ray, "cluster_resources", self.resources)
        monkeypatch.setattr(time, "monotonic", lambda: self.now)
        monkeypatch.setattr(time, "sleep", self.sleep)
        monkeypatch.setattr(autoscaler_sdk, "request_resources", lambda **kw: self.requests.append(kw))

    def resources(self) -> dict[str, float]:
        self.looks += 1
        up = self.boot_polls is not None and self.looks > self.boot_polls
        return {"CPU": 4.0 + (8.0 if up else 0.0), **({"GPU": 2.0} if up else {})}  # the head has no GPU

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_gpu_workers_at_zero_are_requested_and_waited_for(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    scaler = _Autoscaler(monkeypatch, most={"CPU": 100.0, "GPU": 8.0}, boot_polls=4)
    check_resources(_cfg(min_actors=2, num_actors=8, worker_start_timeout_s=600), 1.0)  # type: ignore[arg-type]
    assert "caption.worker_start_timeout_s" in capsys.readouterr().out  # it says it waits, and for how long
    asked, cleared = scaler.requests
    assert sum(b.get("GPU", 0) for b in asked["bundles"]) == 2  # min_actors x num_gpus_per_actor
    assert cleared == {"bundles": []}  # no standing request once the nodes are there
    assert 0 < scaler.now < 600


def test_the_autoscaler_is_asked_for_each_pools_own_gpu_share(monkeypatch: pytest.MonkeyPatch) -> None:
    scaler = _Autoscaler(monkeypatch, most={"CPU": 100.0, "GPU": 8.0}, boot_polls=2)
    cfg = _cfg(min_actors=1, num_actors=2, teacher_embeddings=True, teacher_gpus_per_actor=0.25)
    check_resources(cfg, 1.0)  # type: ignore[arg-type]
    asked = scaler.requests[0]["bundles"]
    assert sorted(b.get("GPU", 0) for b in asked if "GPU" in b) == [0.25, 1.0]


def test_an_autoscaler_whose_limits_ray_does_not_publish_is_asked_and_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scaler = _Autoscaler(monkeypatch, most=None, boot_polls=3)  # Ray 2.60: node types named, sizes not
    check_resources(_cfg(min_actors=2, num_actors=8, worker_start_timeout_s=600), 1.0)  # type: ignore[arg-type]
    assert sum(b.get("GPU", 0) for b in scaler.requests[0]["bundles"]) == 2
    assert scaler.requests[-1] == {"bundles": []} and 0 < scaler.now < 600


def test_gpu_workers_that_never_come_fail_naming_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    scaler = _Autoscaler(monkeypatch, most={"CPU": 100.0, "GPU": 8.0}, boot_polls=None)
    with pytest.raises(ConfigError, match=r"^caption\.worker_start_timeout_s: 120 s passed") as info:
        check_resources(_cfg(worker_start_timeout_s=120), 1.0)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    assert 120 <= scaler.now < 130 and scaler.requests[-1] == {"bundles": []}


def test_an_autoscaler_too_small_for_the_pools_is_refused_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    scaler = _Autoscaler(monkeypatch, most={"CPU": 100.0, "GPU": 1.0}, boot_polls=None)
    with pytest.raises(RuntimeError, match=r"= 2 GPUs but the Ray cluster has 0"):
        check_resources(_cfg(min_actors=2, num_actors=2), 1.0)  # type: ignore[arg-type]
    assert scaler.requests == [] and scaler.sleeps == []
