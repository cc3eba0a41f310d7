"""Driver kinds -> "module:Class", imported only when a config uses them.

Third-party drivers register under the entry-point group ``vbatt.drivers``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

__all__ = ["driver_class", "known_drivers", "BUILTIN"]

BUILTIN: dict[str, str] = {
    "opcua": "vbatt.drivers.opcua_client:OpcuaClientDriver",
    "sim": "vbatt.drivers.sim:SimDriver",
    "modbus": "vbatt.drivers.modbus:ModbusDriver",
}


def _all() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group="vbatt.drivers"):
        found.setdefault(ep.name, ep.value)
    return found


def known_drivers() -> list[str]:
    return sorted(_all())


def driver_class(kind: str):
    module, _, name = _all()[kind].partition(":")
    return getattr(importlib.import_module(module), name)
