"""Health: threshold alarms with hysteresis, rates, resistance drift, stale and bad data."""

from __future__ import annotations

import numpy as np
import pytest

from vbatt.programs.codes import Alarm, active_alarms
from vbatt.programs.health import HealthParams

from test_programs_pipeline import Plant  # the in-process scan rig

TWO = """
nodes:
  - {id: A, demand_w: 100, max_discharge_w: 300, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
  - {id: B, demand_w: 100, max_discharge_w: 300, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
programs:
"""


@pytest.fixture
def plant():
    made = []

    def make(programs):
        p = Plant(TWO + programs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_temperature_alarm_sets_above_and_clears_below_the_deadband(plant):
    p = plant("  - health: {temperature_high_c: 45, deadband_c: 2, temperature_rise_c_per_s: null}\n")
    p.sim.temperature_c[0] = 45.5
    p.cycle()
    assert p.n["alarm"][0] == Alarm.TEMPERATURE_HIGH and p.n["alarm"][1] == 0
    p.sim.temperature_c[0] = 43.5  # inside the deadband: still active
    p.cycle()
    assert p.n["alarm"][0] == Alarm.TEMPERATURE_HIGH
    p.sim.temperature_c[0] = 42.9
    p.cycle()
    assert p.n["alarm"][0] == 0


def test_temperature_rising_too_fast(plant):
    p = plant("  - health: {temperature_high_c: null, temperature_rise_c_per_s: 0.5, rate_tau_s: 0.05}\n")
    p.cycle()
    for _ in range(30):
        p.sim.temperature_c[0] += 0.01  # 1 degC/s at 10 ms cycles
        p.cycle()
    assert p.n["alarm"][0] & Alarm.TEMPERATURE_RISE and not p.n["alarm"][1] & Alarm.TEMPERATURE_RISE


def test_stale_and_bad_data(plant):
    p = plant("  - health\n")
    p.cycle()
    p.sim.voltage_v[1] = np.nan
    p.cycle()
    assert p.n["alarm"][1] & Alarm.BAD_DATA
    p.now += 10_000_000_000  # 10 s later, but the data is fed with its old time stamp
    p.eng.cycle(p.now)
    assert np.all(p.n["alarm"] & Alarm.STALE_DATA)


def test_resistance_drift_from_dv_di(plant):
    p = plant("  - health: {resistance_learn_n: 5, resistance_drift: 0.5, resistance_min_delta_a: 1.0}\n")
    r0, ocv = 0.02, 50.0
    cur = [0.0, 10.0]
    for k in range(12):  # learn the baseline: V = OCV - I * R
        i = cur[k % 2]
        p.sim.current_a[0], p.sim.voltage_v[0] = i, ocv - i * r0
        p.cycle()
    assert p.img.mem["health.resistance0_ohm"][0] == pytest.approx(r0)
    assert not p.n["alarm"][0] & Alarm.RESISTANCE_DRIFT
    for k in range(60):  # the cell ages: R doubles and more
        i = cur[k % 2]
        p.sim.current_a[0], p.sim.voltage_v[0] = i, ocv - i * 3 * r0
        p.cycle()
    assert p.n["alarm"][0] & Alarm.RESISTANCE_DRIFT
    assert "RESISTANCE_DRIFT" in [c.name for c in active_alarms(p.n["alarm"][0])]


def test_unknown_alarm_name_in_derate_is_refused():
    with pytest.raises(ValueError, match="TEMPERATURE_HIGH"):
        HealthParams(derate={"HOT": 0.5})
