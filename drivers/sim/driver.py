"""Simulated nodes behind the driver interface: physics stepped in the driver's own process."""

from __future__ import annotations

import numpy as np

from vbatt.drivers.sim.config import CsvProfile, SineProfile, StepProfile
from vbatt.drivers.sim.trace import read_trace

from vbatt.drivers.base import Driver, IoContext
from vbatt.drivers.sim.physics import PROFILE_CONST, PROFILE_CSV, PROFILE_SINE, PROFILE_STEP, demand_at, step_physics

__all__ = ["SimDriver", "SimFleet", "read_trace"]


class SimFleet:
    """State and parameters of a range of simulated nodes, as arrays."""

    def __init__(self, fleet, start: int, stop: int, seed: int = 0):
        n = stop - start
        v = {k: a[start:stop].astype(np.float64) for k, a in fleet.values.items()}
        self.n = n
        self.capacity_wh = v["capacity_wh"]
        self.max_discharge_w = v["max_discharge_w"]
        self.max_charge_w = v["max_charge_w"]
        self.link_max_w = v["link_max_w"]
        self.base_w = v["demand_w"]
        self.soc = v["soc"].copy()
        self.temperature_c = v["temperature_c"].copy()
        phys = fleet.physics[start:stop]
        col = lambda name: np.array([getattr(p, name) or 0.0 for p in phys], dtype=np.float64)  # noqa: E731
        self.ocv_empty, self.ocv_full = col("ocv_empty_v"), col("ocv_full_v")
        self.r_ohm, self.t_amb = col("resistance_ohm"), col("ambient_c")
        self.eff_chg, self.eff_dis = col("charge_efficiency"), col("discharge_efficiency")
        self.r_th, self.c_th = col("thermal_resistance_k_per_w"), col("thermal_capacity_j_per_k")
        self.kind = np.zeros(n, np.int64)
        self.p1, self.p2, self.p3, self.p4 = (np.zeros(n) for _ in range(4))
        traces, offset, loaded = [], 0, {}
        for i, prof in enumerate(fleet.profiles[start:stop]):
            if isinstance(prof, SineProfile):
                self.kind[i] = PROFILE_SINE
                self.p1[i], self.p2[i], self.p3[i], self.p4[i] = prof.amplitude_w, prof.period_s, prof.noise_w, prof.phase_s
            elif isinstance(prof, StepProfile):
                self.kind[i] = PROFILE_STEP
                self.p1[i], self.p2[i] = prof.at_s, prof.to_w
            elif isinstance(prof, CsvProfile):
                key = (prof.path, prof.column)
                if key not in loaded:
                    tr = read_trace(prof.path, prof.column)
                    loaded[key] = (offset, len(tr))
                    traces.append(tr)
                    offset += len(tr)
                self.kind[i] = PROFILE_CSV
                self.p1[i] = prof.dt_s
                self.p3[i], self.p2[i] = loaded[key]
            else:
                self.kind[i] = PROFILE_CONST
        self.trace = np.concatenate(traces) if traces else np.zeros(1)
        self.demand_w = np.zeros(n)
        self.voltage_v = self.ocv_empty + (self.ocv_full - self.ocv_empty) * self.soc
        self.current_a = np.zeros(n)
        self.avail_dis = np.zeros(n)
        self.avail_chg = np.zeros(n)
        np.random.seed(seed)  # noqa: NPY002 (numba reads the global generator)
        self.step(0.0, 0.0, np.zeros(n))

    def step(self, t_s: float, dt_s: float, command_w: np.ndarray) -> None:
        demand_at(t_s, self.kind, self.base_w, self.p1, self.p2, self.p3, self.p4, self.trace, self.demand_w)
        step_physics(dt_s, command_w, self.capacity_wh, self.max_discharge_w, self.max_charge_w,
                     self.ocv_empty, self.ocv_full, self.r_ohm, self.eff_chg, self.eff_dis, self.t_amb,
                     self.r_th, self.c_th, self.soc, self.temperature_c, self.voltage_v, self.current_a,
                     self.avail_dis, self.avail_chg)

    def fill(self, staging: dict[str, np.ndarray], now_ns: int) -> None:
        staging["voltage_v"][:] = self.voltage_v
        staging["current_a"][:] = self.current_a
        staging["temperature_c"][:] = self.temperature_c
        staging["soc"][:] = self.soc
        staging["capacity_wh"][:] = self.capacity_wh
        staging["demand_w"][:] = self.demand_w
        staging["max_discharge_w"][:] = self.avail_dis
        staging["max_charge_w"][:] = self.avail_chg
        staging["link_max_w"][:] = self.link_max_w
        staging["updated_ns"][:] = now_ns
        staging["fault"][:] = 0


class SimDriver(Driver):
    kind = "sim"

    def run(self, io: IoContext) -> None:
        sim = SimFleet(self.fleet, self.start, self.stop, seed=self.start)
        period = int(self.cfg.drivers.sim.period_ms * 1e6)
        clock = io.clock
        t0 = last = clock.now_ns()
        sim.fill(io.staging, t0)
        io.publish()
        due = t0 + period
        command = io.outputs["battery_w"]
        while not io.stopping():
            clock.sleep_until(due)
            now = clock.now_ns()
            io.read_outputs()
            sim.step((now - t0) * 1e-9, (now - last) * 1e-9, command)
            sim.fill(io.staging, now)
            io.publish()
            last = now
            due += period
            if due <= now:  # fell behind: skip to the next slot, no burst
                due = now + period
