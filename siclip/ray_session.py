"""Connecting to Ray, the same way for every stage (train, data build, tune)."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from siclip.config import RayCfg
from siclip.ray_compat import PG_CLEANER_LOGGER

__all__ = ["init_ray", "quiet_without_dashboard"]

# Ray Train's PlacementGroupCleaner asks the dashboard's State API every second whether the controller is
# alive; with no dashboard each ask fails with a warning, for the whole run. It can never act then anyway.
_PG_CLEANER_LOGGER = PG_CLEANER_LOGGER


def quiet_without_dashboard() -> None:
    """Worker set-up hook for a local Ray started without a dashboard: mute the cleaner's warnings."""
    logging.getLogger(_PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def init_ray(ray_cfg: RayCfg) -> None:
    """Connect to ``ray.address`` / ``RAY_ADDRESS`` if given, else start a local Ray (once per process)."""
    if ray.is_initialized():
        return
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        return
    kwargs: dict[str, Any] = {"include_dashboard": ray_cfg.include_dashboard}
    if not ray_cfg.include_dashboard:
        kwargs["runtime_env"] = {"worker_process_setup_hook": "siclip.ray_session.quiet_without_dashboard"}
    if ray_cfg.num_cpus:
        kwargs["num_cpus"] = ray_cfg.num_cpus
    if ray_cfg.object_store_memory_mb:
        kwargs["object_store_memory"] = ray_cfg.object_store_memory_mb * 1024 * 1024
    ray.init(address="local", **kwargs)
