"""Program ids -> "module:Class", imported only when a config names them.

Third-party programs register under the entry-point group ``vbatt.programs``.
"""

from __future__ import annotations

from vbatt.plugins import Registry

__all__ = ["program_class", "known_programs", "BUILTIN"]

BUILTIN: dict[str, str] = {
    "safe_allocation": "vbatt.programs.safe:SafeAllocation",
    "forecast": "vbatt.programs.forecast:Forecast",
    "protection": "vbatt.programs.protection:Protection",
    "allocation": "vbatt.programs.allocation:Allocation",
    "health": "vbatt.programs.health:Health",
    "user": "vbatt.programs.user:UserPrograms",
    "isolated": "vbatt.programs.policies:Isolated",  # reference policies of `vbatt simulate`
    "proportional": "vbatt.programs.policies:Proportional",
    "energy": "vbatt.programs.energy:Energy",
    "tree": "vbatt.programs.hierarchy.program:Tree",  # a leaf of a controller tree (docs/hierarchy.md)
}

_REGISTRY = Registry("vbatt.programs", BUILTIN)
known_programs = _REGISTRY.names
program_class = _REGISTRY.load
