"""The SunSpec register map of a vbatt node, as data.

Layout (holding registers, 0-based Modbus addresses as SunSpec counts them):

    40000  'SunS' marker (2 registers)
    40002  model 1    common: manufacturer, model, options, version, serial, device address
    40070  model 802  battery base: SoC, SoH, voltage, current, power, limits, events, heartbeats
    40134  model 64251 (vendor, vbatt): the offer, the agent's status and the instruction/lease block
    40176  end model  (0xFFFF, 0)

Points carry their offset as the SunSpec model definitions give it; `build_map`
recomputes every offset from the sizes and rejects a gap or an overlap, naming
the expected and the got address, so a typo in this table cannot ship. Points
that carry a process-image field name it (`field=`) and take its range from
runtime/kernel/fields.py; `scale` converts the field's SI unit to the point's unit
(soc 0..1 -> %), `sf` is the SunSpec scale factor (power of ten) of the
register. Model 802 has no temperature point: the temperature goes in the
vendor model, with the values the allocator needs at full precision (float32).

Encoding/decoding is vectorised over many nodes at once (a row of registers
per node), because one controller polls thousands of them. `CODEC` (a
`NodeCodec`) is the one translation between field values and rows: the node
agent encodes its offer and decodes the instruction with it, the controller's
driver decodes the offer and encodes the instruction. Points with `device=`
carry values of the device that are no process-image field (its own forecast,
its measured power); `sf_point` names the scale-factor register a reader of
model 802 takes the scale from.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field as dc_field

import numpy as np

from vbatt.kernel.fields import NODE_MEASUREMENTS, NODE_OUTPUTS, names, node_field

__all__ = [
    "SUNS_ADDR", "SUNS", "Point", "Model", "Placed", "RegisterMap", "MapError", "build_map",
    "COMMON", "BATTERY", "VENDOR", "VENDOR_ID", "END_ID", "NODE_MAP", "Mode", "RELEASE_SEQ", "Alarm",
    "encode_strings", "decode_string", "NOT_IMPL", "put", "get", "get_sf", "put_int", "get_int", "static_rows",
    "NodeCodec", "CODEC",
]

SUNS_ADDR = 40000
SUNS = (0x5375, 0x6E53)  # 'SunS'
VENDOR_ID = 64251  # vendor model range 64000..65535; 'vbatt' node
END_ID = 0xFFFF

# SunSpec "not implemented" values
NOT_IMPL = {"uint16": 0xFFFF, "int16": 0x8000, "enum16": 0xFFFF, "bitfield16": 0xFFFF, "uint32": 0xFFFFFFFF,
            "bitfield32": 0xFFFFFFFF, "acc32": 0, "sunssf": 0x8000}

SIZES = {"uint16": 1, "int16": 1, "enum16": 1, "bitfield16": 1, "sunssf": 1, "pad": 1, "uint32": 2,
         "bitfield32": 2, "acc32": 2, "float32": 2}


class MapError(ValueError):
    """The register map table is inconsistent (gap, overlap, unknown type or field)."""


class Mode(enum.IntEnum):
    """Vendor model point `Mode`: who decides the node's battery power."""

    WAITING = 0  # no instruction yet: autonomous until the first one
    CONTROLLED = 1  # following a leased instruction
    AUTONOMOUS = 2  # the lease ran out: own battery for own load, no export
    RELEASED = 3  # handed back by the controller (an orderly stop, Seq 0): as AUTONOMOUS, but no lease ran out


RELEASE_SEQ = 0  # the instruction Seq that hands a node back (no scan cycle is numbered 0 on the wire)


class Alarm(enum.IntFlag):
    """Vendor model point `Alm` (agent-side alarms)."""

    LEASE_EXPIRED = 1
    BACKEND = 2  # the battery backend failed to read
    BAD_INSTRUCTION = 4  # an instruction was refused (NaN, out of range)


