"""Protection: exact IEC 60255 trip times at a fixed dt, latching, reset, derating, SoC, voltage."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vbatt.kernel.program import bind_kernel
from vbatt.programs.codes import Trip, active_trips
from vbatt.programs.protection import IEC_CURVES, Protection, ProtectionParams, iec_operate_time_s, protect

DT = 0.01


class Rig:
    """One protection kernel over n nodes, driven cycle by cycle with a fixed dt (no clock, no sleep)."""

    def __init__(self, n=1, **params):
        self.p = Protection(ProtectionParams(**params), n)
        self.n = n
        f = lambda v: np.full(n, float(v))  # noqa: E731
        self.online = np.ones(n, np.uint8)
        self.voltage_v, self.current_a, self.temperature_c, self.soc = f(48), f(0), f(25), f(0.5)
        self.max_dis, self.max_chg = f(1000), f(500)
        self.trip = np.zeros(n, np.uint32)
        self.lo, self.hi = f(0), f(0)
        self.mem = [np.zeros(n) for _ in range(4)]

    def step(self, dt=DT):
        # as the scan does: the limits start every cycle from the device limits, protection narrows them
        self.lo[:] = -self.max_chg
        self.hi[:] = self.max_dis
        names = dict(dt_s=np.array([dt]), online=self.online, voltage_v=self.voltage_v, current_a=self.current_a,
                     temperature_c=self.temperature_c, soc=self.soc, max_discharge_w=self.max_dis,
                     max_charge_w=self.max_chg, trip=self.trip, lo_w=self.lo, hi_w=self.hi,
                     **dict(zip(("theta", "t_over_s", "t_under_s", "t_clear_s"), self.mem)))
        protect(*bind_kernel(protect, where="test", img=None, ctx=None, own=names, params=self.p.kernel_params()))

    def cycles_to_trip(self, limit=100_000):
        for k in range(1, limit + 1):
            self.step()
            if self.trip[0]:
                return k
        return None


@pytest.mark.parametrize("curve", list(IEC_CURVES))
@pytest.mark.parametrize("multiple", [1.5, 2.0, 5.0, 10.0])
def test_inverse_time_trip_time_is_the_iec_formula(curve, multiple):
    pickup, tms = 40.0, 0.2
    rig = Rig(oc_pickup_a=pickup, oc_curve=curve, oc_tms=tms)
    rig.current_a[:] = multiple * pickup
    k, alpha = IEC_CURVES[curve]
    t = tms * k / (multiple**alpha - 1)
    assert iec_operate_time_s(multiple * pickup, pickup, tms, curve) == pytest.approx(t)
    if t > 600:
        pytest.skip("longer than the test budget")
    cycles = rig.cycles_to_trip()
    # trips in the first cycle whose end reaches t: never early, at most one cycle late
    assert cycles == math.ceil(t / DT - 1e-6), (cycles, t / DT)
    assert rig.trip[0] == Trip.OVERCURRENT_TIME
    assert rig.lo[0] == 0.0 and rig.hi[0] == 0.0


def test_exact_trip_time_very_inverse_2x():
    rig = Rig(oc_pickup_a=10, oc_curve="very_inverse", oc_tms=0.1)  # t = 0.1 * 13.5 / (2 - 1) = 1.35 s
    rig.current_a[:] = -20.0  # charging overcurrent counts too
    assert rig.cycles_to_trip() == 135


def test_memory_integrates_a_varying_current():
    rig = Rig(oc_pickup_a=10, oc_curve="very_inverse", oc_tms=0.1)
    rig.current_a[:] = 20.0  # t = 1.35 s: 0.675 s uses half the memory
    for _ in range(67):
        rig.step()
    assert not rig.trip[0]
    rig.current_a[:] = 37.0  # t = 0.1*13.5/2.7 = 0.5 s: the other half takes 0.25 s
    left = 1.0 - 67 * DT / 1.35
    expect = math.ceil(left * 0.5 / DT - 1e-6)
    assert rig.cycles_to_trip() == expect


def test_memory_resets_below_pickup_at_once_or_linearly():
    quick = Rig(oc_pickup_a=10, oc_tms=0.1)
    slow = Rig(oc_pickup_a=10, oc_tms=0.1, oc_reset_s=10.0)
    for rig in (quick, slow):
        rig.current_a[:] = 20.0
        for _ in range(100):
            rig.step()
        rig.current_a[:] = 5.0
        rig.step()
    assert quick.mem[0][0] == 0.0
    assert slow.mem[0][0] == pytest.approx(100 * DT / 1.35 - DT / 10.0)


def test_instantaneous_trip_in_one_cycle():
    rig = Rig(oc_pickup_a=40, oc_instantaneous_a=120)
    rig.current_a[:] = 119.9
    rig.step()
    assert rig.trip[0] & Trip.OVERCURRENT_INSTANTANEOUS == 0
    rig.current_a[:] = 120.0
    rig.step()
    assert rig.trip[0] & Trip.OVERCURRENT_INSTANTANEOUS


def test_trip_latches_until_operator_reset():
    rig = Rig(oc_instantaneous_a=100)
    rig.current_a[:] = 150
    rig.step()
    rig.current_a[:] = 0
    for _ in range(1000):
        rig.step()
    assert rig.trip[0] == Trip.OVERCURRENT_INSTANTANEOUS and rig.hi[0] == 0.0
    rig.trip[0] = 0  # what the scan does on Op.RESET_TRIP
    rig.step()
    assert rig.trip[0] == 0 and rig.hi[0] == 1000.0


def test_auto_reset_after_the_conditions_clear_with_hysteresis():
    rig = Rig(trip_temperature_c=60, reset_hysteresis_c=5, auto_reset_s=2.0)
    rig.temperature_c[:] = 61
    rig.step()
    assert rig.trip[0] == Trip.OVER_TEMPERATURE
    rig.temperature_c[:] = 57  # below the trip, inside the hysteresis band: stays tripped
    for _ in range(1000):
        rig.step()
    assert rig.trip[0] == Trip.OVER_TEMPERATURE
    rig.temperature_c[:] = 54.9
    for _ in range(199):
        rig.step()
    assert rig.trip[0] == Trip.OVER_TEMPERATURE
    rig.step()  # 200 cycles x 10 ms = 2 s clear
    assert rig.trip[0] == 0


def test_thermal_derating_is_linear_from_start_to_zero():
    rig = Rig(derate_start_c=45, derate_zero_c=55, trip_temperature_c=60)
    for temp, factor in ((40, 1.0), (45, 1.0), (50, 0.5), (54, 0.1), (55, 0.0), (58, 0.0)):
        rig.temperature_c[:] = temp
        rig.step()
        assert rig.hi[0] == pytest.approx(1000 * factor) and rig.lo[0] == pytest.approx(-500 * factor)
        assert rig.trip[0] == 0


def test_soc_reserve_and_top():
    rig = Rig(soc_min=0.2, soc_max=0.9)
    rig.soc[:] = 0.2
    rig.step()
    assert rig.hi[0] == 0.0 and rig.lo[0] == -500.0
    rig.soc[:] = 0.95
    rig.step()
    assert rig.hi[0] == 1000.0 and rig.lo[0] == 0.0


def test_over_and_under_voltage_with_delay():
    rig = Rig(over_voltage_v=58, under_voltage_v=40, voltage_delay_s=0.5)
    rig.voltage_v[:] = 58.5
    assert rig.cycles_to_trip() == 50
    assert [c.name for c in active_trips(rig.trip[0])] == ["OVER_VOLTAGE"]
    low = Rig(over_voltage_v=58, under_voltage_v=40, voltage_delay_s=0.5)
    low.voltage_v[:] = 39.0
    for _ in range(20):
        low.step()
    low.voltage_v[:] = 45.0  # recovered before the delay: the timer restarts
    low.step()
    low.voltage_v[:] = 39.0
    assert low.cycles_to_trip() == 50


def test_offline_nodes_are_not_judged_and_get_no_limits():
    rig = Rig(oc_instantaneous_a=100)
    rig.online[:] = 0
    rig.current_a[:] = 500
    rig.step()
    assert rig.trip[0] == 0 and rig.hi[0] == 0.0


def test_params_are_checked():
    with pytest.raises(ValueError, match="derate_zero_c"):
        ProtectionParams(derate_start_c=50, derate_zero_c=45)
    with pytest.raises(ValueError, match="oc_instantaneous_a"):
        ProtectionParams(oc_pickup_a=50, oc_instantaneous_a=40)
    with pytest.raises(ValueError):
        ProtectionParams(oc_curve="very")
