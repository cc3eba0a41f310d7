"""The one declaration of every process-image field (docs/design.md §1).

A field has a *scope* (one value per node, one for the whole virtual battery, or,
reserved, one per priority class) and a *role* (what writes it and who
reads it), and the flags of the surfaces that show it: kept across restarts,
settable by an operator, historized by the OPC UA server, its YAML key and
default, its valid range. Every surface is derived from `TABLE`:

* the image arrays and the JSON snapshot (every field, in table order);
* the plant YAML schema of nodes and of `plant:` (fields with a `yaml` key,
  their `lo`/`hi` as the schema's bounds, `default` as its default);
* the SunSpec/vendor-model codec (drivers/modbus/sunspec.py: the points that
  carry a field must cover the measurements and the outputs, wire = those two
  roles; the register scale of each point stays in the map, as it is per point);
* retain (`retained`), the OPC UA writable set and the operator commands
  (`operator_settable`, `command` = the image `Op` that sets it), the OPC UA
  history (`historized`), health's range check (measurements with a range).

tests/test_field_table.py holds each surface to this table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Scope",
    "Role",
    "Kind",
    "Field",
    "TABLE",
    "fields",
    "names",
    "NODE_INPUTS",
    "NODE_MEASUREMENTS",
    "NODE_SETTINGS",
    "NODE_OUTPUTS",
    "NODE_STATE",
    "NODE_FIELDS",
    "AGGREGATES",
    "node_field",
    "aggregate_field",
]


class Scope(enum.Enum):
    NODE = "node"  # one value per node
    AGGREGATE = "agg"  # one value for the whole virtual battery
    CLASS = "class"  # one value per priority class (reserved: no field yet)


class Role(enum.Enum):
    MEASUREMENT = "measurement"  # what a device reports; a driver writes it, the scan latches it
    BOOKKEEPING = "bookkeeping"  # what the driver or the scan notes about the data (age, fault, counters)
    SETTING = "setting"  # from config (or a process of the controller), changed only by commands between cycles
    OUTPUT = "output"  # the instruction: written by programs, sent to the node by drivers
    STATE = "state"  # computed by programs or the aggregate step, visible to SCADA, not sent


class Kind(enum.Enum):
    """The former single classification, kept as a view (`Field.kind`)."""

    INPUT = "input"
    SETTING = "setting"
    OUTPUT = "output"
    STATE = "state"
    AGGREGATE = "aggregate"


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str  # numpy dtype code
    unit: str  # SI unit; "1" for ratios, "" for codes and counts
    scope: Scope
    role: Role
    doc: str
    lo: float | None = None  # valid range, where one exists (YAML bounds, driver and health checks, retain)
    hi: float | None = None
    yaml: str | None = None  # key in a node entry (NODE) or under `plant:` (AGGREGATE); None = not configured
    default: float | None = None  # YAML default; also what a device that does not report the value offers
    retained: bool = False  # saved and restored across restarts (runtime/retain)
    operator_settable: bool = False  # written by operators (OPC UA, `vbatt reload`) through `command`
    command: str | None = None  # name of the image `Op` that sets it (kernel/image.py); without
    # operator_settable, only a process of the controller sends it (e.g. the hierarchy link)
    historized: bool = False  # the OPC UA server keeps its history

    def __post_init__(self) -> None:
        if self.operator_settable and self.command is None:
            raise ValueError(f"field {self.name}: an operator-settable field needs its command")
        if self.command is not None and (self.lo is None or self.hi is None):
            raise ValueError(f"field {self.name}: a field set by a command needs a range (the scan checks it)")
        if self.yaml is not None and (self.lo is None or self.hi is None or self.default is None):
            raise ValueError(f"field {self.name}: a YAML key needs a range and a default")
        if self.historized and self.scope is not Scope.AGGREGATE:
            raise ValueError(f"field {self.name}: the OPC UA history keeps aggregates only")
        if self.scope is Scope.NODE and self.yaml not in (None, self.name):
            raise ValueError(f"field {self.name}: node keys are the field names (docs/configuration.md)")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def wire(self) -> bool:
        """Carried between a node and the controller (the offer and the instruction)."""
        return self.scope is Scope.NODE and self.role in (Role.MEASUREMENT, Role.OUTPUT)

    @property
    def kind(self) -> Kind:
        if self.scope is Scope.AGGREGATE:
            return Kind.AGGREGATE
        return {Role.MEASUREMENT: Kind.INPUT, Role.BOOKKEEPING: Kind.INPUT, Role.SETTING: Kind.SETTING,
                Role.OUTPUT: Kind.OUTPUT, Role.STATE: Kind.STATE}[self.role]


_N, _A = Scope.NODE, Scope.AGGREGATE
_M, _B, _S, _O, _T = Role.MEASUREMENT, Role.BOOKKEEPING, Role.SETTING, Role.OUTPUT, Role.STATE
_MAX_W = 1e9  # one node: a GW is far past any battery-backed device; beyond it is a unit error


def _measured(name: str, unit: str, doc: str, lo: float, hi: float, default: float | None = None,
              yaml: bool = True) -> Field:
    return Field(name, "f8", unit, _N, _M, doc, lo, hi, yaml=name if yaml else None, default=default)


TABLE: tuple[Field, ...] = (
    # -- per node: what the device reports (the offer) --------------------------------------------------------
    _measured("voltage_v", "V", "battery terminal voltage", 0.0, 2000.0, yaml=False),
    _measured("current_a", "A", "battery current; > 0 = discharging", -10000.0, 10000.0, yaml=False),
    _measured("temperature_c", "degC", "hottest battery sensor", -60.0, 200.0, 25.0),
    _measured("soc", "1", "state of charge, 0..1", 0.0, 1.0, 0.5),
    _measured("capacity_wh", "Wh", "usable energy at soc = 1", 0.0, _MAX_W, 0.0),
    _measured("demand_w", "W", "the device's own load right now", 0.0, _MAX_W, 0.0),
    _measured("max_discharge_w", "W", "discharge the battery/BMS allows now (>= 0)", 0.0, _MAX_W, 0.0),
    _measured("max_charge_w", "W", "charge the battery/BMS allows now (>= 0)", 0.0, _MAX_W, 0.0),
    _measured("link_max_w", "W", "what the node can export to or import from the bus", 0.0, _MAX_W, 0.0),
    # -- per node: bookkeeping of the driver (and `online`, of the scan at latch) -----------------------------
    Field("updated_ns", "i8", "ns", _N, _B, "CLOCK_MONOTONIC time of the last fresh data"),
    Field("fault", "u4", "", _N, _B, "driver fault code; 0 = none (see drivers.faults)"),
    Field("online", "u1", "", _N, _B, "fresh data within the staleness bound (set at latch)"),
    Field("io_requests", "u8", "", _N, _B, "requests the driver sent to this node"),
    Field("io_errors", "u8", "", _N, _B, "requests that failed"),
    Field("io_latency_ms", "f8", "ms", _N, _B, "round-trip time of the last request"),
    # -- per node: operator settings ---------------------------------------------------------------------------
    Field("priority", "i8", "", _N, _S, "0 = most critical; larger = shed first", 0, 1000, yaml="priority",
          default=0, retained=True, operator_settable=True, command="SET_PRIORITY"),
    # -- per node: the instruction -----------------------------------------------------------------------------
    Field("battery_w", "f8", "W", _N, _O, "battery power command: > 0 discharge, < 0 charge"),
    Field("served_w", "f8", "W", _N, _O, "load the node may run (demand - shed)"),
    Field("shed_w", "f8", "W", _N, _O, "load that must be shed"),
    Field("bus_w", "f8", "W", _N, _O, "net flow with the shared bus: > 0 import, < 0 export"),
    # -- per node: program state -------------------------------------------------------------------------------
    Field("forecast_w", "f8", "W", _N, _T, "predicted demand of the node"),
    Field("lo_w", "f8", "W", _N, _T, "lowest battery_w allowed after protection (<= 0: charge)"),
    Field("hi_w", "f8", "W", _N, _T, "highest battery_w allowed after protection (>= 0: discharge)"),
    Field("trip", "u4", "", _N, _T, "latched protection trip reason bits; 0 = none", retained=True),
    Field("alarm", "u4", "", _N, _T, "active health alarm bits; 0 = none", retained=True),
    Field("derate", "f8", "1", _N, _T, "limit factor from health alarms (health's derate table); 1 = none"),
    Field("serve_max_w", "f8", "W", _N, _T, "most load the allocation may serve (+inf; narrowed by the energy "
          "program, docs/energy.md)"),
    Field("runtime_s", "f8", "s", _N, _T, "time the node would stay served if the main supply failed now"),
    # -- the virtual battery -----------------------------------------------------------------------------------
    Field("main_limit_w", "f8", "W", _A, _S, "main supply capacity (operator setting)", 0.0, 1e12,
          yaml="main_limit_w", default=0.0, retained=True, operator_settable=True, command="SET_MAIN_LIMIT"),
    Field("main_w", "f8", "W", _A, _T, "main supply actually used", historized=True),
    Field("demand_w", "f8", "W", _A, _T, "total demand of online nodes", historized=True),
    Field("forecast_w", "f8", "W", _A, _T, "predicted total demand", historized=True),
    Field("deficit_w", "f8", "W", _A, _T, "forecast demand - main supply capacity"),
    Field("battery_w", "f8", "W", _A, _T, "total battery power: > 0 discharge", historized=True),
    Field("available_discharge_w", "f8", "W", _A, _T, "sum of allowed discharge"),
    Field("available_charge_w", "f8", "W", _A, _T, "sum of allowed charge"),
    Field("energy_wh", "f8", "Wh", _A, _T, "stored energy"),
    Field("soc", "f8", "1", _A, _T, "energy-weighted state of charge", historized=True),
    Field("shed_w", "f8", "W", _A, _T, "total load shed", historized=True),
    Field("bus_w", "f8", "W", _A, _T, "sum of node bus flows (= main_w)"),
    Field("nodes_online", "f8", "", _A, _T, "nodes with fresh data"),
    Field("nodes_tripped", "f8", "", _A, _T, "nodes with a latched trip"),
    Field("tree_state", "u1", "", _A, _S, "in a tree of controllers (docs/hierarchy.md): 0 = no parent, "
          "1 = controlled from above, 2 = fallback (the parent stopped renewing: on its own main_limit_w), "
          "3 = handed back (the parent stopped in order: on its own main_limit_w, no fault)",
          0, 3, command="SET_TREE_STATE"),
)


def fields(scope: Scope | None = None, role: Role | tuple[Role, ...] | None = None, **flags) -> tuple[Field, ...]:
    """The table's fields of `scope` and `role` (one or a tuple) whose attributes equal `flags`, e.g.
    `retained=True`; `configured=True` = has a YAML key, `ranged=True` = has a range."""
    roles = (role,) if isinstance(role, Role) else role
    configured = flags.pop("configured", None)
    ranged = flags.pop("ranged", None)
    out = []
    for f in TABLE:
        if scope is not None and f.scope is not scope:
            continue
        if roles is not None and f.role not in roles:
            continue
        if configured is not None and (f.yaml is not None) != configured:
            continue
        if ranged is not None and (f.lo is not None) != ranged:
            continue
        if any(getattr(f, k) != v for k, v in flags.items()):
            continue
        out.append(f)
    return tuple(out)


def names(fs: tuple[Field, ...]) -> tuple[str, ...]:
    return tuple(f.name for f in fs)


# Views of the table by the old groups (image layout, snapshots and the OPC UA model keep this order).
NODE_MEASUREMENTS: tuple[Field, ...] = fields(_N, _M)
NODE_INPUTS: tuple[Field, ...] = fields(_N, (_M, _B))
NODE_SETTINGS: tuple[Field, ...] = fields(_N, _S)
NODE_OUTPUTS: tuple[Field, ...] = fields(_N, _O)
NODE_STATE: tuple[Field, ...] = fields(_N, _T)
NODE_FIELDS: tuple[Field, ...] = fields(_N)
AGGREGATES: tuple[Field, ...] = fields(_A)

_NODE_BY_NAME = {f.name: f for f in NODE_FIELDS}
_AGG_BY_NAME = {f.name: f for f in AGGREGATES}
assert len(_NODE_BY_NAME) == len(NODE_FIELDS) and len(_AGG_BY_NAME) == len(AGGREGATES)
assert NODE_FIELDS == NODE_INPUTS + NODE_SETTINGS + NODE_OUTPUTS + NODE_STATE  # the image's node order


def node_field(name: str) -> Field:
    return _NODE_BY_NAME[name]


def aggregate_field(name: str) -> Field:
    return _AGG_BY_NAME[name]