@dataclass(frozen=True)
class Point:
    name: str  # SunSpec point id
    offset: int  # offset in the model body, as the model definition states it
    type: str  # SunSpec type: uint16, int16, uint32, float32, string, sunssf, enum16, ...
    size: int = 0  # registers; 0 = from the type (strings must give it)
    field: str | None = None  # the process-image field this point carries
    sf: int = 0  # SunSpec scale factor: register = value * 10**-sf
    scale: float = 1.0  # SI field value * scale = the point's unit (e.g. soc 0..1 -> %)
    writable: bool = False
    value: int | None = None  # constant (scale factors, fixed ids)
    sf_point: str | None = None  # the sunssf point of the same model a reader takes `sf` from
    device: str | None = None  # a device value the wire carries that is no process-image field (backend key)

    @property
    def regs(self) -> int:
        if self.type == "string":
            return self.size
        if self.type not in SIZES:
            raise MapError(f"point {self.name}: unknown type {self.type!r} (expected one of {sorted(SIZES)} or string)")
        return SIZES[self.type]


@dataclass(frozen=True)
class Model:
    id: int
    name: str
    length: int  # body length L (registers after ID and L)
    points: tuple[Point, ...]


def _sf_points(first: int, names_values: list[tuple[str, int]]) -> tuple[Point, ...]:
    return tuple(Point(n, first + k, "sunssf", value=v) for k, (n, v) in enumerate(names_values))


COMMON = Model(1, "common", 66, (
    Point("Mn", 0, "string", 16),
    Point("Md", 16, "string", 16),
    Point("Opt", 32, "string", 8),
    Point("Vr", 40, "string", 8),
    Point("SN", 48, "string", 16),
    Point("DA", 64, "uint16"),
    Point("Pad", 65, "pad"),
))

# Scale factors of model 802, fixed by this map (a reader takes them from the registers anyway).
SF_802 = {"AHRtg_SF": 0, "WHRtg_SF": 0, "WChaDisChaMax_SF": 0, "DisChaRte_SF": 0, "SoC_SF": -2, "DoD_SF": -2,
          "SoH_SF": -2, "V_SF": -1, "CellV_SF": -3, "A_SF": -1, "AMax_SF": -1, "W_SF": 0}


def _sf(name: str) -> dict:
    """A point scaled by model 802's scale factor `name` (its value here, its register for readers)."""
    return {"sf": SF_802[name], "sf_point": name}


BATTERY = Model(802, "battery", 62, (
    Point("AHRtg", 0, "uint16"),
    Point("WHRtg", 1, "uint16", field="capacity_wh", **_sf("WHRtg_SF")),
    Point("WChaRteMax", 2, "uint16", field="max_charge_w", **_sf("WChaDisChaMax_SF")),
    Point("WDisChaRteMax", 3, "uint16", field="max_discharge_w", **_sf("WChaDisChaMax_SF")),
    Point("DisChaRte", 4, "uint16"),
    Point("SoCMax", 5, "uint16", sf=-2),
    Point("SoCMin", 6, "uint16", sf=-2),
    Point("SocRsvMax", 7, "uint16", sf=-2),
    Point("SoCRsvMin", 8, "uint16", sf=-2),
    Point("SoC", 9, "uint16", field="soc", **_sf("SoC_SF"), scale=100.0),
    Point("DoD", 10, "uint16", sf=-2),
    Point("SoH", 11, "uint16", sf=-2),
    Point("NCyc", 12, "uint32"),
    Point("ChaSt", 14, "enum16"),
    Point("LocRemCtl", 15, "enum16"),
    Point("Hb", 16, "uint16"),
    Point("CtrlHb", 17, "uint16", writable=True),
    Point("AlmRst", 18, "uint16", writable=True),
    Point("Typ", 19, "enum16"),
    Point("State", 20, "enum16"),
    Point("StateVnd", 21, "enum16"),
    Point("WarrDt", 22, "uint32"),
    Point("Evt1", 24, "bitfield32"),
    Point("Evt2", 26, "bitfield32"),
    Point("EvtVnd1", 28, "bitfield32"),
    Point("EvtVnd2", 30, "bitfield32"),
    Point("V", 32, "uint16", field="voltage_v", **_sf("V_SF")),
    Point("VMax", 33, "uint16", sf=SF_802["V_SF"]),
    Point("VMin", 34, "uint16", sf=SF_802["V_SF"]),
    Point("CellVMax", 35, "uint16", sf=SF_802["CellV_SF"]),
    Point("CellVMaxStr", 36, "uint16"),
    Point("CellVMaxMod", 37, "uint16"),
    Point("CellVMin", 38, "uint16", sf=SF_802["CellV_SF"]),
    Point("CellVMinStr", 39, "uint16"),
    Point("CellVMinMod", 40, "uint16"),
    Point("CellVAvg", 41, "uint16", sf=SF_802["CellV_SF"]),
    Point("A", 42, "int16", field="current_a", **_sf("A_SF")),
    Point("AChaMax", 43, "uint16", sf=SF_802["AMax_SF"]),
    Point("ADisChaMax", 44, "uint16", sf=SF_802["AMax_SF"]),
    Point("W", 45, "int16", **_sf("W_SF"), device="power_w"),  # battery power; > 0 discharge
    Point("ReqInvState", 46, "enum16"),
    Point("ReqW", 47, "int16"),
    Point("SetOp", 48, "enum16", writable=True),
    Point("SetInvState", 49, "enum16", writable=True),
) + _sf_points(50, list(SF_802.items())))

