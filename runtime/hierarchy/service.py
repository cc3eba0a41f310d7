"""The hierarchy link as a service of `vbatt run` (runtime/supervise/services.py SERVICE_FACTORIES): a
light module, so that a run without a `hierarchy:` section imports nothing of the link."""

from __future__ import annotations

import logging

__all__ = ["link_services"]


def link_services(cfg, fleet, image_name: str, spec) -> list:
    if not cfg.hierarchy.enabled:
        return []
    from vbatt.hierarchy.link import link_main
    from vbatt.plugins import ServiceSpec

    return [ServiceSpec("vbatt-hierarchy", link_main, (cfg, fleet, image_name, spec,
                                                        logging.getLogger().getEffectiveLevel()))]
