"""Program ids -> "module:Class", imported only when a config names them.

Third-party programs register under the entry-point group ``vbatt.programs``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

__all__ = ["program_class", "known_programs", "BUILTIN"]

BUILTIN: dict[str, str] = {
    "safe_allocation": "vbatt.programs.safe:SafeAllocation",
    "forecast": "vbatt.programs.forecast:Forecast",
    "protection": "vbatt.programs.protection:Protection",
    "allocation": "vbatt.programs.allocation:Allocation",
    "health": "vbatt.programs.health:Health",
    "user": "vbatt.programs.user:UserPrograms",
}


def _all() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group="vbatt.programs"):
        found.setdefault(ep.name, ep.value)
    return found


def known_programs() -> list[str]:
    return sorted(_all())


def program_class(pid: str):
    target = _all()[pid]
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)