VENDOR = Model(VENDOR_ID, "vbatt_node", 40, (
    # the offer (written by the agent)
    Point("DemandW", 0, "float32", field="demand_w"),
    Point("ForecastW", 2, "float32", device="forecast_w"),  # the node's own forecast of its demand
    Point("LinkMaxW", 4, "float32", field="link_max_w"),
    Point("MaxDisW", 6, "float32", field="max_discharge_w"),
    Point("MaxChaW", 8, "float32", field="max_charge_w"),
    Point("CapWh", 10, "float32", field="capacity_wh"),
    Point("TmpC", 12, "float32", field="temperature_c"),
    Point("SoCFrac", 14, "float32", field="soc"),
    # the agent's status
    Point("Mode", 16, "enum16"),
    Point("Alm", 17, "bitfield16"),
    Point("AckSeq", 18, "uint32"),
    Point("LeaseLeftMs", 20, "uint32"),
    Point("AppliedW", 22, "float32"),
    Point("Expiries", 24, "uint32"),
    Point("Pad", 26, "pad"),
    Point("Pad2", 27, "pad"),
    # the instruction and its lease (written by the controller, in one request)
    Point("Seq", 28, "uint32", writable=True),
    Point("LeaseMs", 30, "uint32", writable=True),
    Point("BatW", 32, "float32", field="battery_w", writable=True),
    Point("BusW", 34, "float32", field="bus_w", writable=True),
    Point("SrvW", 36, "float32", field="served_w", writable=True),
    Point("ShedW", 38, "float32", field="shed_w", writable=True),
))


@dataclass(frozen=True)
class Placed:
    """A point at its absolute address."""

    model: int
    point: Point
    addr: int

    @property
    def regs(self) -> int:
        return self.point.regs


@dataclass
class RegisterMap:
    base: int
    size: int  # registers from `base` through the end model
    models: dict[int, tuple[int, int]]  # model id -> (header address, body length)
    points: dict[tuple[int, str], Placed] = dc_field(default_factory=dict)

    def at(self, model: int, name: str) -> Placed:
        return self.points[(model, name)]

    def body(self, model: int) -> int:
        return self.models[model][0] + 2

    def field_range(self, name: str) -> tuple[float | None, float | None]:
        f = node_field(name)
        return f.lo, f.hi


def build_map(models: tuple[Model, ...], base: int = SUNS_ADDR) -> RegisterMap:
    """Place the models one after the other; reject gaps, overlaps and unknown fields."""
    out = RegisterMap(base=base, size=0, models={})
    addr = base + 2  # after 'SunS'
    for m in models:
        out.models[m.id] = (addr, m.length)
        body = addr + 2
        expect = body
        for p in m.points:
            got = body + p.offset
            if got != expect:
                what = "gap" if got > expect else "overlap"
                raise MapError(f"model {m.id} point {p.name}: {what}: expected address {expect} "
                               f"(offset {expect - body}), got {got} (offset {p.offset})")
            if p.field is not None:
                try:
                    node_field(p.field)
                except KeyError:
                    raise MapError(f"model {m.id} point {p.name}: unknown field {p.field!r} "
                                   f"(expected a name from runtime/kernel/fields.py)") from None
            if p.sf_point is not None:
                ref = next((q for q in m.points if q.name == p.sf_point), None)
                if ref is None or ref.type != "sunssf" or ref.value != p.sf:
                    raise MapError(f"model {m.id} point {p.name}: scale factor point {p.sf_point!r} is not a "
                                   f"sunssf point of value {p.sf} in model {m.id}")
            out.points[(m.id, p.name)] = Placed(m.id, p, got)
            expect = got + p.regs
        if expect != body + m.length:
            raise MapError(f"model {m.id}: points end at address {expect}, expected {body + m.length} "
                           f"(model length {m.length})")
        addr = body + m.length
    out.size = addr + 2 - base  # end model: ID + L
    return out


NODE_MAP = build_map((COMMON, BATTERY, VENDOR))


# -- encoding: one row of registers per node ------------------------------------------------------
def encode_strings(text: str, regs: int) -> list[int]:
    raw = text.encode("ascii", "replace")[: regs * 2].ljust(regs * 2, b"\0")
    return [int.from_bytes(raw[k:k + 2], "big") for k in range(0, regs * 2, 2)]


def decode_string(words) -> str:
    raw = b"".join(int(w).to_bytes(2, "big") for w in words)
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def put(rows: np.ndarray, p: Placed, start: int, values: np.ndarray) -> None:
    """Write `values` (SI, one per row) into the point's registers; rows are uint16 with column 0 = `start`."""
    pt = p.point
    c = p.addr - start
    v = np.asarray(values, dtype=np.float64) * pt.scale
    if pt.type == "float32":
        rows[:, c:c + 2] = v.astype(">f4").view(">u2").reshape(-1, 2)
        return
    raw = np.round(v * 10.0 ** (-pt.sf))
    bad = ~np.isfinite(raw)
    if pt.type in ("uint16", "enum16", "bitfield16"):
        out = np.where(bad | (raw < 0) | (raw > 0xFFFE), NOT_IMPL["uint16"], np.where(bad, 0, raw))
        rows[:, c] = out.astype(np.uint16)
    elif pt.type == "int16":
        out = np.where(bad | (raw < -0x7FFF) | (raw > 0x7FFF), -0x8000, np.where(bad, 0, raw))
        rows[:, c] = out.astype(np.int16).view(np.uint16)
    elif pt.type in ("uint32", "bitfield32", "acc32"):
        out = np.where(bad | (raw < 0) | (raw > 0xFFFFFFFE), 0xFFFFFFFF, np.where(bad, 0, raw)).astype(np.uint32)
        rows[:, c] = (out >> 16).astype(np.uint16)
        rows[:, c + 1] = (out & 0xFFFF).astype(np.uint16)
    else:
        raise MapError(f"point {pt.name}: cannot encode type {pt.type}")


def _raw(rows: np.ndarray, p: Placed, start: int) -> np.ndarray:
    """The unscaled register value of an integer point as float64; 'not implemented' comes back as NaN."""
    pt = p.point
    c = p.addr - start
    if pt.type in ("uint16", "enum16", "bitfield16"):
        raw = rows[:, c].astype(np.float64)
        raw[rows[:, c] == NOT_IMPL["uint16"]] = np.nan
    elif pt.type == "int16":
        r = rows[:, c].astype(np.uint16).view(np.int16)
        raw = r.astype(np.float64)
        raw[r == -0x8000] = np.nan
    elif pt.type in ("uint32", "bitfield32", "acc32"):
        u = (rows[:, c].astype(np.uint64) << 16) | rows[:, c + 1].astype(np.uint64)
        raw = u.astype(np.float64)
        raw[u == 0xFFFFFFFF] = np.nan
    else:
        raise MapError(f"point {pt.name}: cannot decode type {pt.type}")
    return raw


def get(rows: np.ndarray, p: Placed, start: int) -> np.ndarray:
    """Decode the point from every row into SI float64 (with the map's scale factor); 'not implemented'
    and NaN come back as NaN."""
    pt = p.point
    c = p.addr - start
    if pt.type == "float32":
        pair = np.ascontiguousarray(rows[:, c:c + 2], dtype=">u2")
        with np.errstate(invalid="ignore"):  # a signalling NaN from the wire is just NaN here
            return pair.view(">f4").reshape(-1).astype(np.float64) / pt.scale
    return _raw(rows, p, start) * 10.0 ** pt.sf / pt.scale


