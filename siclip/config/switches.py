"""The profile switches as a run resolved them: each switch's value and where it came from (the profile,
the config file, the command line or a sweep's ``tune.space``).

:class:`SwitchReport` is printed at the start of ``siclip train``, ``ablate`` and ``tune`` and written into
their tables, so a config or a command line that overrides its profile (:data:`~siclip.config.binding.PROFILES`)
never does so silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from siclip.config.binding import PROFILES, SWITCHES, apply_overrides, from_dict, has_dotted
from siclip.config.loading import read_yaml_mapping

__all__ = ["SwitchReport", "SwitchValue", "resolve_switches", "switch_report"]


@dataclass(frozen=True)
class SwitchValue:
    """One profile switch as a run resolved it: its value, where the value came from, the profile's value."""

    key: str
    value: Any
    source: str
    """``profile``, ``config file``, ``command line`` or ``tune.space`` (varied per trial)."""
    profile_value: Any

    @property
    def overrides_profile(self) -> bool:
        """The run does not use its profile's value for this switch."""
        return self.source != "profile" and self.value != self.profile_value


@dataclass(frozen=True)
class SwitchReport:
    """Every profile switch of a run, resolved, with its source: printed at the start of ``siclip train``,
    ``ablate`` and ``tune`` and written into their tables, so a profile cannot lose to a config silently."""

    profile: str
    profile_source: str
    """``default``, ``config file`` or ``command line``."""
    config_file: str
    switches: tuple[SwitchValue, ...]

    def _where(self, source: str) -> str:
        return f"config file {self.config_file}" if source == "config file" and self.config_file else source

    @property
    def overridden(self) -> tuple[SwitchValue, ...]:
        return tuple(s for s in self.switches if s.overrides_profile)

    def lines(self) -> list[str]:
        """Plain text: the profile, then one line per switch (value, source, and what it overrides)."""
        width = max(len(s.key) for s in self.switches)
        out = [f"profile {self.profile} ({self._where(self.profile_source)}); its switches as resolved:"]
        for s in self.switches:
            note = f"; OVERRIDES profile {self.profile}'s {s.profile_value!r}" if s.overrides_profile else ""
            out.append(f"  {s.key:<{width}} = {s.value!r:<10} ({self._where(s.source)}{note})")
        return out

    def markdown(self) -> str:
        """A Markdown paragraph and table for a results file's header."""
        n = len(self.overridden)
        head = f"Profile `{self.profile}` ({self._where(self.profile_source)}); " + (
            f"**{n} switch(es) override it** (marked)." if n else "every switch has the profile's value."
        )
        rows = [
            f"| `{s.key}` | `{s.value!r}` | {self._where(s.source)}"
            + (f" (**overrides** `{s.profile_value!r}`)" if s.overrides_profile else "")
            + " |"
            for s in self.switches
        ]
        return "\n".join([head, "", "| switch | value | from |", "|---|---|---|", *rows])


def switch_report(
    data: dict[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    config_file: str = "",
    searched: tuple[str, ...] | list[str] = (),
) -> SwitchReport:
    """The resolved profile switches of the config ``data`` (a config file's mapping) with ``overrides``
    (the command line's ``key=value``); ``searched``: keys a sweep varies per trial."""
    data = data or {}
    cli = apply_overrides({}, list(overrides))
    cfg = from_dict(apply_overrides(data, list(overrides)))
    profile_source = "command line" if "profile" in cli else "config file" if "profile" in data else "default"
    rows = []
    for key in SWITCHES:
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if key in searched:
            source = "tune.space"
        elif has_dotted(cli, key):
            source = "command line"
        elif has_dotted(data, key):
            source = "config file"
        else:
            source = "profile"
        rows.append(SwitchValue(key, value, source, PROFILES[cfg.profile][key]))
    return SwitchReport(cfg.profile, profile_source, config_file, tuple(rows))


def resolve_switches(
    path: str | os.PathLike[str] | None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    searched: tuple[str, ...] | list[str] = (),
) -> SwitchReport:
    """:func:`switch_report` of a config file (``None``: no file) and command-line overrides."""
    data = read_yaml_mapping(path, key="--config") if path is not None else {}
    return switch_report(data, overrides, config_file=str(path or ""), searched=searched)
