"""Processes a run starts beside the scan and the drivers: an embedded node fleet, the OPC UA server.

Each entry of SERVICE_FACTORIES is "module:function"; the function takes
(cfg, fleet, image_name, image_spec) and returns the ServiceSpecs to start for
that config (an empty list when the config does not ask for the service).
"""

from __future__ import annotations

import importlib

from vbatt.plugins import ServiceSpec

__all__ = ["ServiceSpec", "SERVICE_FACTORIES", "plan_services"]

SERVICE_FACTORIES: tuple[str, ...] = (
    "vbatt.drivers.node.fleet:embedded_fleet_services",
    "vbatt.opcua_models.service:opcua_services",
    "vbatt.hierarchy.service:link_services",
)


def plan_services(cfg, fleet, image_name: str, spec) -> list[ServiceSpec]:
    out: list[ServiceSpec] = []
    for ref in SERVICE_FACTORIES:
        module, _, fn = ref.partition(":")
        out += getattr(importlib.import_module(module), fn)(cfg, fleet, image_name, spec)
    return out
