"""The one declaration of every process-image field (DESIGN.md §1).

YAML keys, image arrays, JSON snapshots, OPC UA variables and register maps are
all derived from these tables; nothing else spells a field's type, unit or sign.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Kind",
    "Field",
    "NODE_INPUTS",
    "NODE_SETTINGS",
    "NODE_OUTPUTS",
    "NODE_STATE",
    "NODE_FIELDS",
    "AGGREGATES",
    "node_field",
    "aggregate_field",
]


class Kind(enum.Enum):
    INPUT = "input"  # written by a driver, latched by the scan
    SETTING = "setting"  # from config, changed only by operator commands between cycles
    OUTPUT = "output"  # the instruction, written by programs, sent by drivers
    STATE = "state"  # computed by programs, visible to SCADA, not sent to the node
    AGGREGATE = "aggregate"  # one value for the whole virtual battery


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str  # numpy dtype code
    unit: str  # SI unit; "1" for ratios, "" for codes and counts
    kind: Kind
    doc: str
    lo: float | None = None  # valid range, where one exists
    hi: float | None = None

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


_I, _S, _O, _T, _A = Kind.INPUT, Kind.SETTING, Kind.OUTPUT, Kind.STATE, Kind.AGGREGATE
_INF = float("inf")

NODE_INPUTS: tuple[Field, ...] = (
    Field("voltage_v", "f8", "V", _I, "battery terminal voltage", 0.0, 2000.0),
    Field("current_a", "f8", "A", _I, "battery current; > 0 = discharging", -10000.0, 10000.0),
    Field("temperature_c", "f8", "degC", _I, "hottest battery sensor", -60.0, 200.0),
    Field("soc", "f8", "1", _I, "state of charge, 0..1", 0.0, 1.0),
    Field("capacity_wh", "f8", "Wh", _I, "usable energy at soc = 1", 0.0, 1e9),
    Field("demand_w", "f8", "W", _I, "the device's own load right now", 0.0, 1e9),
    Field("max_discharge_w", "f8", "W", _I, "discharge the battery/BMS allows now (>= 0)", 0.0, 1e9),
    Field("max_charge_w", "f8", "W", _I, "charge the battery/BMS allows now (>= 0)", 0.0, 1e9),
    Field("link_max_w", "f8", "W", _I, "what the node can export to or import from the bus", 0.0, 1e9),
    Field("updated_ns", "i8", "ns", _I, "CLOCK_MONOTONIC time of the last fresh data"),
    Field("fault", "u4", "", _I, "driver fault code; 0 = none (see drivers.faults)"),
    Field("online", "u1", "", _I, "fresh data within the staleness bound (set at latch)"),
    Field("io_requests", "u8", "", _I, "requests the driver sent to this node"),
    Field("io_errors", "u8", "", _I, "requests that failed"),
    Field("io_latency_ms", "f8", "ms", _I, "round-trip time of the last request"),
)

NODE_SETTINGS: tuple[Field, ...] = (
    Field("priority", "i8", "", _S, "0 = most critical; larger = shed first", 0, 1000),
)

NODE_OUTPUTS: tuple[Field, ...] = (
    Field("battery_w", "f8", "W", _O, "battery power command: > 0 discharge, < 0 charge"),
    Field("served_w", "f8", "W", _O, "load the node may run (demand - shed)"),
    Field("shed_w", "f8", "W", _O, "load that must be shed"),
    Field("bus_w", "f8", "W", _O, "net flow with the shared bus: > 0 import, < 0 export"),
)

NODE_STATE: tuple[Field, ...] = (
    Field("forecast_w", "f8", "W", _T, "predicted demand of the node"),
    Field("lo_w", "f8", "W", _T, "lowest battery_w allowed after protection (<= 0: charge)"),
    Field("hi_w", "f8", "W", _T, "highest battery_w allowed after protection (>= 0: discharge)"),
    Field("trip", "u4", "", _T, "latched protection trip reason bits; 0 = none"),
    Field("alarm", "u4", "", _T, "active health alarm bits; 0 = none"),
    Field("serve_max_w", "f8", "W", _T, "most load the allocator may serve (energy program, DESIGN §2b)"),
    Field("runtime_s", "f8", "s", _T, "time the node would stay served if the main supply failed now"),
)

NODE_FIELDS: tuple[Field, ...] = NODE_INPUTS + NODE_SETTINGS + NODE_OUTPUTS + NODE_STATE

AGGREGATES: tuple[Field, ...] = (
    Field("main_limit_w", "f8", "W", _A, "main supply capacity (operator setting)", 0.0, 1e12),
    Field("main_w", "f8", "W", _A, "main supply actually used"),
    Field("demand_w", "f8", "W", _A, "total demand of online nodes"),
    Field("forecast_w", "f8", "W", _A, "predicted total demand"),
    Field("deficit_w", "f8", "W", _A, "forecast demand - main supply capacity"),
    Field("battery_w", "f8", "W", _A, "total battery power: > 0 discharge"),
    Field("available_discharge_w", "f8", "W", _A, "sum of allowed discharge"),
    Field("available_charge_w", "f8", "W", _A, "sum of allowed charge"),
    Field("energy_wh", "f8", "Wh", _A, "stored energy"),
    Field("soc", "f8", "1", _A, "energy-weighted state of charge"),
    Field("shed_w", "f8", "W", _A, "total load shed"),
    Field("bus_w", "f8", "W", _A, "sum of node bus flows (= main_w)"),
    Field("nodes_online", "f8", "", _A, "nodes with fresh data"),
    Field("nodes_tripped", "f8", "", _A, "nodes with a latched trip"),
)

_NODE_BY_NAME = {f.name: f for f in NODE_FIELDS}
_AGG_BY_NAME = {f.name: f for f in AGGREGATES}
assert len(_NODE_BY_NAME) == len(NODE_FIELDS) and len(_AGG_BY_NAME) == len(AGGREGATES)


def node_field(name: str) -> Field:
    return _NODE_BY_NAME[name]


def aggregate_field(name: str) -> Field:
    return _AGG_BY_NAME[name]
