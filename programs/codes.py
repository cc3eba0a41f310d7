"""Protection trip reasons and health alarm codes: the one table of each (stable data).

Every code is a bit in a per-node u4 image field: trips in `trip` (latched by
protection, cleared by operator reset or auto-reset), alarms in `alarm` (active
health conditions). The OPC UA server raises an event per code from these
tables, so bits, names and severities are part of the external interface:
append new codes, never renumber or rename existing ones.

Severity is on the OPC UA scale 1..1000 (801-1000 high, 601-800 medium high,
401-600 medium, 201-400 medium low, 1-200 low).

Alarm states (active, acknowledged, cleared), per node and bit:
  * active, unacknowledged: bit set in `alarm`, not set in health memory `acked`;
  * active, acknowledged: bit set in both (operator command Op.ACK_ALARM);
  * cleared: bit not set in `alarm` (its `acked` bit is cleared with it, so a
    condition that returns is unacknowledged again).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "Code",
    "TRIP_CODES",
    "ALARM_CODES",
    "Trip",
    "Alarm",
    "active",
    "active_trips",
    "active_alarms",
    "mask_of",
    "describe",
    "by_name",
]


@dataclass(frozen=True)
class Code:
    bit: int  # bit number 0..31 in the u4 field
    name: str  # stable identifier (OPC UA event / log / YAML)
    severity: int  # OPC UA 1..1000
    text: str  # one line for an operator

    @property
    def mask(self) -> int:
        return 1 << self.bit


TRIP_CODES: tuple[Code, ...] = (
    Code(0, "OVERCURRENT_INSTANTANEOUS", 900, "Instantaneous overcurrent: battery current above the instantaneous pickup"),
    Code(1, "OVERCURRENT_TIME", 800, "Inverse-time overcurrent (IEC 60255 curve): thermal memory reached the trip level"),
    Code(2, "OVER_TEMPERATURE", 900, "Battery temperature above the trip limit"),
    Code(3, "OVER_VOLTAGE", 800, "Battery voltage above the over-voltage trip limit"),
    Code(4, "UNDER_VOLTAGE", 800, "Battery voltage below the under-voltage trip limit"),
)

ALARM_CODES: tuple[Code, ...] = (
    Code(0, "VOLTAGE_HIGH", 600, "Battery voltage above the alarm limit"),
    Code(1, "VOLTAGE_LOW", 600, "Battery voltage below the alarm limit"),
    Code(2, "CURRENT_HIGH", 500, "Battery current above the alarm limit"),
    Code(3, "TEMPERATURE_HIGH", 700, "Battery temperature above the alarm limit"),
    Code(4, "TEMPERATURE_LOW", 300, "Battery temperature below the alarm limit"),
    Code(5, "TEMPERATURE_RISE", 700, "Battery temperature rising faster than the alarm rate"),
    Code(6, "SOC_LOW", 500, "State of charge below the alarm limit"),
    Code(7, "SOC_HIGH", 200, "State of charge above the alarm limit"),
    Code(8, "RESISTANCE_DRIFT", 400, "Internal resistance (from dV/dI) drifted from its baseline"),
    Code(9, "STALE_DATA", 600, "No fresh data from the node within the staleness bound"),
    Code(10, "BAD_DATA", 800, "Node data missing, NaN or out of range"),
    Code(11, "SAFE_ALLOCATION", 800, "Allocator fell back to the safe allocation (own battery, no bus transfer)"),
    Code(12, "LOAD_SHED", 700, "Part of the node's load is shed"),
    Code(13, "RIDE_THROUGH_SHORT", 700, "The node's priority class cannot ride through its target on the energy left"),
    # of the virtual battery (agg tree_state = 2), not of a node: the OPC UA server raises it at VirtualBattery
    Code(14, "TREE_FALLBACK", 700, "The parent controller stopped renewing its levels: on this controller's own "
         "main supply limit"),
)


def _check(table: tuple[Code, ...]) -> None:
    bits = [c.bit for c in table]
    names = [c.name for c in table]
    assert len(set(bits)) == len(bits) and len(set(names)) == len(names)
    assert all(0 <= b < 32 for b in bits) and all(1 <= c.severity <= 1000 for c in table)


_check(TRIP_CODES)
_check(ALARM_CODES)

# Integer masks by name, for kernels (numba reads IntEnum members as constants) and code.
Trip = enum.IntEnum("Trip", {c.name: c.mask for c in TRIP_CODES})
Alarm = enum.IntEnum("Alarm", {c.name: c.mask for c in ALARM_CODES})


def active(table: tuple[Code, ...], mask: int) -> list[Code]:
    """The codes of `table` whose bits are set in `mask`, most severe first."""
    m = int(mask)
    return sorted((c for c in table if m & c.mask), key=lambda c: (-c.severity, c.bit))


def active_trips(mask: int) -> list[Code]:
    return active(TRIP_CODES, mask)


def active_alarms(mask: int) -> list[Code]:
    return active(ALARM_CODES, mask)


def by_name(table: tuple[Code, ...], name: str) -> Code:
    for c in table:
        if c.name == name:
            return c
    raise KeyError(f"unknown code {name!r}; expected one of {[c.name for c in table]}")


def mask_of(table: tuple[Code, ...], names) -> int:
    """The bit mask of the named codes (unknown names raise KeyError listing the valid ones)."""
    m = 0
    for name in names:
        m |= by_name(table, name).mask
    return m


def describe(table: tuple[Code, ...], mask: int) -> str:
    """Comma-separated names of the active codes, '' when none (for logs and snapshots)."""
    return ",".join(c.name for c in active(table, mask))
