"""Driver kinds -> "module:Class", imported only when a config uses them.

Third-party drivers register under the entry-point group ``vbatt.drivers``.
"""

from __future__ import annotations

from vbatt.plugins import Registry

__all__ = ["driver_class", "known_drivers", "BUILTIN"]

BUILTIN: dict[str, str] = {
    "opcua": "vbatt.drivers.opcua.driver:OpcuaClientDriver",
    "sim": "vbatt.drivers.sim.driver:SimDriver",
    "modbus": "vbatt.drivers.modbus.driver:ModbusDriver",
}

_REGISTRY = Registry("vbatt.drivers", BUILTIN)
known_drivers = _REGISTRY.names
driver_class = _REGISTRY.load
