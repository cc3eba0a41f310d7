"""Config models of nodes read from external OPC UA servers, and of that driver."""

from __future__ import annotations

from typing import Literal

from vbatt.configbase import NodeId, Priority, Strict

__all__ = ["OpcuaNodeConfig", "OpcuaClientDriverConfig"]


class OpcuaNodeConfig(Strict):
    """A node whose fields are variables of an external OPC UA server."""

    id: NodeId
    driver: Literal["opcua"]
    priority: Priority = 0
    endpoint: str = "opc.tcp://127.0.0.1:4841"


class OpcuaClientDriverConfig(Strict):
    pass
