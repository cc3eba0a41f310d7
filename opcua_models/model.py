"""The OPC UA information model, derived from the field table (`vbatt.kernel.fields`).

Nothing here spells a field's type, unit or range: `node_vars()` and
`aggregate_vars()` read them from `fields.py`, and the NodeSet2 XML
(`vbatt.NodeSet2.xml`, written by `nodeset.py`) and the server's instances are
both built from these definitions, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncua import ua

from vbatt.kernel.fields import AGGREGATES, NODE_FIELDS, Field, Scope, aggregate_field, fields, node_field

__all__ = [
    "NS_URI",
    "VarDef",
    "MethodDef",
    "ArgDef",
    "node_vars",
    "aggregate_vars",
    "scan_vars",
    "class_vars",
    "CLASS_MEMORY",
    "class_object_id",
    "METHODS",
    "HISTORIZED",
    "TYPE_IDS",
    "decl_ids",
    "VB_ID",
    "RESERVED_IDS",
    "eu_information",
]

NS_URI = "http://vbatt.org/UA/VirtualBattery/"
VB_ID = "VirtualBattery"  # string NodeId of the one virtual battery instance
RESERVED_IDS = (VB_ID,)

# CLOCK_MONOTONIC nanoseconds mean nothing off the host; the SourceTimestamp carries freshness.
HIDDEN_NODE_FIELDS = ("updated_ns",)
# Writable: the operator settings of the field table; historized: its historized aggregates.
WRITABLE = {(f.scope.value, f.name) for f in fields(operator_settable=True)}
HISTORIZED = tuple(f.name for f in fields(Scope.AGGREGATE, historized=True))

# numpy dtype code -> (DataType NodeId, VariantType)
_DTYPES = {
    "f8": (ua.ObjectIds.Double, ua.VariantType.Double),
    "f4": (ua.ObjectIds.Float, ua.VariantType.Float),
    "i8": (ua.ObjectIds.Int64, ua.VariantType.Int64),
    "i4": (ua.ObjectIds.Int32, ua.VariantType.Int32),
    "u8": (ua.ObjectIds.UInt64, ua.VariantType.UInt64),
    "u4": (ua.ObjectIds.UInt32, ua.VariantType.UInt32),
    "u1": (ua.ObjectIds.Boolean, ua.VariantType.Boolean),  # the only u1 fields are flags
}

# SI unit of the field table -> (UNECE common code, display name, description)
_UNITS = {
    "V": ("VLT", "V", "volt"),
    "A": ("AMP", "A", "ampere"),
    "degC": ("CEL", "°C", "degree Celsius"),
    "W": ("WTT", "W", "watt"),
    "Wh": ("WHR", "Wh", "watt hour"),
    "s": ("SEC", "s", "second"),
    "ms": ("C26", "ms", "millisecond"),
    "us": ("B98", "µs", "microsecond"),
    "ns": ("C47", "ns", "nanosecond"),
    "%": ("P1", "%", "percent"),
}
UNECE_NS = "http://www.opcfoundation.org/UA/units/un/cefact"


def eu_information(unit: str) -> ua.EUInformation:
    code, disp, desc = _UNITS[unit]
    unit_id = 0
    for ch in code:  # OPC UA Part 8: the UNECE code packed into an Int32
        unit_id = (unit_id << 8) | ord(ch)
    return ua.EUInformation(NamespaceUri=UNECE_NS, UnitId=unit_id,
                            DisplayName=ua.LocalizedText(disp, "en"), Description=ua.LocalizedText(desc, "en"))


@dataclass(frozen=True)
class VarDef:
    """One OPC UA variable: browse name, type, unit, range, and where its value comes from."""

    name: str
    datatype: int  # ns=0 DataType id
    vtype: ua.VariantType
    doc: str
    unit: str | None = None  # key of _UNITS, None = no EngineeringUnits
    lo: float | None = None  # EURange, in the shown unit
    hi: float | None = None
    scale: float = 1.0  # shown value = image value * scale (soc is shown in %)
    writable: bool = False
    historized: bool = False
    field: Field | None = None

    @property
    def type_definition(self) -> int:
        if self.unit is not None and self.lo is not None and self.hi is not None:
            return ua.ObjectIds.AnalogItemType  # EURange is mandatory there
        if self.unit is not None:
            return ua.ObjectIds.BaseAnalogType
        return ua.ObjectIds.BaseDataVariableType


def _from_field(f: Field, scope: str) -> VarDef:
    dt, vt = _DTYPES[f.dtype]
    scale, unit, lo, hi = 1.0, (f.unit or None), f.lo, f.hi
    if f.unit == "1":  # ratios: docs/design.md §1 says SCADA shows soc as %
        scale, unit = 100.0, "%"
        lo, hi = (0.0 if lo is None else lo * 100), (100.0 if hi is None else hi * 100)
    if unit is None or vt == ua.VariantType.Boolean:
        lo = hi = None
        unit = None
    return VarDef(f.name, dt, vt, f.doc, unit, lo, hi, scale, f.operator_settable, f.historized, f)


def node_vars() -> tuple[VarDef, ...]:
    return tuple(_from_field(f, "node") for f in NODE_FIELDS if f.name not in HIDDEN_NODE_FIELDS)


def aggregate_vars() -> tuple[VarDef, ...]:
    return tuple(_from_field(f, "agg") for f in AGGREGATES)


_D, _I, _B, _S = (ua.ObjectIds.Double, ua.VariantType.Double), (ua.ObjectIds.Int64, ua.VariantType.Int64), \
    (ua.ObjectIds.Boolean, ua.VariantType.Boolean), (ua.ObjectIds.String, ua.VariantType.String)


def scan_vars() -> tuple[VarDef, ...]:
    """The scan's status words (image `Ctl`) and cycle statistics (`stats.summarize`, sliding window)."""
    out = [
        VarDef("mode", *_S, "RUN or STOP"),
        VarDef("state", *_S, "INIT, WAITING, RUNNING, DONE or FAILED"),
        VarDef("cycles", *_I, "cycles run"),
        VarDef("overruns", *_I, "missed cycle slots, counted"),
        VarDef("watchdog", *_B, "latched after consecutive overruns: outputs safe until RUN"),
        VarDef("safe_state", *_B, "outputs hold the safe allocation"),
        VarDef("program_faults", *_I, "program exceptions (each forced the safe allocation)"),
        VarDef("torn_reads", *_I, "input reads retried past their limit"),
        VarDef("cycle_ms", *_D, "configured scan period", "ms"),
    ]
    for metric, what in (("exec", "execution time"), ("wake", "wake latency"), ("jitter", "period jitter")):
        for q in ("p50", "p99", "max"):
            out.append(VarDef(f"{metric}_{q}_us", *_D, f"{what} {q} over the statistics window", "us"))
    return tuple(out)


