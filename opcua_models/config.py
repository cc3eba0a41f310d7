"""Config model of vbatt's own OPC UA server (top-level `opcua:` section)."""

from __future__ import annotations

from vbatt.configbase import Strict

__all__ = ["OpcuaServerConfig"]


class OpcuaServerConfig(Strict):
    enabled: bool = False
