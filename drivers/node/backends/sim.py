"""The simulated battery: drivers/sim/driver.py's SimFleet (same physics as `driver: sim`) behind the agent."""

from __future__ import annotations

import numpy as np

from vbatt.drivers.sim.driver import SimFleet

from vbatt.drivers.node.backends import Backend

__all__ = ["SimBackend"]


class SimBackend(Backend):
    kind = "sim"

    def __init__(self, fleet, start: int, stop: int, seed: int = 0) -> None:
        super().__init__(stop - start)
        self.sim = SimFleet(fleet, start, stop, seed=seed)
        self._fill()

    def step(self, t_s: float, dt_s: float, battery_w: np.ndarray) -> None:
        self.sim.step(t_s, dt_s, battery_w)
        self._fill()

    def _fill(self) -> None:
        s, o = self.sim, self.offer
        o["voltage_v"][:] = s.voltage_v
        o["current_a"][:] = s.current_a
        o["temperature_c"][:] = s.temperature_c
        o["soc"][:] = s.soc
        o["capacity_wh"][:] = s.capacity_wh
        o["demand_w"][:] = s.demand_w
        o["forecast_w"][:] = s.demand_w  # persistence: the controller forecasts better
        o["max_discharge_w"][:] = s.avail_dis
        o["max_charge_w"][:] = s.avail_chg
        o["link_max_w"][:] = s.link_max_w
        o["power_w"][:] = s.voltage_v * s.current_a
