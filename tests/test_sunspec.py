"""The SunSpec map against the published model definitions (sunspec/models json: model_1, model_802)."""

from __future__ import annotations

import numpy as np
import pytest

from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.modbus.driver import FIELDS
from vbatt.kernel.fields import Kind, node_field

# Point name -> (offset in the model body, registers), transcribed from the SunSpec model
# definitions (model_1.json: L = 66; model_802.json: L = 62), independent of drivers/modbus/sunspec.py.
SPEC_1 = {"Mn": (0, 16), "Md": (16, 16), "Opt": (32, 8), "Vr": (40, 8), "SN": (48, 16), "DA": (64, 1), "Pad": (65, 1)}
SPEC_802 = {
    "AHRtg": 0, "WHRtg": 1, "WChaRteMax": 2, "WDisChaRteMax": 3, "DisChaRte": 4, "SoCMax": 5, "SoCMin": 6,
    "SocRsvMax": 7, "SoCRsvMin": 8, "SoC": 9, "DoD": 10, "SoH": 11, "NCyc": 12, "ChaSt": 14, "LocRemCtl": 15,
    "Hb": 16, "CtrlHb": 17, "AlmRst": 18, "Typ": 19, "State": 20, "StateVnd": 21, "WarrDt": 22, "Evt1": 24,
    "Evt2": 26, "EvtVnd1": 28, "EvtVnd2": 30, "V": 32, "VMax": 33, "VMin": 34, "CellVMax": 35, "CellVMaxStr": 36,
    "CellVMaxMod": 37, "CellVMin": 38, "CellVMinStr": 39, "CellVMinMod": 40, "CellVAvg": 41, "A": 42, "AChaMax": 43,
    "ADisChaMax": 44, "W": 45, "ReqInvState": 46, "ReqW": 47, "SetOp": 48, "SetInvState": 49, "AHRtg_SF": 50,
    "WHRtg_SF": 51, "WChaDisChaMax_SF": 52, "DisChaRte_SF": 53, "SoC_SF": 54, "DoD_SF": 55, "SoH_SF": 56,
    "V_SF": 57, "CellV_SF": 58, "A_SF": 59, "AMax_SF": 60, "W_SF": 61,
}
SPEC_802_TYPES = {"NCyc": "uint32", "WarrDt": "uint32", "Evt1": "bitfield32", "A": "int16", "W": "int16",
                  "ReqW": "int16", "ChaSt": "enum16", "V_SF": "sunssf"}


def test_layout_is_the_standard_one():
    m = ss.NODE_MAP
    assert m.base == 40000
    assert m.models[1] == (40002, 66)
    assert m.models[802] == (40070, 62)
    assert m.models[ss.VENDOR_ID][0] == 40134
    assert 64000 <= ss.VENDOR_ID <= 65535  # the vendor model range
    for name, (off, regs) in SPEC_1.items():
        p = m.at(1, name)
        assert (p.addr - m.body(1), p.regs) == (off, regs), name
    assert {p.point.name for p in m.points.values() if p.model == 802} == set(SPEC_802)
    for name, off in SPEC_802.items():
        assert m.at(802, name).addr - m.body(802) == off, name
    for name, typ in SPEC_802_TYPES.items():
        assert m.at(802, name).point.type == typ, name


def test_points_carry_exactly_the_fields_the_drivers_exchange():
    pts = [p for p in ss.NODE_MAP.points.values() if p.point.field]
    read = {p.point.field for p in pts if not p.point.writable}
    written = {p.point.field for p in pts if p.point.writable}
    assert read == set(FIELDS)  # every field the poller decodes has a point, and no point feeds another one
    assert written == {"battery_w", "bus_w", "served_w", "shed_w"}  # the instruction, nothing else
    for p in pts:  # the device offers inputs and is told outputs, never the other way round
        assert node_field(p.point.field).kind == (Kind.OUTPUT if p.point.writable else Kind.INPUT), p.point.name
    # the offer travels exactly (float32, SI units) in the vendor model, except what 802 alone carries
    vendor = {p.point.field for p in pts if p.model == ss.VENDOR_ID and p.point.type == "float32"}
    assert set(FIELDS) - vendor == {"voltage_v", "current_a"}
    # SoC is a fraction in the image and a percentage on the wire
    assert node_field("soc").unit == "1" and ss.NODE_MAP.at(802, "SoC").point.scale == 100.0


