"""Connecting to Ray, the same way for every stage (train, data build, tune)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any

import ray

from siclip.config import RayCfg
from siclip.ray_compat import PG_CLEANER_LOGGER, loopback_node

__all__ = ["init_ray", "make_token_private", "quiet_without_dashboard", "token_files"]


# Ray Train's PlacementGroupCleaner asks the dashboard's State API every second whether the controller is
# alive; with no dashboard each ask fails with a warning, for the whole run. It can never act then anyway.
def quiet_without_dashboard() -> None:
    """Worker set-up hook for a local Ray started without a dashboard: mute the cleaner's warnings."""
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def token_files() -> list[Path]:
    """Where Ray keeps its auth token: ``~/.ray/auth_token`` (written by a local ``ray.init``) and
    ``RAY_AUTH_TOKEN_PATH`` when set."""
    files = [Path.home() / ".ray" / "auth_token"]
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        files.append(Path(os.environ["RAY_AUTH_TOKEN_PATH"]))
    return files


def make_token_private() -> None:
    """Ray writes its token file with the default umask (0644 on most systems): readable by every user of
    the machine, who could then use the cluster. Make the user's own token files 0600."""
    for path in token_files():
        try:
            st = path.stat()
            if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & 0o077:
                path.chmod(stat.S_IMODE(st.st_mode) & 0o700)
        except OSError:  # not there, or not ours to change
            continue


def init_ray(ray_cfg: RayCfg) -> None:
    """Connect to ``ray.address`` / ``RAY_ADDRESS`` if given, else start a local Ray (once per process)
    bound to ``ray.node_ip_address`` (loopback unless set otherwise). Either way, Ray's token file is
    made readable by its owner only."""
    if ray.is_initialized():
        return
    address = ray_cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
        make_token_private()
        return
    kwargs: dict[str, Any] = {"include_dashboard": ray_cfg.include_dashboard}
    if not ray_cfg.include_dashboard:
        kwargs["runtime_env"] = {"worker_process_setup_hook": "siclip.ray_session.quiet_without_dashboard"}
    if ray_cfg.num_cpus:
        kwargs["num_cpus"] = ray_cfg.num_cpus
    if ray_cfg.object_store_memory_mb:
        kwargs["object_store_memory"] = ray_cfg.object_store_memory_mb * 1024 * 1024
    bind = ray_cfg.node_ip_address.strip()
    if bind in LOOPBACK:
        with loopback_node():
            ray.init(address="local", **kwargs)
    else:
        if bind:
            kwargs["_node_ip_address"] = bind
        ray.init(address="local", **kwargs)
    make_token_private()
