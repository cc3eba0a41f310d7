"""Extension points: name -> "module:Class" registries (imported only when used, extensible by entry
points), and the spec of a service a plugin asks the supervisor to start."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable

__all__ = ["Registry", "ServiceSpec"]


class Registry:
    def __init__(self, group: str, builtin: dict[str, str]):
        self.group = group  # entry-point group third-party packages register under
        self.builtin = builtin

    def targets(self) -> dict[str, str]:
        found = dict(self.builtin)
        for ep in entry_points(group=self.group):
            found.setdefault(ep.name, ep.value)
        return found

    def names(self) -> list[str]:
        return sorted(self.targets())

    def load(self, name: str):
        """The class registered as `name`; KeyError when there is none."""
        module, _, attr = self.targets()[name].partition(":")
        return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class ServiceSpec:
    """A process the supervisor starts beside the scan and the drivers (see vbatt.supervise.services)."""

    name: str
    target: Callable  # a module-level function (started in a spawned process)
    args: tuple
    before_drivers: bool = False  # e.g. node agents must listen before the controller polls them
