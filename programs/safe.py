"""The safe allocation of docs/design.md §2.6: every node on its own battery, no bus transfer.

Used as the fallback whenever data is missing or a program fails, by the
watchdog, in STOP, and (until the optimal allocator runs) as the default program.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from pydantic import BaseModel, ConfigDict

from vbatt.program import Program

__all__ = ["SafeAllocation", "safe_allocation", "zero_power"]


@njit(nogil=True, cache=True)
def safe_allocation(online, trip, demand_w, max_discharge_w, battery_w, served_w, shed_w, bus_w, lo_w, hi_w):
    """Reads online, trip, demand_w, max_discharge_w; writes the four outputs and lo_w/hi_w.

    A node serves what its own battery allows; the rest of its load is shed.
    Offline or tripped nodes, and NaN data, get nothing commanded.
    """
    for i in range(online.shape[0]):
        d = demand_w[i]
        g = max_discharge_w[i]
        ok = online[i] != 0 and trip[i] == 0 and d >= 0.0 and g >= 0.0  # NaN fails every comparison
        b = min(d, g) if ok else 0.0
        battery_w[i] = b
        bus_w[i] = 0.0
        served_w[i] = b
        shed_w[i] = d - b if (online[i] != 0 and d >= 0.0) else 0.0
        lo_w[i] = 0.0
        hi_w[i] = g if ok else 0.0


@njit(nogil=True, cache=True)
def zero_power(online, demand_w, battery_w, served_w, shed_w, bus_w, lo_w, hi_w):
    """Safe state 'zero_power': no battery power, no bus flow, all load shed."""
    for i in range(online.shape[0]):
        d = demand_w[i]
        battery_w[i] = 0.0
        bus_w[i] = 0.0
        served_w[i] = 0.0
        shed_w[i] = d if (online[i] != 0 and d >= 0.0) else 0.0
        lo_w[i] = 0.0
        hi_w[i] = 0.0


class SafeAllocation(Program):
    id = "safe_allocation"
    reads = ("online", "trip", "demand_w", "max_discharge_w")
    writes = ("battery_w", "served_w", "shed_w", "bus_w", "lo_w", "hi_w")

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def bind(self, img, ctx):
        n = img.node
        args = (n["online"], n["trip"], n["demand_w"], n["max_discharge_w"],
                n["battery_w"], n["served_w"], n["shed_w"], n["bus_w"], n["lo_w"], n["hi_w"])
        return lambda: safe_allocation(*args)
