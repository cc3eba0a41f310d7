"""Config models of Modbus nodes and of the Modbus driver (see docs/configuration.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from vbatt.configbase import NodeId, Priority, Strict

__all__ = ["ModbusNodeConfig", "ModbusDriverConfig"]


class ModbusNodeConfig(Strict):
    """A node reached over Modbus TCP (a `vbatt node` agent or any SunSpec device)."""

    id: NodeId
    driver: Literal["modbus"]
    priority: Priority = 0
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 502
    unit_id: Annotated[int, Field(ge=0, le=255)] = 1


class ModbusDriverConfig(Strict):
    poll_ms: Annotated[float, Field(gt=0)] = 500.0