def test_static_rows_marker_headers_and_end_model():
    m = ss.NODE_MAP
    rows = ss.static_rows(2, [{"Mn": "vbatt", "SN": "rack-1"}, {"Mn": "vbatt", "SN": "rack-2"}])
    assert tuple(rows[0, 0:2]) == (0x5375, 0x6E53)  # 'SunS'
    assert rows[1, 2] == 1 and rows[1, 3] == 66
    assert rows[0, 40070 - m.base] == 802 and rows[0, 40071 - m.base] == 62
    assert tuple(rows[0, -2:]) == (0xFFFF, 0)
    sn = m.at(1, "SN")
    assert ss.decode_string(rows[1, sn.addr - m.base:sn.addr - m.base + sn.regs]) == "rack-2"
    # scale factors are readable constants; SoC is in % with SoC_SF = -2
    assert rows[0, m.at(802, "SoC_SF").addr - m.base] == np.uint16(-2 & 0xFFFF)


def test_gap_and_overlap_are_rejected_with_addresses():
    gap = ss.Model(64999, "x", 3, (ss.Point("A", 0, "uint16"), ss.Point("B", 2, "uint16")))
    with pytest.raises(ss.MapError, match=r"model 64999 point B: gap: expected address 40005 \(offset 1\), got 40006"):
        ss.build_map((gap,))
    over = ss.Model(64999, "x", 2, (ss.Point("A", 0, "uint32"), ss.Point("B", 1, "uint16")))
    with pytest.raises(ss.MapError, match="point B: overlap: expected address 40006"):
        ss.build_map((over,))
    short = ss.Model(64999, "x", 5, (ss.Point("A", 0, "uint16"),))
    with pytest.raises(ss.MapError, match="points end at address 40005, expected 40009"):
        ss.build_map((short,))
    unknown = ss.Model(64999, "x", 1, (ss.Point("A", 0, "uint16", field="no_such_field"),))
    with pytest.raises(ss.MapError, match="unknown field 'no_such_field'"):
        ss.build_map((unknown,))


def test_encode_decode_round_trip_and_not_implemented():
    m, b = ss.NODE_MAP, ss.NODE_MAP.base
    rows = ss.static_rows(4, [{}] * 4)
    soc = np.array([0.0, 0.5, 0.1234, np.nan])
    ss.put(rows, m.at(802, "SoC"), b, soc)
    got = ss.get(rows, m.at(802, "SoC"), b)
    assert np.allclose(got[:3], soc[:3]) and np.isnan(got[3])
    amps = np.array([-12.3, 0.0, 3276.7, 1e6])  # the last does not fit int16 at 0.1 A
    ss.put(rows, m.at(802, "A"), b, amps)
    got = ss.get(rows, m.at(802, "A"), b)
    assert np.allclose(got[:3], amps[:3]) and np.isnan(got[3])
    w = np.array([123.5, -4000.25, 0.0, np.nan])
    ss.put(rows, m.at(ss.VENDOR_ID, "BatW"), b, w)
    got = ss.get(rows, m.at(ss.VENDOR_ID, "BatW"), b)
    assert np.array_equal(got[:3], w[:3]) and np.isnan(got[3])
    ss.put_int(rows, m.at(ss.VENDOR_ID, "Seq"), b, [0, 1, 70000, 2**32 - 1])
    assert ss.get_int(rows, m.at(ss.VENDOR_ID, "Seq"), b).tolist() == [0, 1, 70000, 2**32 - 1]