# The energy program's class results (programs/energy, published with the image as "mem.energy.<name>"):
# one PriorityClassType object per class under VirtualBattery/Classes.
CLASS_MEMORY = "energy"


def class_vars() -> tuple[VarDef, ...]:
    return (
        VarDef("priority", *_I, "the priority of the class's nodes (0 = most critical)"),
        # historized: a cold start seeds the class's daily demand profile from its own record (docs/energy.md)
        VarDef("demand_w", *_D, "demand of the class (pooled; the forecast when a forecast runs)", "W",
               historized=True),
        VarDef("demand_horizon_w", *_D, "demand the reserve is held for: the class forecast's mean over its "
               "remaining target, never below now", "W"),
        VarDef("reserve_wh", *_D, "energy held for the remaining targets of this class and the more critical ones",
               "Wh"),
        VarDef("target_s", *_D, "ride-through target on the batteries alone (0: none)", "s"),
        VarDef("runtime_s", *_D, "time the class would stay served if the main supply failed now", "s",
               historized=True),
        VarDef("reachable", *_B, "the runtime reaches the target"),
    )


def class_object_id(priority: int) -> str:
    """String NodeId of the object of a priority class."""
    return f"{VB_ID}.Classes.Class_{priority}"


@dataclass(frozen=True)
class ArgDef:
    name: str
    datatype: int
    doc: str


