"""Sparkplug B 3.0: the payload schema, the topics, and vbatt's metrics derived from the field table.

The schema is the Sparkplug B protobuf definition (Eclipse Tahu's `sparkplug_b.proto`, package
`org.eclipse.tahu.protobuf`, proto2), declared here as a `FileDescriptorProto` and turned into
message classes by the `protobuf` runtime: no generated `_pb2` module to vendor, no `protoc` at
build time, and no generated code tied to one protobuf release. tests/test_mqtt_interop.py checks it
field by field against the compiled descriptor of an independent implementation (pysparkplug).

Metrics (docs/mqtt.md "Metrics"), each a Sparkplug datatype from the field's numpy dtype and its
unit in the birth's `engUnit` property:

* a device (one battery node) births and reports every device measurement of
  runtime/kernel/fields.py under its field name, the values of the device that are no image field
  (its own forecast and power, the offer keys of the node backends) under `device/<name>`, its
  status under `status/<name>` and the instruction it follows under `instruction/<name>` (the output
  fields, `seq`, `lease_ms`, `epoch`);
* a DCMD writes the `instruction/` metrics: the outputs, the sequence number, the lease;
* an edge node births `bdSeq` and `Node Control/Rebirth`.

Aliases: metric j of device k has alias (k + 1) * ALIAS_STRIDE + j, node metrics 0..; unique
within the edge node as Sparkplug requires. DATA messages carry aliases only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from vbatt.drivers.modbus import sunspec as ss
from vbatt.kernel.fields import NODE_MEASUREMENTS, NODE_OUTPUTS, Field, names

__all__ = ["NAMESPACE", "Payload", "DataType", "Metric", "DEVICE_METRICS", "COMMAND_METRICS", "NODE_METRICS",
           "ALIAS_STRIDE", "BDSEQ", "REBIRTH", "topic", "parse_topic", "state_payload", "VALUE_FIELD",
           "set_value", "get_value", "SIGNED_BITS", "MODE", "ALARM", "DEVICE_EXTRAS", "pb_descriptor"]

NAMESPACE = "spBv1.0"
ALIAS_STRIDE = 64


# -- the schema --------------------------------------------------------------------------------------------
class DataType:
    """Sparkplug B datatypes (the enum of the schema; only the scalars vbatt uses are named here)."""

    Unknown, Int8, Int16, Int32, Int64, UInt8, UInt16, UInt32, UInt64 = range(9)
    Float, Double, Boolean, String, DateTime, Text = range(9, 15)
    UUID, DataSet, Bytes, File, Template, PropertySet, PropertySetList = range(15, 22)


_ENUM = ["Unknown", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float", "Double",
         "Boolean", "String", "DateTime", "Text", "UUID", "DataSet", "Bytes", "File", "Template", "PropertySet",
         "PropertySetList", "Int8Array", "Int16Array", "Int32Array", "Int64Array", "UInt8Array", "UInt16Array",
         "UInt32Array", "UInt64Array", "FloatArray", "DoubleArray", "BooleanArray", "StringArray", "DateTimeArray"]

_T = descriptor_pb2.FieldDescriptorProto
_TYPES = {"uint32": _T.TYPE_UINT32, "uint64": _T.TYPE_UINT64, "float": _T.TYPE_FLOAT, "double": _T.TYPE_DOUBLE,
          "bool": _T.TYPE_BOOL, "string": _T.TYPE_STRING, "bytes": _T.TYPE_BYTES}
_PKG = "org.eclipse.tahu.protobuf"
_MAX = 536870911  # extensions N to max


def _msg(name: str, fields: list, nested: tuple = (), ext_from: int | None = None, oneof: str | None = None):
    m = descriptor_pb2.DescriptorProto(name=name)
    for n in nested:
        m.nested_type.append(n)
    if oneof:
        m.oneof_decl.add(name=oneof)
    for num, fname, ftype, label, in_oneof in fields:
        f = m.field.add(name=fname, number=num, json_name=_camel(fname))
        f.label = _T.LABEL_REPEATED if label == "repeated" else _T.LABEL_OPTIONAL
        if ftype in _TYPES:
            f.type = _TYPES[ftype]
        else:
            f.type = _T.TYPE_MESSAGE
            f.type_name = f".{_PKG}.{ftype}"
        if in_oneof:
            f.oneof_index = 0
    if ext_from is not None:
        m.extension_range.add(start=ext_from, end=_MAX + 1)
    return m


def _camel(s: str) -> str:
    head, *rest = s.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)


def _values(first: int, extension: str, kinds: tuple[str, ...]) -> list:
    names_ = {"uint32": "int_value", "uint64": "long_value", "float": "float_value", "double": "double_value",
              "bool": "boolean_value", "string": "string_value", "bytes": "bytes_value"}
    out = []
    for k, t in enumerate(kinds):
        if t in names_:
            out.append((first + k, names_[t], t, "optional", True))
        else:
            out.append((first + k, t[0], t[1], "optional", True))
    out.append((first + len(kinds), "extension_value", extension, "optional", True))
    return out


def pb_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """The Sparkplug B schema as a FileDescriptorProto (sparkplug_b.proto of Eclipse Tahu)."""
    P = "Payload"
    f = descriptor_pb2.FileDescriptorProto(name="sparkplug_b.proto", package=_PKG, syntax="proto2")
    f.options.java_package = _PKG
    f.options.java_outer_classname = "SparkplugBProto"
    e = f.enum_type.add(name="DataType")
    for k, n in enumerate(_ENUM):
        e.value.add(name=n, number=k)
    scalars = ("uint32", "uint64", "float", "double", "bool", "string")
    param = _msg("Parameter", [(1, "name", "string", "optional", False), (2, "type", "uint32", "optional", False)]
                 + _values(3, f"{P}.Template.Parameter.ParameterValueExtension", scalars),
                 nested=(_msg("ParameterValueExtension", [], ext_from=1),), oneof="value")
    template = _msg("Template", [(1, "version", "string", "optional", False),
                                 (2, "metrics", f"{P}.Metric", "repeated", False),
                                 (3, "parameters", f"{P}.Template.Parameter", "repeated", False),
                                 (4, "template_ref", "string", "optional", False),
                                 (5, "is_definition", "bool", "optional", False)], nested=(param,), ext_from=6)
    dsv = _msg("DataSetValue", _values(1, f"{P}.DataSet.DataSetValue.DataSetValueExtension", scalars),
               nested=(_msg("DataSetValueExtension", [], ext_from=1),), oneof="value")
    row = _msg("Row", [(1, "elements", f"{P}.DataSet.DataSetValue", "repeated", False)], ext_from=2)
    dataset = _msg("DataSet", [(1, "num_of_columns", "uint64", "optional", False),
                               (2, "columns", "string", "repeated", False),
                               (3, "types", "uint32", "repeated", False),
                               (4, "rows", f"{P}.DataSet.Row", "repeated", False)], nested=(dsv, row), ext_from=5)
    pv = _msg("PropertyValue", [(1, "type", "uint32", "optional", False), (2, "is_null", "bool", "optional", False)]
              + _values(3, f"{P}.PropertyValue.PropertyValueExtension",
                        scalars + (("propertyset_value", f"{P}.PropertySet"),
                                   ("propertysets_value", f"{P}.PropertySetList"))),
              nested=(_msg("PropertyValueExtension", [], ext_from=1),), oneof="value")
    ps = _msg("PropertySet", [(1, "keys", "string", "repeated", False),
                              (2, "values", f"{P}.PropertyValue", "repeated", False)], ext_from=3)
    psl = _msg("PropertySetList", [(1, "propertyset", f"{P}.PropertySet", "repeated", False)], ext_from=2)
    meta = _msg("MetaData", [(1, "is_multi_part", "bool", "optional", False),
                             (2, "content_type", "string", "optional", False),
                             (3, "size", "uint64", "optional", False), (4, "seq", "uint64", "optional", False),
                             (5, "file_name", "string", "optional", False),
                             (6, "file_type", "string", "optional", False), (7, "md5", "string", "optional", False),
                             (8, "description", "string", "optional", False)], ext_from=9)
    metric = _msg("Metric", [(1, "name", "string", "optional", False), (2, "alias", "uint64", "optional", False),
                             (3, "timestamp", "uint64", "optional", False),
                             (4, "datatype", "uint32", "optional", False),
                             (5, "is_historical", "bool", "optional", False),
                             (6, "is_transient", "bool", "optional", False),
                             (7, "is_null", "bool", "optional", False),
                             (8, "metadata", f"{P}.MetaData", "optional", False),
                             (9, "properties", f"{P}.PropertySet", "optional", False)]
                  + _values(10, f"{P}.Metric.MetricValueExtension",
                            scalars[:6] + ("bytes", ("dataset_value", f"{P}.DataSet"),
                                           ("template_value", f"{P}.Template"))),
                  nested=(_msg("MetricValueExtension", [], ext_from=1),), oneof="value")
    payload = _msg(P, [(1, "timestamp", "uint64", "optional", False), (2, "metrics", f"{P}.Metric", "repeated", False),
                       (3, "seq", "uint64", "optional", False), (4, "uuid", "string", "optional", False),
                       (5, "body", "bytes", "optional", False)],
                   nested=(template, dataset, pv, ps, psl, meta, metric), ext_from=6)
    f.message_type.append(payload)
    return f


def _classes():
    pool = descriptor_pool.DescriptorPool()
    fd = pool.Add(pb_descriptor())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PKG}.Payload")), fd


Payload, _FILE = _classes()
Metric = Payload.Metric

# the value field of a Metric for each datatype
VALUE_FIELD = {DataType.Int8: "int_value", DataType.Int16: "int_value", DataType.Int32: "int_value",
               DataType.UInt8: "int_value", DataType.UInt16: "int_value", DataType.UInt32: "int_value",
               DataType.Int64: "long_value", DataType.UInt64: "long_value", DataType.DateTime: "long_value",
               DataType.Float: "float_value", DataType.Double: "double_value", DataType.Boolean: "boolean_value",
               DataType.String: "string_value", DataType.Text: "string_value"}
SIGNED_BITS = {DataType.Int8: 32, DataType.Int16: 32, DataType.Int32: 32, DataType.Int64: 64}


def set_value(m, datatype: int, value) -> None:
    """Sparkplug stores signed integers two's complement in the unsigned fields."""
    attr = VALUE_FIELD[datatype]
    if attr == "int_value" or attr == "long_value":
        v = int(value)
        bits = SIGNED_BITS.get(datatype)
        setattr(m, attr, v & ((1 << bits) - 1) if bits else v)
    elif attr == "boolean_value":
        m.boolean_value = bool(value)
    else:
        setattr(m, attr, value)


