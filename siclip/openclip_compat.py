"""Every use of open_clip's private internals, in one place, gated to the open_clip versions they were read from.

open_clip has no public way to build a tower from a config key it does not know: ``CLIP`` and
``CustomTextCLIP`` call the module functions ``open_clip.model._build_vision_tower`` and
``_build_text_tower``, looked up by name at each build. :func:`wrap_tower_builders` rebinds those two names
to wrappers around them (``siclip.models.registry`` supplies what the wrappers do). Their names and
signatures may change between open_clip releases without notice, so they are read here, and nowhere else,
after :func:`check_open_clip_version` confirmed the running open_clip is one they were read from
(pyproject.toml pins it exactly; a test fails loudly when the two disagree).

timm's models are built through its public API only (``timm.models.build_model_with_cfg``, ``register_model``);
open_clip's CoCa image tokens come from its public ``visual`` tower.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from torch import nn

__all__ = [
    "TESTED_OPEN_CLIP_VERSIONS",
    "OpenClipVersionError",
    "TowerHook",
    "check_open_clip_version",
    "wrap_tower_builders",
]

TESTED_OPEN_CLIP_VERSIONS = ("3.3.0",)
"""open_clip releases whose internals below were read and tested; pyproject.toml pins the same one."""

TOWER_BUILDERS = ("_build_vision_tower", "_build_text_tower")
"""The ``open_clip.model`` functions every CLIP / CustomTextCLIP builds its image and text tower with, as
``builder(embed_dim, cfg, quick_gelu=False, cast_dtype=None)``."""

_WRAPPED = "_siclip_wrapped"

TowerHook = Callable[..., nn.Module]
"""``hook(build, embed_dim, cfg, *args, **kwargs) -> tower``: ``build`` is open_clip's own builder."""


class OpenClipVersionError(RuntimeError):
    """The running open_clip is not one whose private internals siclip was checked against."""


def check_open_clip_version(version: str | None = None) -> str:
    """Return the running open_clip version, or raise naming it and the tested ones."""
    if version is None:
        import open_clip

        version = str(open_clip.__version__)
    if version not in TESTED_OPEN_CLIP_VERSIONS:
        raise OpenClipVersionError(
            f"open_clip {version} is installed but siclip uses open_clip internals checked only against "
            f"{', '.join(TESTED_OPEN_CLIP_VERSIONS)}; allowed: install "
            f"open_clip_torch=={TESTED_OPEN_CLIP_VERSIONS[-1]} (pyproject.toml pins it), or re-check "
            "siclip/openclip_compat.py against the new release"
        )
    return version


def wrap_tower_builders(vision: TowerHook, text: TowerHook) -> None:
    """Route open_clip's image and text tower builders through ``vision`` and ``text``.

    Each builder is wrapped at most once: a builder already wrapped (by an earlier call, even from a reloaded
    module) is left as it is; one that someone put back to open_clip's own is wrapped again.
    """
    check_open_clip_version()
    import open_clip.model as oc_model

    for attr, hook in zip(TOWER_BUILDERS, (vision, text), strict=True):
        build = getattr(oc_model, attr)
        if not getattr(build, _WRAPPED, False):
            setattr(oc_model, attr, _wrap(build, hook))


def _wrap(build: Callable[..., nn.Module], hook: TowerHook) -> Callable[..., nn.Module]:
    @wraps(build)
    def wrapped(*args: Any, **kwargs: Any) -> nn.Module:
        return hook(build, *args, **kwargs)

    setattr(wrapped, _WRAPPED, True)
    return wrapped
