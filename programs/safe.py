"""The safe allocation of DESIGN.md §2: every node on its own battery, no bus transfer.

Used as the fallback whenever data is missing or a program fails, by the
watchdog, in STOP, and (until the optimal allocator runs) as the default program.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from vbatt.kernel.program import Program
from vbatt.kernel.safe import safe_allocation

__all__ = ["SafeAllocation"]


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