def get_value(m, datatype: int):
    attr = VALUE_FIELD.get(datatype)
    if attr is None:
        raise ValueError(f"datatype {datatype} is not a scalar vbatt reads")
    v = getattr(m, attr)
    bits = SIGNED_BITS.get(datatype)
    if bits and v >= 1 << (bits - 1):
        v -= 1 << bits
    return v


# -- vbatt's metrics ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricDef:
    name: str
    datatype: int
    unit: str
    doc: str
    field: str | None = None  # the process-image field it carries


_BY_DTYPE = {"f8": DataType.Double, "f4": DataType.Float, "i8": DataType.Int64, "u8": DataType.UInt64,
             "u4": DataType.UInt32, "u1": DataType.UInt8, "i4": DataType.Int32}


def _of(f: Field, prefix: str = "") -> MetricDef:
    return MetricDef(prefix + f.name, _BY_DTYPE[f.dtype], f.unit, f.doc, f.name)


def _extras() -> tuple[str, ...]:
    from vbatt.drivers.node.backends import OFFER

    return tuple(k for k in OFFER if k not in names(NODE_MEASUREMENTS))


DEVICE_EXTRAS = _extras()  # what a node backend offers beyond the image fields (its own forecast, its power)
# status/mode is the Modbus vendor model's Mode point, value for value (sunspec.Mode declares them); what a
# host reads in each value that the name does not say
MODE = tuple(m.name for m in ss.Mode)
assert [m.value for m in ss.Mode] == list(range(len(MODE)))
_MODE_NOTES = {"WAITING": "no instruction yet", "AUTONOMOUS": "a lease ran out",
               "RELEASED": "handed back by the controller's orderly stop: on its own, no lease ran out"}
