"""Battery backends of the node agent: where a node's battery state comes from.

A backend serves `n` nodes as arrays. `step(t_s, dt_s, battery_w)` applies the
battery power the agent decided (> 0 discharge) and refreshes the state; the
offer arrays (OFFER names, SI units as in runtime/kernel/fields.py) are then read by
the agent. A value the backend cannot read is NaN, which the controller sees
as a bad value: that node goes offline, not the agent.
"""

from __future__ import annotations

import numpy as np

from vbatt.drivers.modbus.sunspec import CODEC

__all__ = ["OFFER", "Backend", "BackendError"]

OFFER = CODEC.offer_keys


class BackendError(RuntimeError):
    """The battery could not be read (file missing, daemon down, garbage reply)."""


class Backend:
    kind: str = "?"
    controllable: bool = True  # False: a read-only battery (sysfs, UPS) that reports but cannot obey

    def __init__(self, n: int) -> None:
        self.n = n
        self.offer = {k: np.full(n, np.nan) for k in OFFER}
        self.ok = np.ones(n, bool)  # False where the last read failed

    def step(self, t_s: float, dt_s: float, battery_w: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass
