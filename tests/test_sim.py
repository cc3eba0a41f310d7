"""Simulated node physics: exact constants, SoC with efficiency, V = Voc - I*R, thermal, profiles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vbatt.config.plant import load_config_text
from vbatt.drivers.sim.driver import SimFleet


def fleet_of(node_yaml: str, count: int = 1) -> SimFleet:
    _, fleet = load_config_text(f"nodes:\n  - {node_yaml}\n")
    return SimFleet(fleet, 0, len(fleet))


def run(sim: SimFleet, command_w: float, seconds: float, dt: float = 1.0) -> None:
    cmd = np.full(sim.n, command_w)
    t = 0.0
    for _ in range(int(round(seconds / dt))):
        t += dt
        sim.step(t, dt, cmd)


def test_constants_are_reported_exactly():
    sim = fleet_of("{id: A, demand_w: 200, max_discharge_w: 100, max_charge_w: 80, capacity_wh: 1000, "
                   "soc: 0.8, temperature_c: 31, link_max_w: 700}")
    run(sim, 0.0, 10)
    staging = {k: np.zeros(1) for k in ("voltage_v", "current_a", "temperature_c", "soc", "capacity_wh",
                                        "demand_w", "max_discharge_w", "max_charge_w", "link_max_w")}
    staging["updated_ns"] = np.zeros(1, np.int64)
    staging["fault"] = np.zeros(1, np.uint32)
    sim.fill(staging, 123)
    assert {k: v[0] for k, v in staging.items()} == {
        "voltage_v": 48.0, "current_a": 0.0, "temperature_c": 31.0, "soc": 0.8, "capacity_wh": 1000.0,
        "demand_w": 200.0, "max_discharge_w": 100.0, "max_charge_w": 80.0, "link_max_w": 700.0,
        "updated_ns": 123, "fault": 0}


@pytest.mark.parametrize("eff, command, expected_soc", [
    (1.0, 500.0, 0.5 - 0.05),          # 500 W for 360 s = 50 Wh of 1000 Wh
    (0.9, 500.0, 0.5 - 0.05 / 0.9),    # discharging draws more from the cells
    (0.9, -500.0, 0.5 + 0.05 * 0.9),   # charging stores less
])
def test_soc_integrates_energy_with_efficiency(eff, command, expected_soc):
    sim = fleet_of("{id: A, max_discharge_w: 1000, max_charge_w: 1000, capacity_wh: 1000, soc: 0.5, "
                   f"physics: {{charge_efficiency: {eff}, discharge_efficiency: {eff}}}}}")
    run(sim, command, 360.0)
    assert sim.soc[0] == pytest.approx(expected_soc, abs=1e-12)


def test_terminal_voltage_is_ocv_minus_ir_and_delivers_the_power():
    sim = fleet_of("{id: A, max_discharge_w: 2000, capacity_wh: 1e9, soc: 0.5, "
                   "physics: {ocv_empty_v: 40, ocv_full_v: 60, resistance_ohm: 0.1}}")
    run(sim, 1000.0, 1.0)
    v, i = sim.voltage_v[0], sim.current_a[0]
    assert v == pytest.approx(50.0 - i * 0.1, abs=1e-9)
    assert v * i == pytest.approx(1000.0, rel=1e-9)  # the terminals deliver the command
    assert i > 0  # discharging current is positive


def test_commands_are_clipped_to_limits_and_an_empty_battery_gives_nothing():
    sim = fleet_of("{id: A, max_discharge_w: 100, max_charge_w: 50, capacity_wh: 1, soc: 0.01}")
    run(sim, 5000.0, 1.0)
    assert sim.current_a[0] == pytest.approx(100.0 / 48.0)  # clipped to max_discharge_w
    run(sim, 100.0, 3600.0, dt=10.0)
    assert sim.soc[0] == 0.0 and sim.avail_dis[0] == 0.0 and sim.avail_chg[0] == 50.0
    run(sim, 100.0, 1.0)
    assert sim.current_a[0] == 0.0


def test_thermal_model_settles_at_ambient_plus_loss_times_resistance():
    sim = fleet_of("{id: A, max_discharge_w: 2000, capacity_wh: 1.0e9, soc: 0.5, temperature_c: 25, "
                   "physics: {resistance_ohm: 0.05, thermal_resistance_k_per_w: 0.5, "
                   "thermal_capacity_j_per_k: 1000, ambient_c: 25}}")
    run(sim, 960.0, 5000.0, dt=1.0)  # time constant 500 s: ten of them
    i = sim.current_a[0]
    assert sim.temperature_c[0] == pytest.approx(25.0 + i * i * 0.05 * 0.5, rel=1e-3)
    assert sim.temperature_c[0] > 25.5


def test_demand_profiles(tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("demand_w\n10\n20\n30\n")
    _, fleet = load_config_text(
        "nodes:\n"
        "  - {id: step, demand_w: 100, demand_profile: {kind: step, at_s: 5, to_w: 300}}\n"
        "  - {id: sine, demand_w: 100, demand_profile: {kind: sine, amplitude_w: 50, period_s: 40}}\n"
        f"  - {{id: csv, demand_profile: {{kind: csv, path: '{trace}', dt_s: 2}}}}\n")
    sim = SimFleet(fleet, 0, 3)
    got = []
    for t in (0.0, 4.9, 5.0, 10.0, 30.0):
        sim.step(t, 0.0, np.zeros(3))
        got.append(sim.demand_w.copy())
    got = np.array(got)
    assert got[:, 0].tolist() == [100, 100, 300, 300, 300]
    assert got[3, 1] == pytest.approx(100 + 50 * math.sin(2 * math.pi * 10 / 40))
    assert got[4, 1] == pytest.approx(100 - 50)
    assert got[:, 2].tolist() == [10, 30, 30, 30, 10]  # sample int(t / 2) mod 3: 0, 2, 2, 5 -> 2, 15 -> 0