@dataclass(frozen=True)
class MethodDef:
    name: str
    doc: str
    args: tuple[ArgDef, ...]


_NODE_ARG = ArgDef("node_id", ua.ObjectIds.String, "id of the node, as in the config")


def _setting_arg(f: Field) -> ArgDef:
    """The argument of a method that sets an operator setting: its type, unit and range from the table."""
    unit = f"{f.unit}, " if f.unit else ""
    return ArgDef(f.name, _DTYPES[f.dtype][0], f"{unit}{f.lo:g}..{f.hi:g}")
METHODS: tuple[MethodDef, ...] = (
    MethodDef("ResetTrip", "clear the latched protection trips of a node", (_NODE_ARG,)),
    MethodDef("SetPriority", "set a node's priority (0 = most critical)",
              (_NODE_ARG, _setting_arg(node_field("priority")))),
    MethodDef("SetMainSupplyLimit", "set the main supply capacity",
              (_setting_arg(aggregate_field("main_limit_w")),)),
    MethodDef("SetMode", "RUN or STOP the control programs (STOP holds the safe allocation)",
              (ArgDef("mode", ua.ObjectIds.String, "RUN or STOP"),)),
    MethodDef("AcknowledgeAlarm", "acknowledge active alarms of a node (bits 0 = all)",
              (_NODE_ARG, ArgDef("alarm_bits", ua.ObjectIds.UInt32, "alarm bits; 0 = all"))),
    MethodDef("Reload", "apply a changed plant config between two cycles (as `vbatt reload`): priorities, "
              "main supply limit, program parameters; a change that needs a restart is refused whole",
              (ArgDef("config_path", ua.ObjectIds.String, "path of the plant YAML on the controller"),)),
    MethodDef("SetRideThrough", "set the ride-through target of a priority class (energy program; kept across "
              "restarts)", (ArgDef("priority", ua.ObjectIds.Int64, "a priority some node has"),
                            ArgDef("seconds", ua.ObjectIds.Double, "s on the batteries alone, >= 0 (0: none)"))),
)

TYPE_IDS = {"VirtualBatteryType": 1, "BatteryNodeType": 2, "ScanStatusType": 3, "PriorityClassType": 4}


def decl_ids() -> dict[tuple[str, ...], int]:
    """Numeric ids (model namespace) of every instance declaration, in a fixed order.

    Keys: (type, var), (type, var, "EngineeringUnits"|"EURange"), (type, "Scan"),
    (type, "Nodes"), (type, "Classes"), (type, method), (type, method, "InputArguments").
    """
    ids: dict[tuple[str, ...], int] = {}
    nxt = 1000

    def take(key: tuple[str, ...]) -> None:
        nonlocal nxt
        ids[key] = nxt
        nxt += 1

    for tname, vars_ in (("BatteryNodeType", node_vars()), ("VirtualBatteryType", aggregate_vars()),
                         ("ScanStatusType", scan_vars())):
        for v in vars_:
            take((tname, v.name))
            if v.unit is not None:
                take((tname, v.name, "EngineeringUnits"))
            if v.lo is not None:
                take((tname, v.name, "EURange"))
    take(("VirtualBatteryType", "Scan"))
    take(("VirtualBatteryType", "Nodes"))
    for m in METHODS:
        take(("VirtualBatteryType", m.name))
        take(("VirtualBatteryType", m.name, "InputArguments"))
    # added later than the rest: taken last, so that the earlier ids stay what they were
    for v in class_vars():
        take(("PriorityClassType", v.name))
        if v.unit is not None:
            take(("PriorityClassType", v.name, "EngineeringUnits"))
    take(("VirtualBatteryType", "Classes"))
    return ids