def get_sf(rows: np.ndarray, p: Placed, start: int) -> np.ndarray:
    """A sunssf register per row as a float exponent; outside -10..10 (0x8000 = not implemented) it is NaN:
    no usable value, rather than 10**-32768 = 0."""
    v = get_int(rows, p, start).astype(np.int64)
    s = np.where(v >= 0x8000, v - 0x10000, v).astype(np.float64)
    s[(s < -10) | (s > 10)] = np.nan
    return s


def put_int(rows: np.ndarray, p: Placed, start: int, values) -> None:
    """Integers (sequence numbers, modes) exactly, without scaling."""
    c = p.addr - start
    v = np.asarray(values, dtype=np.uint64)
    if p.regs == 2:
        rows[:, c] = (v >> 16).astype(np.uint16)
        rows[:, c + 1] = (v & 0xFFFF).astype(np.uint16)
    else:
        rows[:, c] = (v & 0xFFFF).astype(np.uint16)


def get_int(rows: np.ndarray, p: Placed, start: int) -> np.ndarray:
    c = p.addr - start
    if p.regs == 2:
        return (rows[:, c].astype(np.uint64) << 16) | rows[:, c + 1].astype(np.uint64)
    return rows[:, c].astype(np.uint64)


def static_rows(n: int, idents: list[dict[str, str]], m: RegisterMap = NODE_MAP) -> np.ndarray:
    """Every register of n nodes with the constant parts filled: marker, headers, identity, scale factors."""
    rows = np.zeros((n, m.size), np.uint16)
    rows[:, 0:2] = SUNS
    for mid, (hdr, length) in m.models.items():
        rows[:, hdr - m.base] = mid
        rows[:, hdr - m.base + 1] = length
    rows[:, m.size - 2] = END_ID
    rows[:, m.size - 1] = 0
    for (mid, _name), p in m.points.items():
        pt = p.point
        if pt.type == "sunssf":
            rows[:, p.addr - m.base] = np.uint16(pt.value & 0xFFFF)
        elif pt.type in NOT_IMPL and pt.field is None and not pt.writable and mid == 802:
            # unimplemented points of model 802 read as "not implemented", as the spec asks
            put_int(rows, p, m.base, np.full(n, NOT_IMPL[pt.type] if pt.type != "acc32" else 0))
    for i, ident in enumerate(idents):
        for name in ("Mn", "Md", "Opt", "Vr", "SN"):
            p = m.at(1, name)
            rows[i, p.addr - m.base:p.addr - m.base + p.regs] = encode_strings(ident.get(name, ""), p.regs)
        rows[i, m.at(1, "DA").addr - m.base] = int(ident.get("DA", 1))
    return rows


# -- the codec: field values <-> register rows, for both sides of the wire ---------------------------------
_STRUCT = {"uint32": "I", "float32": "f", "uint16": "H", "int16": "h"}


