"""The safe allocation of docs/design.md §2.6: every node on its own battery, no bus transfer.

Used as the fallback whenever data is missing or a program fails, by the
watchdog, in STOP, and (until the optimal allocator runs) as the default program.
"""

from __future__ import annotations


from vbatt.kernel.program import Program
from vbatt.kernel.safe import safe_allocation

__all__ = ["SafeAllocation"]


class SafeAllocation(Program):
    id = "safe_allocation"
    kernel = safe_allocation
    allocates = True
    writes = ("battery_w", "served_w", "shed_w", "bus_w", "lo_w", "hi_w")
