"""Name -> "module:Class" registries, imported only when used, extensible by entry points."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

__all__ = ["Registry"]


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