class NodeCodec:
    """A node's field values to and from register rows of `m`, vectorised over nodes (one row each).

    The node agent encodes its offer and decodes the instruction; the controller's driver decodes the
    offer and encodes the instruction. The points come from the map (`field=` / `device=`), the field
    list from the table: every device measurement is carried by model 802 (scaled, for plain SunSpec
    readers), by the vendor model (float32, SI, what the allocator needs at full precision) or both;
    the instruction is the vendor model's writable block: `Seq`, `LeaseMs`, then the output fields.
    """

    def __init__(self, m: RegisterMap, vendor: int = VENDOR_ID, battery: int = 802):
        self.m = m
        placed = sorted((p for p in m.points.values() if p.model in (vendor, battery)), key=lambda p: p.addr)
        offer = [p for p in placed if not p.point.writable and (p.point.field or p.point.device)]
        self.offer_points: tuple[Placed, ...] = tuple(offer)
        self.vendor_points = {p.point.field: p for p in offer if p.model == vendor and p.point.field}
        self.battery_points = {p.point.field: p for p in offer if p.model == battery and p.point.field}
        carried = set(self.vendor_points) | set(self.battery_points)
        self.fields: tuple[str, ...] = names(NODE_MEASUREMENTS)  # the offer, in table order
        missing = [f for f in self.fields if f not in carried]
        stray = sorted(carried - set(self.fields))
        if missing or stray:
            raise MapError(f"the offer points must carry exactly the device measurements of the field table: "
                           f"missing {missing}, not measurements {stray}")
        self.devices = tuple(dict.fromkeys(p.point.device for p in offer if p.point.device))
        self.offer_keys: tuple[str, ...] = self.fields + self.devices  # what a battery backend provides
        # what a node without a point for the field (plain SunSpec, an explicit map) honestly offers
        self.absent = {f: float(node_field(f).default or 0.0) for f in self.fields}
        self.sf_points = {f: m.at(battery, p.point.sf_point) for f, p in self.battery_points.items()}
        instr = [p for p in placed if p.model == vendor and p.point.writable]
        for a, b in zip(instr, instr[1:]):
            if b.addr != a.addr + a.regs:
                raise MapError(f"instruction block: {b.point.name} at {b.addr} does not follow {a.point.name}")
        self.seq_point, self.lease_point, *outs = instr
        if (self.seq_point.point.name, self.lease_point.point.name) != ("Seq", "LeaseMs") or \
                any(p.point.field is None for p in outs):
            raise MapError("instruction block: expected Seq, LeaseMs, then points carrying output fields")
        self.instruction_points: tuple[Placed, ...] = tuple(outs)
        self.outputs: tuple[str, ...] = tuple(p.point.field for p in outs)
        if sorted(self.outputs) != sorted(names(NODE_OUTPUTS)):
            raise MapError(f"instruction block carries {list(self.outputs)}, the field table's outputs are "
                           f"{list(names(NODE_OUTPUTS))}")
        self.instr_first = instr[0].addr
        self.instr_end = instr[-1].addr + instr[-1].regs
        # one request's instruction, decoded with plain struct (the agent does it inside every request)
        self._instr = struct.Struct(">" + "".join(_STRUCT[p.point.type] for p in instr))
        self._words = struct.Struct(f">{self.instr_end - self.instr_first}H")

    # -- the offer ----------------------------------------------------------------------------------
    def encode_offer(self, rows: np.ndarray, values: Mapping[str, np.ndarray]) -> None:
        """Every offer point of every row from `values` (SI; keys `offer_keys`)."""
        for p in self.offer_points:
            put(rows, p, self.m.base, values[p.point.field or p.point.device])

    def decode_offer(self, rows: np.ndarray, vendor: np.ndarray) -> dict[str, np.ndarray]:
        """The device measurements of every row: from the vendor model where `vendor`, else from model 802
        scaled by the scale factors *in the registers*, else what a node without the point offers."""
        base = self.m.base
        sf = {}
        out = {}
        for f in self.fields:
            bp = self.battery_points.get(f)
            if bp is not None:
                name = bp.point.sf_point
                if name not in sf:
                    sf[name] = get_sf(rows, self.sf_points[f], base)
                plain = _raw(rows, bp, base) * 10.0 ** sf[name] / bp.point.scale
            else:
                plain = self.absent[f]
            vp = self.vendor_points.get(f)
            out[f] = np.where(vendor, get(rows, vp, base), plain) if vp is not None else plain
        return out

    # -- the instruction -----------------------------------------------------------------------------
    def encode_instruction(self, rows: np.ndarray, seq, lease_ms, outputs: Mapping[str, np.ndarray]) -> None:
        base = self.m.base
        put_int(rows, self.seq_point, base, seq)
        put_int(rows, self.lease_point, base, lease_ms)
        for p in self.instruction_points:
            put(rows, p, base, np.nan_to_num(outputs[p.point.field]))

    def decode_instruction(self, words) -> tuple[int, int, dict[str, float]]:
        """(Seq, LeaseMs, {output field: value}) of one written instruction block (`instr_end - instr_first`
        registers from `instr_first`)."""
        seq, lease, *ws = self._instr.unpack(self._words.pack(*words))
        return seq, lease, dict(zip(self.outputs, ws))


CODEC = NodeCodec(NODE_MAP)
