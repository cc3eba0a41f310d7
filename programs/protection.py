"""Protection (docs/design.md §3 step 3): overcurrent, thermal, SoC reserve, voltage; latched trips.

Reads: online, voltage_v, current_a, temperature_c, soc, max_discharge_w,
max_charge_w, trip. Writes: lo_w, hi_w (each node's narrowed limits, which the
allocator then respects) and trip (latched reason bits, `codes.TRIP_CODES`).

* Instantaneous overcurrent: |current_a| >= `oc_instantaneous_a` trips at once.
* Inverse-time overcurrent, IEC 60255-151: above the pickup Is the operate time
  is t(I) = TMS * k / ((I/Is)^alpha - 1) (standard inverse k=0.14 alpha=0.02,
  very inverse 13.5/1, extremely inverse 80/2, long-time inverse 120/1). An
  integrating memory theta += dt / t(I) trips at theta >= 1, so a varying
  current trips when its accumulated stress reaches the curve; below the
  pickup the memory resets (at once, or linearly over `oc_reset_s`, which keeps
  the thermal memory of repeated short overloads).
* Thermal: limits scale linearly from 1 at `derate_start_c` to 0 at
  `derate_zero_c`; at `trip_temperature_c` the node trips.
* SoC reserve: no discharge at soc <= soc_min, no charge at soc >= soc_max.
* Over/under voltage: trips when beyond the limit for `voltage_delay_s`.

A trip latches: the node gives and takes nothing (lo_w = hi_w = 0) until the
operator resets it (Op.RESET_TRIP) or, when `auto_reset_s` is set, every trip
condition has been clear with hysteresis for that long. Offline nodes (stale
data) are not judged; their limits are 0.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from numba import njit
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vbatt.kernel.program import Program
from vbatt.kernel.seqblock import ArraySpec

from vbatt.programs.codes import Trip

__all__ = ["Protection", "ProtectionParams", "protect", "IEC_CURVES", "iec_operate_time_s"]

# IEC 60255-151 inverse-time characteristics: (k, alpha).
IEC_CURVES: dict[str, tuple[float, float]] = {
    "standard_inverse": (0.14, 0.02),
    "very_inverse": (13.5, 1.0),
    "extremely_inverse": (80.0, 2.0),
    "long_time_inverse": (120.0, 1.0),
}

_OC_INST = int(Trip.OVERCURRENT_INSTANTANEOUS)
_OC_TIME = int(Trip.OVERCURRENT_TIME)
_OT = int(Trip.OVER_TEMPERATURE)
_OV = int(Trip.OVER_VOLTAGE)
_UV = int(Trip.UNDER_VOLTAGE)
# A memory that has accumulated dt/t(I) exactly t(I)/dt times must trip despite rounding.
_THETA_TRIP = 1.0 - 1e-9

Pos = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]


def iec_operate_time_s(current_a: float, pickup_a: float, tms: float, curve: str) -> float:
    """IEC 60255-151 operate time at a constant current (inf at or below the pickup)."""
    k, alpha = IEC_CURVES[curve]
    m = abs(current_a) / pickup_a
    return tms * k / (m**alpha - 1.0) if m > 1.0 else math.inf


class ProtectionParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    soc_min: Annotated[float, Field(ge=0, le=1)] = 0.1
    soc_max: Annotated[float, Field(ge=0, le=1)] = 1.0
    oc_pickup_a: Pos | None = None  # None: no inverse-time overcurrent
    oc_curve: Literal["standard_inverse", "very_inverse", "extremely_inverse", "long_time_inverse"] = "very_inverse"
    oc_tms: Pos = 0.1
    oc_reset_s: NonNeg = 0.0  # 0: the memory resets at once below the pickup
    oc_instantaneous_a: Pos | None = None
    derate_start_c: float = 45.0
    derate_zero_c: float = 55.0
    trip_temperature_c: float | None = 60.0
    over_voltage_v: Pos | None = None
    under_voltage_v: Pos | None = None
    voltage_delay_s: NonNeg = 0.0
    auto_reset_s: Pos | None = None  # None: only the operator resets a trip
    reset_hysteresis_c: NonNeg = 5.0
    reset_hysteresis_v: NonNeg = 1.0

    @model_validator(mode="after")
    def _consistent(self) -> "ProtectionParams":
        if self.soc_max < self.soc_min:
            raise ValueError(f"soc_max ({self.soc_max}) must be >= soc_min ({self.soc_min})")
        if self.derate_zero_c <= self.derate_start_c:
            raise ValueError(f"derate_zero_c ({self.derate_zero_c}) must be above derate_start_c "
                             f"({self.derate_start_c})")
        if (self.oc_pickup_a and self.oc_instantaneous_a and self.oc_instantaneous_a <= self.oc_pickup_a):
            raise ValueError(f"oc_instantaneous_a ({self.oc_instantaneous_a}) must be above oc_pickup_a "
                             f"({self.oc_pickup_a})")
        if self.over_voltage_v and self.under_voltage_v and self.over_voltage_v <= self.under_voltage_v:
            raise ValueError(f"over_voltage_v ({self.over_voltage_v}) must be above under_voltage_v "
                             f"({self.under_voltage_v})")
        return self


@njit(nogil=True, cache=True)
def protect(dt_s, online, voltage_v, current_a, temperature_c, soc, max_discharge_w, max_charge_w, trip, lo_w, hi_w,
            theta, t_over_s, t_under_s, t_clear_s,
            soc_min, soc_max, pickup_a, curve_k, curve_alpha, tms, reset_s, inst_a, t_start_c, t_zero_c, t_trip_c,
            v_over_v, v_under_v, v_delay_s, auto_reset_s, hyst_c, hyst_v):
    """One protection pass; limits that are 0 or inf mean 'off' (see Protection.kernel_params).

    Narrows lo_w/hi_w (they arrive holding the device limits or a narrower earlier program's)."""
    dt = dt_s[0]
    pickup, k, alpha, inst = pickup_a, curve_k, curve_alpha, inst_a
    t_start, t_zero, t_trip = t_start_c, t_zero_c, t_trip_c
    v_over, v_under, v_delay, auto_reset = v_over_v, v_under_v, v_delay_s, auto_reset_s
    t_over, t_under, t_clear = t_over_s, t_under_s, t_clear_s
    max_dis_w, max_chg_w = max_discharge_w, max_charge_w
    for i in range(online.shape[0]):
        if online[i] == 0:
            lo_w[i] = 0.0
            hi_w[i] = 0.0
            continue
        cur = abs(current_a[i])
        temp = temperature_c[i]
        volt = voltage_v[i]
        tr = trip[i]
        # inverse-time overcurrent with its integrating memory
        if pickup > 0.0 and cur > pickup:
            theta[i] += dt * ((cur / pickup) ** alpha - 1.0) / (tms * k)
            if theta[i] >= _THETA_TRIP:
                tr |= _OC_TIME
                theta[i] = 1.0
        elif reset_s > 0.0:
            theta[i] = max(0.0, theta[i] - dt / reset_s)
        else:
            theta[i] = 0.0
        if inst > 0.0 and cur >= inst:
            tr |= _OC_INST
        if temp >= t_trip:
            tr |= _OT
        # over/under voltage with a definite-time delay
        if volt > v_over:
            t_over[i] += dt
            if t_over[i] >= v_delay - 1e-12:
                tr |= _OV
        else:
            t_over[i] = 0.0
        if volt < v_under:
            t_under[i] += dt
            if t_under[i] >= v_delay - 1e-12:
                tr |= _UV
        else:
            t_under[i] = 0.0
        # auto-reset: every condition clear, with hysteresis, for auto_reset seconds
        if tr != 0 and auto_reset > 0.0:
            clear = ((pickup <= 0.0 or cur <= pickup) and (inst <= 0.0 or cur < inst)
                     and temp < t_trip - hyst_c and volt <= v_over - hyst_v and volt >= v_under + hyst_v
                     and theta[i] <= 0.0)
            if clear:
                t_clear[i] += dt
                if t_clear[i] >= auto_reset - 1e-12:
                    tr = 0
                    t_clear[i] = 0.0
            else:
                t_clear[i] = 0.0
        trip[i] = tr
        if tr != 0:
            lo_w[i] = 0.0
            hi_w[i] = 0.0
            continue
        f = 1.0
        if temp > t_start:
            f = max(0.0, (t_zero - temp) / (t_zero - t_start))
        hi = max_dis_w[i] * f
        lo = -max_chg_w[i] * f
        s = soc[i]
        if s <= soc_min:
            hi = 0.0
        if s >= soc_max:
            lo = 0.0
        lo_w[i] = max(lo_w[i], lo)
        hi_w[i] = min(hi_w[i], hi)


class Protection(Program):
    id = "protection"
    Params = ProtectionParams
    kernel = protect
    writes = ("lo_w", "hi_w", "trip")

    def memory(self) -> list[ArraySpec]:
        return [ArraySpec(k, "f8", (self.n,)) for k in ("theta", "t_over_s", "t_under_s", "t_clear_s")]

    def on_command(self, img, op, node, value, arg) -> None:
        from vbatt.kernel.image import Op

        if op == Op.RESET_TRIP and 0 <= node < self.n:  # the scan cleared trip[node]; clear our memory
            for k in ("theta", "t_over_s", "t_under_s", "t_clear_s"):
                self.mem(img, k)[node] = 0.0

    def kernel_params(self) -> dict:
        p: ProtectionParams = self.params
        k, alpha = IEC_CURVES[p.oc_curve]
        inf = math.inf
        return dict(soc_min=p.soc_min, soc_max=p.soc_max, pickup_a=p.oc_pickup_a or 0.0, curve_k=k,
                    curve_alpha=alpha, tms=p.oc_tms, reset_s=p.oc_reset_s, inst_a=p.oc_instantaneous_a or 0.0,
                    t_start_c=p.derate_start_c, t_zero_c=p.derate_zero_c,
                    t_trip_c=inf if p.trip_temperature_c is None else p.trip_temperature_c,
                    v_over_v=p.over_voltage_v or inf, v_under_v=p.under_voltage_v or -inf,
                    v_delay_s=p.voltage_delay_s, auto_reset_s=p.auto_reset_s or 0.0,
                    hyst_c=p.reset_hysteresis_c, hyst_v=p.reset_hysteresis_v)