ALARM = {"LEASE_EXPIRED": 1, "BACKEND": 2, "BAD_INSTRUCTION": 4}  # status/alarm bits, as its Alm point

STATUS_METRICS: tuple[MetricDef, ...] = (
    MetricDef("status/mode", DataType.UInt8, "", ", ".join(
        f"{k} {name}" + (f" ({_MODE_NOTES[name]})" if name in _MODE_NOTES else "") for k, name in enumerate(MODE))),
    MetricDef("status/alarm", DataType.UInt16, "", "bits: 1 LEASE_EXPIRED, 2 BACKEND, 4 BAD_INSTRUCTION"),
    MetricDef("status/ack_seq", DataType.UInt64, "", "sequence number of the instruction accepted last"),
    MetricDef("status/ack_epoch", DataType.UInt64, "ms", "epoch of the instruction accepted last"),
    MetricDef("status/lease_left_ms", DataType.UInt32, "ms", "time left on the lease (0 unless CONTROLLED)"),
    MetricDef("status/applied_w", DataType.Double, "W", "battery power the node applies now"),
    MetricDef("status/expiries", DataType.UInt32, "", "leases that ran out"),
    MetricDef("status/refused", DataType.UInt32, "", "commands refused (bad values, stale sequence numbers)"),
)
COMMAND_METRICS: tuple[MetricDef, ...] = (
    MetricDef("instruction/seq", DataType.UInt64, "", "the instruction's sequence number (the scan cycle)"),
    MetricDef("instruction/lease_ms", DataType.UInt32, "ms", "how long the instruction holds (1 .. 3,600,000)"),
    MetricDef("instruction/epoch", DataType.UInt64, "ms", "the host's STATE birth time: orders sequence "
              "numbers across controller restarts"),
    *(_of(f, "instruction/") for f in NODE_OUTPUTS),
)
DEVICE_METRICS: tuple[MetricDef, ...] = (
    *(_of(f) for f in NODE_MEASUREMENTS),
    *(MetricDef(f"device/{k}", DataType.Double, "W", "the device's own value (no image field)") for k in DEVICE_EXTRAS),
    *STATUS_METRICS,
    *COMMAND_METRICS,
)
assert len(DEVICE_METRICS) < ALIAS_STRIDE
BDSEQ = MetricDef("bdSeq", DataType.UInt64, "", "birth/death sequence of the edge node's session")
REBIRTH = MetricDef("Node Control/Rebirth", DataType.Boolean, "", "write true: the edge node births again")
NODE_METRICS: tuple[MetricDef, ...] = (BDSEQ, REBIRTH)


