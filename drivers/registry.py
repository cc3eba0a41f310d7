"""Driver kinds -> their spec (driver class, config section, node entry, cross-checks).

A spec is light: it lives in the driver's package `__init__` and names the driver
class as "module:Class", so that the config schema is built from every registered
driver without importing pymodbus or asyncua. Third-party drivers register a spec
(or a bare Driver class) under the entry-point group ``vbatt.drivers``; their
`driver:` name is then valid in a plant YAML and their `drivers.<name>` section
is validated like the built-in ones.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

from vbatt.config.base import Strict
from vbatt.plugins import Registry

__all__ = ["DriverSpec", "driver_spec", "driver_specs", "driver_class", "known_drivers", "BUILTIN"]


class NoSettings(Strict):
    """The `drivers.<name>` section of a driver that has no settings: empty."""


@dataclass(frozen=True)
class DriverSpec:
    """What config needs to know of a driver, without importing it.

    driver: "module:Class" of the `vbatt.drivers.base.Driver` subclass (imported when a run uses it)
    config: pydantic model of its `drivers.<name>` section (every field with a default)
    node:   pydantic model of a node entry with `driver: <name>` (a `driver: Literal[name]` field);
            None: the driver has no node entry of its own
    check:  fn(cfg, fleet) -> None, raising ValueError with what is wrong, for checks across the plant
            (reported at `drivers.<name>`)
    template: a `template` may say `driver: <name>`
    """

    driver: str
    config: type = NoSettings
    node: type | None = None
    check: Callable[[Any, Any], None] | None = None
    template: bool = False


# built-in order is the order of the names in messages ("expected sim, modbus or opcua")
BUILTIN: dict[str, str] = {
    "sim": "vbatt.drivers.sim:SPEC",
    "modbus": "vbatt.drivers.modbus:SPEC",
    "opcua": "vbatt.drivers.opcua:SPEC",
    "mqtt": "vbatt.drivers.mqtt:SPEC",
}

_REGISTRY = Registry("vbatt.drivers", BUILTIN)
log = logging.getLogger("vbatt.drivers")


def known_drivers() -> list[str]:
    """Built-in names first, then entry points (sorted)."""
    names = list(_REGISTRY.targets())
    return [n for n in BUILTIN if n in names] + sorted(n for n in names if n not in BUILTIN)


def driver_spec(name: str) -> DriverSpec:
    """The spec registered as `name`; KeyError when there is none. An entry point naming a Driver class
    (not a spec) gets a spec without settings or node entry."""
    target = _REGISTRY.targets()[name]
    obj = _REGISTRY.load(name)
    if isinstance(obj, DriverSpec):
        return obj
    if isinstance(obj, type):
        return DriverSpec(driver=target)
    raise TypeError(f"entry point {name!r} ({target}) of group 'vbatt.drivers' is neither a DriverSpec "
                    f"nor a Driver class")


def driver_specs() -> dict[str, DriverSpec]:
    """Every loadable spec. A third-party entry point that fails to load is left out with a warning
    (its name is then an unknown driver in a config), so that it cannot break every other plant."""
    out = {}
    for name in known_drivers():
        if name in BUILTIN:
            out[name] = driver_spec(name)
            continue
        try:
            out[name] = driver_spec(name)
        except Exception as exc:  # any error of foreign code at import
            log.warning("driver %r (entry point %s of group vbatt.drivers) cannot be loaded, left out: %s: %s",
                        name, _REGISTRY.targets()[name], type(exc).__name__, exc)
    return out


def driver_class(name: str):
    """The Driver class registered as `name` (imports its transport); KeyError when there is none."""
    module, _, attr = driver_spec(name).driver.partition(":")
    return getattr(importlib.import_module(module), attr)
