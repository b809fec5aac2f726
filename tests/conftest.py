"""Shared test fixtures: one small local Ray session for all integration tests, tiny demo data on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WDS_SECURE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need CUDA: on a machine without it they are skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the whole test session (about 8 s and 1 GB to start)."""
    from siclip.config import RayCfg
    from siclip.ray_session import init_ray
    from tests.helpers import AVX2_KERNELS

    # Ray's processes (raylet, Train workers, Data actors) inherit the environment ray.init starts them in:
    # they run oneDNN's AVX2 kernels, as on an AVX2-only CPU, so a kernel that crashes there fails the test
    # that trained through Ray. This process keeps its own kernels (the variable is restored before any
    # convolution runs here; oneDNN reads it once, at its first one).
    with pytest.MonkeyPatch.context() as env:
        for key, value in AVX2_KERNELS.items():
            env.setenv(key, os.environ.get(key) or value)
        init_ray(RayCfg(num_cpus=2, object_store_memory_mb=256))  # as `siclip train` starts it (no dashboard)
    yield
    # left running for other tests; pytest's exit shuts it down


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]
