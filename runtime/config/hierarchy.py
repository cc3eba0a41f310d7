"""The `hierarchy:` section: a controller in a tree of controllers (docs/hierarchy.md).

    hierarchy:
      uplink: {host: 0.0.0.0, port: 1602, unit_id: 1, feeder_w: 50000,  # serve upward
               tls: {ca: pki/ca.pem, cert: pki/row-1.pem, key: pki/row-1.key}}  # or plaintext: true
      children: [rack-1, rack-2]   # node ids (driver: modbus) that are vbatt controllers with an uplink
      poll_ms: 100                 # how often the link reads its children's curves and writes the levels
      lease_ms: 1000               # lease of the levels it writes; and the default of the uplink's
      classes: 8                   # priority classes 0..K-1 the levels carry
      max_knots: 1024              # breakpoints the uplink's curve table holds
      status_file: var/status.json # the link's view, rewritten every round
      trace_file: var/trace.jsonl  # every change of its curves and levels, with the wall time (grows)

A controller with an uplink and no children is a *leaf* (it runs the `tree` program after
`allocation`); with both, a *middle* level; with children only, the *top*.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from vbatt.config.base import NodeId, Strict, TlsFiles

__all__ = ["UplinkConfig", "HierarchyConfig"]


class UplinkConfig(Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 502  # 0: any free port (written to ready_file)
    unit_id: Annotated[int, Field(ge=1, le=247)] = 1
    plaintext: bool = False  # plain Modbus TCP: only when said explicitly
    tls: TlsFiles | None = None  # Modbus/TCP Security (mutual TLS), as `vbatt node` serves it
    feeder_w: Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)] = 1e9  # offered as link_max_w
    tick_ms: Annotated[float, Field(gt=0, le=10_000)] = 100.0
    ready_file: str | None = None

    @model_validator(mode="after")
    def _secured(self) -> "UplinkConfig":
        if self.plaintext == (self.tls is not None):
            raise ValueError("say how to secure the uplink: either 'tls: {ca, cert, key}' (Modbus/TCP Security) "
                             f"or 'plaintext: true' (got {'both' if self.plaintext else 'neither'})")
        return self


class HierarchyConfig(Strict):
    uplink: UplinkConfig | None = None
    children: list[NodeId] = []
    poll_ms: Annotated[float, Field(gt=0, le=60_000)] = 100.0
    lease_ms: Annotated[int, Field(ge=1, le=3_600_000)] = 1000
    classes: Annotated[int, Field(ge=1, le=64)] = 8
    max_knots: Annotated[int, Field(ge=16, le=3000)] = 1024
    status_file: str | None = None  # the link's view (role, levels, lease, children) as JSON, refreshed
    trace_file: str | None = None  # JSON lines: every change of its curves and of its levels (measurements)

    @property
    def enabled(self) -> bool:
        return self.uplink is not None or bool(self.children)

    @property
    def role(self) -> str:
        if not self.enabled:
            return "none"
        return "leaf" if not self.children else ("middle" if self.uplink is not None else "top")
