"""Config models of Modbus nodes and of the Modbus driver (see docs/modbus.md).

Two kinds of Modbus nodes:
- a `driver: modbus` node entry: a device somewhere (a `vbatt node` agent or any
  SunSpec battery), at `host:port`, unit `unit_id`;
- a template with `driver: modbus`: simulated nodes served by the *embedded
  fleet* (real Modbus TCP agents on `drivers.modbus.embedded_fleet.host`, one
  port each from `base_port` up, in node order) and polled over Modbus like any
  other device. This keeps the default run a few lines for hundreds of nodes.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from vbatt.config.base import NodeId, NodeSettings, Strict, TlsFiles
from vbatt.kernel.fields import NODE_MEASUREMENTS, NODE_OUTPUTS, names

__all__ = ["rendezvous_path", "Register", "MAP_INPUTS", "MAP_OUTPUTS", "ModbusNodeConfig", "ModbusDriverConfig", "EmbeddedFleetConfig", "TlsFiles", "Endpoint",
           "modbus_endpoints", "embedded_indices"]

Port = Annotated[int, Field(ge=1, le=65535)]
Ms = Annotated[float, Field(gt=0, le=3_600_000, allow_inf_nan=False)]


REG_TYPES = {"uint16": 1, "int16": 1, "uint32": 2, "int32": 2, "float32": 2}
MAP_INPUTS = names(NODE_MEASUREMENTS)  # what an explicit map may read: the device measurements
MAP_OUTPUTS = names(NODE_OUTPUTS)  # and write: the instruction


class Register(Strict):
    """One value in an explicit map: SI value = raw x scale (+ offset); big-endian words."""

    address: Annotated[int, Field(ge=0, le=65535)]
    type: Literal["uint16", "int16", "uint32", "int32", "float32"] = "uint16"
    scale: Annotated[float, Field(allow_inf_nan=False)] = 1.0
    offset: Annotated[float, Field(allow_inf_nan=False)] = 0.0

    @property
    def regs(self) -> int:
        return REG_TYPES[self.type]


class ModbusNodeConfig(NodeSettings):
    """A node reached over Modbus TCP (a `vbatt node` agent or any SunSpec device; its settings: `NodeSettings`)."""

    id: NodeId
    driver: Literal["modbus"]
    host: str = "127.0.0.1"
    port: Port = 502
    unit_id: Annotated[int, Field(ge=0, le=255)] = 1
    sunspec_base: Literal[0, 40000, 50000] | None = None  # None: search 40000, 0, 50000 for 'SunS'
    tls: TlsFiles | None = None  # overrides drivers.modbus.tls for this node
    plaintext: bool | None = None  # overrides drivers.modbus.plaintext for this node
    # a device without SunSpec: field name -> holding register (inputs are read, outputs written)
    registers: dict[str, Register] | None = None

    @model_validator(mode="after")
    def _map(self) -> "ModbusNodeConfig":
        if self.registers is None:
            return self
        if self.sunspec_base is not None:
            raise ValueError("give either 'registers' (an explicit map) or 'sunspec_base', not both")
        unknown = sorted(set(self.registers) - set(MAP_INPUTS) - set(MAP_OUTPUTS))
        if unknown:
            raise ValueError(f"registers: unknown field(s) {unknown} (expected inputs {list(MAP_INPUTS)} "
                             f"or outputs {list(MAP_OUTPUTS)})")
        if "soc" not in self.registers:
            raise ValueError("registers: 'soc' is required (a node without a state of charge cannot be allocated)")
        spans = sorted((r.address, r.address + r.regs, name) for name, r in self.registers.items())
        for (a0, e0, n0), (a1, _e1, n1) in zip(spans, spans[1:]):
            if a1 < e0:
                raise ValueError(f"registers: {n1} at {a1} overlaps {n0} ({a0}..{e0 - 1})")
        inputs = [s for s in spans if s[2] in MAP_INPUTS]
        if inputs and inputs[-1][1] - inputs[0][0] > 125 * 8:
            raise ValueError(f"registers: inputs span {inputs[0][0]}..{inputs[-1][1] - 1}; keep them within "
                             f"1000 registers (8 reads)")
        return self


class EmbeddedFleetConfig(Strict):
    """Where the embedded fleet serves the template nodes that say `driver: modbus`."""

    host: Literal["127.0.0.1", "localhost"] = "127.0.0.1"
    # 0: any free ports, told to the driver through a rendezvous file (concurrent runs never clash);
    # else node k of the embedded fleet listens on base_port + k
    base_port: Annotated[int, Field(ge=0, le=65535)] = 0
    tick_ms: Ms = 100.0  # physics and register refresh period of the agents
    tls: TlsFiles | None = None  # the agents' server side; None: plaintext on loopback


class ModbusDriverConfig(Strict):
    poll_ms: Ms = 500.0  # each device is read (and sent the newest instruction) this often
    timeout_ms: Ms = 300.0  # per request; a silent device costs this much, only to itself
    lease_ms: Ms | None = None  # instruction lease; default 4 x poll_ms
    reconnect_min_ms: Ms = 250.0
    reconnect_max_ms: Ms = 2000.0
    publish_ms: Ms = 20.0  # how often the driver hands its newest data to the scan
    plaintext: bool = False  # Modbus TCP without TLS: only when said so
    tls: TlsFiles | None = None
    embedded_fleet: EmbeddedFleetConfig = EmbeddedFleetConfig()
    processes: Annotated[int, Field(ge=1, le=64)] = 1  # split the Modbus nodes over this many I/O processes

    @model_validator(mode="after")
    def _check(self) -> "ModbusDriverConfig":
        if self.plaintext and self.tls is not None:
            raise ValueError("give either 'tls' (Modbus/TCP Security) or 'plaintext: true', not both")
        if self.reconnect_max_ms < self.reconnect_min_ms:
            raise ValueError(f"reconnect_max_ms ({self.reconnect_max_ms}) must be >= reconnect_min_ms "
                             f"({self.reconnect_min_ms})")
        if self.embedded_fleet.tls is not None and self.tls is None:
            raise ValueError("embedded_fleet.tls is set: the driver needs its own client certificate in 'tls' too")
        if self.timeout_ms > self.poll_ms * 10:
            raise ValueError(f"timeout_ms ({self.timeout_ms}) should not exceed 10 x poll_ms ({self.poll_ms})")
        return self

    @property
    def lease(self) -> float:
        return self.lease_ms if self.lease_ms is not None else 4.0 * self.poll_ms


@dataclass(frozen=True)
class Endpoint:
    """Where and how the driver reaches one node."""

    id: str
    host: str
    port: int
    unit_id: int
    tls: TlsFiles | None
    plaintext: bool
    sunspec_base: int | None = None
    embedded: int = -1  # position in the embedded fleet (its port order); -1: a device of its own
    registers: dict | None = None  # explicit map (field -> Register) instead of SunSpec discovery


def embedded_indices(cfg, fleet) -> list[int]:
    """Image indices of the nodes the embedded fleet serves (templates with driver: modbus), in port order."""
    out, i = [], 0
    for entry in cfg.nodes:
        t = getattr(entry, "template", None)
        count = t.count if t is not None else 1
        if t is not None and t.driver == "modbus":
            out.extend(range(i, i + count))
        i += count
    return out


def modbus_endpoints(cfg, fleet) -> dict[int, Endpoint]:
    """Image index -> endpoint of every Modbus node; raises ValueError on a port clash or overflow."""
    d = cfg.drivers.modbus
    out: dict[int, Endpoint] = {}
    ef = d.embedded_fleet
    emb = embedded_indices(cfg, fleet)
    if emb and ef.base_port and ef.base_port + len(emb) - 1 > 65535:
        raise ValueError(f"drivers.modbus.embedded_fleet.base_port {ef.base_port} + {len(emb)} nodes runs past "
                         f"port 65535 (expected base_port <= {65536 - len(emb)})")
    for k, i in enumerate(emb):
        out[i] = Endpoint(fleet.ids[i], ef.host, ef.base_port + k if ef.base_port else 0, 1, d.tls if ef.tls else None,
                          ef.tls is None, 40000, k)
    i = 0
    used = {(e.host, e.port): e.id for e in out.values()}
    for entry in cfg.nodes:
        t = getattr(entry, "template", None)
        if t is not None:
            i += t.count
            continue
        if getattr(entry, "driver", None) == "modbus":
            tls = entry.tls if entry.tls is not None else (None if entry.plaintext else d.tls)
            plain = entry.plaintext if entry.plaintext is not None else (d.plaintext if entry.tls is None else False)
            key = (entry.host, entry.port)
            if key in used and (entry.host in ("127.0.0.1", "localhost")) and used[key] != entry.id:
                other = used[key]
                if any(e.id == other and e.embedded >= 0 for e in out.values()):
                    raise ValueError(f"node {entry.id}: port {entry.port} is also used by the embedded fleet "
                                     f"(node {other}); move drivers.modbus.embedded_fleet.base_port")
            used[key] = entry.id
            out[i] = Endpoint(entry.id, entry.host, entry.port, entry.unit_id, tls, plain, entry.sunspec_base,
                              registers=entry.registers)
        i += 1
    return out


def rendezvous_path(image_name: str) -> Path:
    """Where the embedded fleet of run `image_name` writes its ports (one per line, node order)."""
    return Path(tempfile.gettempdir()) / f"{image_name.strip('/')}.fleet-ports"
