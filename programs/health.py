"""Health monitoring (docs/design.md §3 step 5): alarms per node, their states, and limit narrowing.

Reads: every device measurement of the field table (voltage_v, current_a,
temperature_c, soc, capacity_wh, demand_w, max_discharge_w, max_charge_w,
link_max_w), online and alarm.
Writes: alarm (the bits of `codes.ALARM_CODES` it owns: all but the
allocator's SAFE_ALLOCATION and LOAD_SHED), and its memory:

* `health.acked` (u4 per node): the active alarm bits an operator acknowledged
  (Op.ACK_ALARM with arg = bits; node -1 = every node). A bit that clears loses
  its acknowledgement, so a returning condition is unacknowledged again. State
  of a code: cleared (bit off in `alarm`), active (on, not acked), acknowledged.
* the node field `derate` (1 = none): the limit factor of the configured
  `derate` table (alarm name -> factor); health narrows the node's lo_w/hi_w
  by it in the same cycle (so it runs before allocation): the
  "redistribution" of load away from a node in trouble. A field, not memory,
  so SCADA sees it.
* `health.resistance_ohm`, `health.resistance0_ohm`: the internal resistance
  estimate -dV/dI (from consecutive samples whose current differs by at least
  `resistance_min_delta_a`), smoothed, and its baseline learnt from the first
  `resistance_learn_n` estimates; RESISTANCE_DRIFT when it drifts by more than
  `resistance_drift` of the baseline.

Threshold alarms clear only when the value is back inside the limit by the
deadband (hysteresis). Rates: temperature rise from a first-order filtered
derivative (`rate_tau_s`). Stale data (offline) raises STALE_DATA and freezes
the node's other alarms; NaN or out-of-range inputs (field ranges of
`fields.py`) raise BAD_DATA.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
from numba import njit
from pydantic import BaseModel, ConfigDict, Field, field_validator

from vbatt.kernel.fields import Role, Scope, fields, names, node_field
from vbatt.kernel.program import Program, readonly
from vbatt.kernel.seqblock import ArraySpec

from vbatt.programs.allocation.kernel import ALLOC_ALARMS
from vbatt.programs.codes import ALARM_CODES, Alarm, by_name

__all__ = ["Health", "HealthParams", "health_step", "CHECKED_FIELDS"]

# Inputs whose range the BAD_DATA alarm checks: the device measurements with a range (field table).
CHECKED_FIELDS = names(fields(Scope.NODE, Role.MEASUREMENT, ranged=True))

_VH, _VL, _IH = int(Alarm.VOLTAGE_HIGH), int(Alarm.VOLTAGE_LOW), int(Alarm.CURRENT_HIGH)
_TH, _TL, _TR = int(Alarm.TEMPERATURE_HIGH), int(Alarm.TEMPERATURE_LOW), int(Alarm.TEMPERATURE_RISE)
_SL, _SH, _RD = int(Alarm.SOC_LOW), int(Alarm.SOC_HIGH), int(Alarm.RESISTANCE_DRIFT)
_STALE, _BAD = int(Alarm.STALE_DATA), int(Alarm.BAD_DATA)
_OWN = 0xFFFFFFFF & ~(ALLOC_ALARMS | int(Alarm.RIDE_THROUGH_SHORT))  # the energy program owns that one

Opt = float | None


class HealthParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    voltage_high_v: Opt = None
    voltage_low_v: Opt = None
    current_high_a: Opt = None
    temperature_high_c: Opt = 45.0
    temperature_low_c: Opt = 0.0
    soc_low: Opt = 0.15
    soc_high: Opt = None
    temperature_rise_c_per_s: Opt = 0.05
    rate_tau_s: Annotated[float, Field(gt=0)] = 10.0
    resistance_min_delta_a: Annotated[float, Field(gt=0)] = 2.0
    resistance_learn_n: Annotated[int, Field(ge=1)] = 50
    resistance_drift: Opt = 0.5
    deadband_v: Annotated[float, Field(ge=0)] = 0.5
    deadband_a: Annotated[float, Field(ge=0)] = 1.0
    deadband_c: Annotated[float, Field(ge=0)] = 1.0
    deadband_soc: Annotated[float, Field(ge=0)] = 0.01
    derate: dict[str, Annotated[float, Field(ge=0, le=1)]] = {}

    @field_validator("derate")
    @classmethod
    def _names(cls, v: dict[str, float]) -> dict[str, float]:
        for name in v:
            try:
                by_name(ALARM_CODES, name)
            except KeyError as exc:
                raise ValueError(exc.args[0]) from None
        return v


@njit(nogil=True, cache=True, inline="always")
def _thr(on, active, bit, value, limit, deadband, above):
    """Threshold with hysteresis: set beyond the limit, cleared only back inside by the deadband.

    Branch-free (selects, not jumps): `on` says whether the limit is configured (finite)."""
    held = (active & bit) != 0
    if above:
        hit = (value > limit) | (held & (value > limit - deadband))
    else:
        hit = (value < limit) | (held & (value < limit + deadband))
    return bit if on & hit else 0


# error_model="numpy": a division by zero gives inf/NaN (selected away below) instead of a branch to
# raise; with the per-node work written as selects the loop runs at ~2 ns a node rather than ~13.
@njit(nogil=True, cache=True, error_model="numpy")
def health_step(dt, online, volt, cur, temp, soc, checked, check_lo, check_hi, alarm, acked, derate,
                t_prev, t_rate, v_prev, i_prev, r_est, r0, n_est, has_prev, bad_in,
                v_hi, v_lo, i_hi, t_hi, t_lo, s_lo, s_hi, rise, rate_tau, r_min_di, r_learn, r_drift,
                db_v, db_a, db_c, db_s, derate_bits, derate_factor):
    k_rate = 1.0 - math.exp(-dt / rate_tau) if dt > 0.0 else 0.0
    step_ok = dt > 0.0
    on_vh, on_vl, on_ih = abs(v_hi) < math.inf, abs(v_lo) < math.inf, abs(i_hi) < math.inf
    on_th, on_tl = abs(t_hi) < math.inf, abs(t_lo) < math.inf
    on_sl, on_sh, on_tr = abs(s_lo) < math.inf, abs(s_hi) < math.inf, abs(rise) < math.inf
    on_rd = r_drift == r_drift
    # Range check field by field: a contiguous sweep per field vectorises; indexing the
    # tuple of fields inside the node loop did not (it cost most of this kernel's time).
    bad_in[:] = 0
    for f in range(len(checked)):
        x, lo_f, hi_f = checked[f], check_lo[f], check_hi[f]
        for i in range(online.shape[0]):
            bad_in[i] |= not ((x[i] >= lo_f) & (x[i] <= hi_f))
    for i in range(online.shape[0]):
        old = alarm[i]
        keep = old & ~_OWN  # the allocator's bits
        live = online[i] != 0
        v = volt[i]
        ci = cur[i]
        c = abs(ci)
        t = temp[i]
        s = soc[i]
        a = _BAD if bad_in[i] else 0
        a |= _thr(on_vh, old, _VH, v, v_hi, db_v, True) | _thr(on_vl, old, _VL, v, v_lo, db_v, False)
        a |= _thr(on_ih, old, _IH, c, i_hi, db_a, True)
        a |= _thr(on_th, old, _TH, t, t_hi, db_c, True) | _thr(on_tl, old, _TL, t, t_lo, db_c, False)
        a |= _thr(on_sl, old, _SL, s, s_lo, db_s, False) | _thr(on_sh, old, _SH, s, s_hi, db_s, True)
        # Rate and resistance learn only from two consecutive live samples.
        upd = live & (has_prev[i] != 0) & step_ok & (t == t)
        tr_old = t_rate[i]
        tr = tr_old + k_rate * ((t - t_prev[i]) / dt - tr_old)
        tr = tr if upd else tr_old
        t_rate[i] = tr
        di = ci - i_prev[i]
        est = -(v - v_prev[i]) / di
        n = n_est[i]
        re_old = r_est[i]
        take = upd & (abs(di) >= r_min_di) & (est >= 0.0) & (est < math.inf)
        re = est if n == 0 else re_old + 0.1 * (est - re_old)
        re = re if take else re_old
        r_est[i] = re
        learn = take & (n < r_learn)
        r0[i] = re if learn else r0[i]
        n += learn
        n_est[i] = n
        a |= _thr(on_tr, old, _TR, tr, rise, rise * 0.2, True)
        base = r0[i]
        dev = abs(re - base) / base
        drift = on_rd & (n >= r_learn) & (base > 0.0) & ((dev > r_drift) | (((old & _RD) != 0) & (dev > 0.8 * r_drift)))
        a |= _RD if drift else 0
        t_prev[i] = t if live & (t == t) else t_prev[i]
        v_prev[i] = v if live else v_prev[i]
        i_prev[i] = ci if live else i_prev[i]
        has_prev[i] = live
        # Offline: STALE_DATA, the other alarms frozen (no fresh data to judge).
        a = ((a & _OWN) | keep) if live else ((old & _OWN & ~_STALE) | _STALE | keep)
        alarm[i] = a
        acked[i] &= a  # a cleared bit loses its acknowledgement
    # The derate table in passes of its own: an inner loop over it in the node loop (even an
    # empty one) kept the node loop from vectorising and tripled its time.
    derate[:] = 1.0
    for j in range(derate_bits.shape[0]):
        bit, fac = derate_bits[j], derate_factor[j]
        for i in range(online.shape[0]):
            derate[i] = min(derate[i], fac) if alarm[i] & bit else derate[i]


def _opt(x: float | None) -> float:
    return math.nan if x is None else float(x)


@njit(nogil=True, cache=True)
def health_alarms(dt_s, online, voltage_v, current_a, temperature_c, soc, checked, check_lo, check_hi, alarm,
                  acked, derate, t_prev_c, t_rate_c_per_s, v_prev_v, i_prev_a, resistance_ohm, resistance0_ohm,
                  n_est, has_prev, bad, v_hi, v_lo, i_hi, t_hi, t_lo, s_lo, s_hi, rise, rate_tau, r_min_di,
                  r_learn, r_drift, db_v, db_a, db_c, db_s, derate_bits, derate_factor):
    """The kernel without a derate table: alarms only, the limits untouched."""
    health_step(dt_s[0], online, voltage_v, current_a, temperature_c, soc, checked, check_lo, check_hi, alarm,
                acked, derate, t_prev_c, t_rate_c_per_s, v_prev_v, i_prev_a, resistance_ohm, resistance0_ohm,
                n_est, has_prev, bad, v_hi, v_lo, i_hi, t_hi, t_lo, s_lo, s_hi, rise, rate_tau, r_min_di,
                r_learn, r_drift, db_v, db_a, db_c, db_s, derate_bits, derate_factor)


@njit(nogil=True, cache=True)
def health_kernel(dt_s, online, voltage_v, current_a, temperature_c, soc, checked, check_lo, check_hi, alarm,
                  acked, derate, t_prev_c, t_rate_c_per_s, v_prev_v, i_prev_a, resistance_ohm, resistance0_ohm,
                  n_est, has_prev, bad, v_hi, v_lo, i_hi, t_hi, t_lo, s_lo, s_hi, rise, rate_tau, r_min_di,
                  r_learn, r_drift, db_v, db_a, db_c, db_s, derate_bits, derate_factor, lo_w, hi_w):
    """The program's kernel, bound by name: the alarms (health_step), then the limits narrowed by the
    derate factor."""
    health_step(dt_s[0], online, voltage_v, current_a, temperature_c, soc, checked, check_lo, check_hi, alarm,
                acked, derate, t_prev_c, t_rate_c_per_s, v_prev_v, i_prev_a, resistance_ohm, resistance0_ohm,
                n_est, has_prev, bad, v_hi, v_lo, i_hi, t_hi, t_lo, s_lo, s_hi, rise, rate_tau, r_min_di,
                r_learn, r_drift, db_v, db_a, db_c, db_s, derate_bits, derate_factor)
    for i in range(lo_w.shape[0]):
        f = derate[i]
        lo_w[i] *= f
        hi_w[i] *= f


class Health(Program):
    id = "health"
    Params = HealthParams
    kernel = health_kernel
    writes = ("alarm", "derate", "lo_w", "hi_w")

    def __init__(self, params, n_nodes: int):
        super().__init__(params, n_nodes)
        if not params.derate:  # nothing to narrow: the limits stay read-only, and any place in the order is fine
            self.kernel = health_alarms
            self.writes = ("alarm", "derate")

    def memory(self) -> list[ArraySpec]:
        n = self.n
        f8 = [ArraySpec(k, "f8", (n,)) for k in ("t_prev_c", "t_rate_c_per_s", "v_prev_v",
                                                  "i_prev_a", "resistance_ohm", "resistance0_ohm")]
        return [ArraySpec("acked", "u4", (n,)), *f8, ArraySpec("n_est", "i8", (n,)),
                ArraySpec("has_prev", "u1", (n,)), ArraySpec("bad", "u1", (n,))]

    def init(self, img) -> None:
        img.node["derate"][:] = 1.0

    def on_command(self, img, op, node, value, arg) -> None:
        from vbatt.kernel.image import Op

        if op != Op.ACK_ALARM:
            return
        acked, alarm = self.mem(img, "acked"), img.node["alarm"]
        if node == -1:
            acked |= alarm & np.uint32(arg & 0xFFFFFFFF)
        elif 0 <= node < self.n:
            acked[node] |= alarm[node] & np.uint32(arg & 0xFFFFFFFF)

    def bindings(self, img) -> dict:
        p: HealthParams = self.params
        nd = img.node
        return dict(checked=tuple(readonly(nd[f]) for f in CHECKED_FIELDS),
                    check_lo=np.array([node_field(f).lo for f in CHECKED_FIELDS], dtype=np.float64),
                    check_hi=np.array([node_field(f).hi for f in CHECKED_FIELDS], dtype=np.float64),
                    derate_bits=np.array([by_name(ALARM_CODES, k).mask for k in p.derate], dtype=np.uint32),
                    derate_factor=np.array(list(p.derate.values()), dtype=np.float64))

    def kernel_params(self) -> dict:
        p: HealthParams = self.params
        return dict(v_hi=_opt(p.voltage_high_v), v_lo=_opt(p.voltage_low_v), i_hi=_opt(p.current_high_a),
                    t_hi=_opt(p.temperature_high_c), t_lo=_opt(p.temperature_low_c), s_lo=_opt(p.soc_low),
                    s_hi=_opt(p.soc_high), rise=_opt(p.temperature_rise_c_per_s), rate_tau=p.rate_tau_s,
                    r_min_di=p.resistance_min_delta_a, r_learn=p.resistance_learn_n,
                    r_drift=_opt(p.resistance_drift), db_v=p.deadband_v, db_a=p.deadband_a, db_c=p.deadband_c,
                    db_s=p.deadband_soc)
