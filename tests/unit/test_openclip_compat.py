"""The open_clip internals siclip uses are where openclip_compat says, on exactly the open_clip pyproject.toml pins.

When open_clip is upgraded, these tests fail first and name what moved, instead of a build failing later.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path
from typing import Any

import open_clip
import open_clip.model as oc_model
import pytest
from torch import nn

from siclip import openclip_compat

REPO = Path(__file__).resolve().parents[2]


def _plain(builder: Any) -> Any:
    """open_clip's own builder under any wrapper."""
    while hasattr(builder, "__wrapped__"):
        builder = builder.__wrapped__
    return builder


@pytest.fixture
def plain_builders(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    """open_clip's unwrapped tower builders for this test; whatever was there is put back afterwards."""
    plain = tuple(_plain(getattr(oc_model, name)) for name in openclip_compat.TOWER_BUILDERS)
    for name, builder in zip(openclip_compat.TOWER_BUILDERS, plain, strict=True):
        monkeypatch.setattr(oc_model, name, builder)
    return plain


def _tiny_clip() -> nn.Module:
    vision = {"layers": 1, "width": 16, "head_width": 8, "patch_size": 8, "image_size": 16}
    text = {"context_length": 6, "vocab_size": 50, "width": 8, "heads": 2, "layers": 1}
    return oc_model.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=text)


def _passthrough(build: Any, *args: Any, **kwargs: Any) -> nn.Module:
    return build(*args, **kwargs)  # type: ignore[no-any-return]


def test_pyproject_pins_exactly_the_tested_open_clip_and_it_is_installed() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (dep,) = [d for d in deps if re.match(r"open_clip_torch\b", d)]
    pinned = dep.split("==", 1)[1] if "==" in dep else None
    assert pinned == openclip_compat.TESTED_OPEN_CLIP_VERSIONS[-1], dep
    assert openclip_compat.check_open_clip_version() == open_clip.__version__


def test_an_unknown_open_clip_fails_loudly_before_any_internal_is_touched(
    plain_builders: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(openclip_compat.OpenClipVersionError) as err:
        openclip_compat.check_open_clip_version("3.4.0")
    assert "3.4.0" in str(err.value) and "3.3.0" in str(err.value)  # what runs, what was checked
    monkeypatch.setattr(open_clip, "__version__", "9.9.9")
    with pytest.raises(openclip_compat.OpenClipVersionError, match=r"9\.9\.9"):
        openclip_compat.wrap_tower_builders(_passthrough, _passthrough)
    assert tuple(getattr(oc_model, n) for n in openclip_compat.TOWER_BUILDERS) == plain_builders


def test_the_tower_builders_keep_their_names_and_signature() -> None:
    for name in openclip_compat.TOWER_BUILDERS:
        params = list(inspect.signature(_plain(getattr(oc_model, name))).parameters)
        assert params == ["embed_dim", params[1], "quick_gelu", "cast_dtype"], (name, params)


def test_open_clip_models_build_their_towers_through_the_hooks(plain_builders: tuple[Any, ...]) -> None:
    seen: list[tuple[str, Any]] = []

    def hook(kind: str) -> Any:
        def run(build: Any, embed_dim: int, cfg: Any, *args: Any, **kwargs: Any) -> nn.Module:
            seen.append((kind, build))
            return build(embed_dim, cfg, *args, **kwargs)

        return run

    openclip_compat.wrap_tower_builders(hook("vision"), hook("text"))
    model = _tiny_clip()
    assert seen == [
        ("vision", plain_builders[0]),
        ("text", plain_builders[1]),
    ]  # each hook gets open_clip's own
    assert model.visual is not None and model.transformer is not None


def test_each_builder_is_wrapped_once_and_rewrapped_only_when_put_back(
    plain_builders: tuple[Any, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def hook(tag: str) -> Any:
        def run(build: Any, *args: Any, **kwargs: Any) -> nn.Module:
            calls.append(tag)
            return build(*args, **kwargs)

        return run

    openclip_compat.wrap_tower_builders(hook("first"), hook("first"))
    openclip_compat.wrap_tower_builders(hook("second"), hook("second"))  # e.g. a reloaded registry
    _tiny_clip()
    assert calls == ["first", "first"]  # no second layer of wrapping
    monkeypatch.setattr(oc_model, openclip_compat.TOWER_BUILDERS[1], plain_builders[1])  # text put back
    openclip_compat.wrap_tower_builders(hook("third"), hook("third"))
    calls.clear()
    _tiny_clip()
    assert calls == ["first", "third"]
