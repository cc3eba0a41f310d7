"""Configuration: YAML with file:line positions, validated once into typed objects; the plan a
validated config gives (programs, driver partitions, the image layout).

The public names are loaded on first use (PEP 562), so that a driver's or program's own config
model can import the leaf modules (`vbatt.config.base`, `vbatt.config.yamlsrc`) without pulling in
the plant schema, which is built from those registries.
"""

from __future__ import annotations

import importlib

__all__ = ["Config", "ConfigError", "Fleet", "load_config", "load_config_text", "default_config_path"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("vbatt.config.plant"), name)
    raise AttributeError(f"module 'vbatt.config' has no attribute {name!r}")