# -- topics ------------------------------------------------------------------------------------------------
def topic(group: str, kind: str, edge: str, device: str | None = None) -> str:
    return f"{NAMESPACE}/{group}/{kind}/{edge}" + (f"/{device}" if device else "")


def parse_topic(t: bytes | str) -> tuple[str, str, str, str | None] | None:
    """(group, message type, edge node, device or None); None for STATE and foreign topics."""
    s = t.decode() if isinstance(t, bytes) else t
    parts = s.split("/")
    if len(parts) < 4 or parts[0] != NAMESPACE or parts[1] == "STATE":
        return None
    if len(parts) == 4:
        return parts[1], parts[2], parts[3], None
    if len(parts) == 5:
        return parts[1], parts[2], parts[3], parts[4]
    return None


def state_payload(online: bool, timestamp_ms: int) -> bytes:
    """Sparkplug 3.0 host STATE (JSON, retained, QoS 1)."""
    return json.dumps({"online": online, "timestamp": int(timestamp_ms)}).encode()


_TYPE_NAMES = {v: k for k, v in vars(DataType).items() if not k.startswith("_") and isinstance(v, int)}


def metrics_table() -> str:
    """docs/mqtt.md's table of metrics, from the definitions above (a test holds the doc to it)."""
    rows = ["| metric | Sparkplug type | unit | in | meaning |", "|---|---|---|---|---|"]
    for d, where in ((BDSEQ, "NBIRTH, NDEATH"), (REBIRTH, "NBIRTH, NCMD")):
        rows.append(f"| `{d.name}` | {_TYPE_NAMES[d.datatype]} | {d.unit or '-'} | {where} | {d.doc} |")
    for d in DEVICE_METRICS:
        where = "DBIRTH, DDATA, DCMD" if d.name.startswith("instruction/") else "DBIRTH, DDATA"
        rows.append(f"| `{d.name}` | {_TYPE_NAMES[d.datatype]} | {d.unit or '-'} | {where} | {d.doc} |")
    return "\n".join(rows) + "\n"
