"""The trip and alarm code tables are an external interface (OPC UA events): pinned here."""

from vbatt.programs.codes import ALARM_CODES, TRIP_CODES, Alarm, Trip, active_alarms, describe, mask_of

import pytest


def test_codes_are_pinned():
    assert [(c.bit, c.name) for c in TRIP_CODES] == [
        (0, "OVERCURRENT_INSTANTANEOUS"), (1, "OVERCURRENT_TIME"), (2, "OVER_TEMPERATURE"),
        (3, "OVER_VOLTAGE"), (4, "UNDER_VOLTAGE")]
    assert [(c.bit, c.name) for c in ALARM_CODES][:3] == [(0, "VOLTAGE_HIGH"), (1, "VOLTAGE_LOW"),
                                                          (2, "CURRENT_HIGH")]
    assert Alarm.LOAD_SHED == 1 << 12 and Trip.OVER_TEMPERATURE == 4
    assert all(1 <= c.severity <= 1000 and c.text for c in TRIP_CODES + ALARM_CODES)


def test_helpers():
    m = mask_of(ALARM_CODES, ["SOC_LOW", "BAD_DATA"])
    assert [c.name for c in active_alarms(m)] == ["BAD_DATA", "SOC_LOW"]  # most severe first
    assert describe(TRIP_CODES, 0) == ""
    with pytest.raises(KeyError, match="VOLTAGE_HIGH"):
        mask_of(ALARM_CODES, ["NOPE"])
