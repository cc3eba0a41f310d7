"""What a simulation keeps: running totals per class and the fleet, and series for the plots.

Everything is preallocated: the totals are exact over every step; the series have
a fixed number of points (each the mean, or the band, over a bucket of steps), so
memory does not grow with the duration.

"Fully served": a class is fully served in a step when its shed power is at most
SERVED_TOL times its demand (plus 1e-9 W for round-off). A class with no demand
is always fully served.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["Recorder", "observe", "SERVED_TOL", "CS", "FL"]

SERVED_TOL = 1e-6
_ABS_W = 1e-9
_REVERSAL_W = 1e-3  # a setpoint this close to 0 keeps its sign (no reversal counted through it)


class CS:
    """Rows of the per-class series (rec_c[point, row, class])."""

    DEMAND_W, SERVED_W, SHED_W, SOC_MIN, SOC_MAX, SOC_MEAN, USABLE_WH, RUNTIME_S = range(8)
    N = 8
    NAMES = ("demand_w", "served_w", "shed_w", "soc_min", "soc_max", "soc_mean", "usable_wh", "runtime_s")


class FL:
    """Fleet totals (fl[...]) and the fleet series (rec_f[point, ...])."""

    DIS_WH, CHG_WH, PEAK_MAIN_W, SPREAD_MAX, STRANDED_WH, REVERSALS, FIRST_SHED_K, DEMAND_WH, SHED_WH = range(9)
    N = 9
    MAIN_W, MAIN_LIMIT_W, BATTERY_W, DEMAND_W, SOC = range(5)
    SERIES = ("main_w", "main_limit_w", "battery_w", "demand_w", "soc")


@njit(nogil=True, cache=True)
def observe(k, dt_h, soc_min, priority, demand_w, served_w, shed_w, battery_w, soc, capacity_wh,
            main_w, main_limit_w, step_c, acc_c, first_c, drop_k, fl, last_sign,
            point, rec_c, rec_f, rec_n):
    """One step: per-class sums into step_c, then the totals and the bucket `point` of the series.

    step_c[row, class] scratch (rows as CS); acc_c[0..2, class] demand/served/shed Wh;
    first_c[0, class] first step shed, first_c[1, class] first step at or after drop_k not fully served."""
    n_cls = step_c.shape[1]
    for c in range(n_cls):
        step_c[0, c] = 0.0
        step_c[1, c] = 0.0
        step_c[2, c] = 0.0
        step_c[3, c] = math.inf
        step_c[4, c] = -math.inf
        step_c[5, c] = 0.0  # sum cap * soc
        step_c[6, c] = 0.0  # usable Wh
        step_c[7, c] = 0.0  # sum cap
    dis = 0.0
    chg = 0.0
    smin = math.inf
    smax = -math.inf
    e_all = 0.0
    cap_all = 0.0
    usable_all = 0.0
    for i in range(priority.shape[0]):
        c = priority[i]
        step_c[0, c] += demand_w[i]
        step_c[1, c] += served_w[i]
        step_c[2, c] += shed_w[i]
        b = battery_w[i]
        dis += max(b, 0.0)
        chg += max(-b, 0.0)
        s = 1 if b > _REVERSAL_W else (-1 if b < -_REVERSAL_W else 0)
        if s != 0:
            if last_sign[i] != 0 and s != last_sign[i]:
                fl[5] += 1.0
            last_sign[i] = s
        cw = capacity_wh[i]
        if cw > 0.0:
            sc = soc[i]
            step_c[3, c] = min(step_c[3, c], sc)
            step_c[4, c] = max(step_c[4, c], sc)
            step_c[5, c] += cw * sc
            u = cw * max(0.0, sc - soc_min)
            step_c[6, c] += u
            step_c[7, c] += cw
            smin = min(smin, sc)
            smax = max(smax, sc)
            e_all += cw * sc
            cap_all += cw
            usable_all += u
    fl[0] += dis * dt_h
    fl[1] += chg * dt_h
    fl[2] = max(fl[2], main_w)
    if smax >= smin:
        fl[3] = max(fl[3], smax - smin)
    any_shed = False
    dem = 0.0
    shed = 0.0
    for c in range(n_cls):
        d = step_c[0, c]
        sh = step_c[2, c]
        dem += d
        shed += sh
        acc_c[0, c] += d * dt_h
        acc_c[1, c] += step_c[1, c] * dt_h
        acc_c[2, c] += sh * dt_h
        if sh > SERVED_TOL * d + _ABS_W:
            any_shed = True
            if first_c[0, c] < 0:
                first_c[0, c] = k
            if drop_k >= 0 and k >= drop_k and first_c[1, c] < 0:
                first_c[1, c] = k
    fl[7] += dem * dt_h
    fl[8] += shed * dt_h
    if any_shed and fl[6] < 0.0:
        fl[6] = k
        fl[4] = usable_all
    # the series: sums of the bucket (divided by rec_n at the end), bands as min/max, levels as the last
    j = point
    first = rec_n[j] == 0
    rec_n[j] += 1
    for c in range(n_cls):
        rec_c[j, 0, c] += step_c[0, c]
        rec_c[j, 1, c] += step_c[1, c]
        rec_c[j, 2, c] += step_c[2, c]
        lo = step_c[3, c]
        hi = step_c[4, c]
        if first:
            rec_c[j, 3, c] = lo
            rec_c[j, 4, c] = hi
        else:
            rec_c[j, 3, c] = min(rec_c[j, 3, c], lo)
            rec_c[j, 4, c] = max(rec_c[j, 4, c], hi)
        rec_c[j, 5, c] = step_c[5, c] / step_c[7, c] if step_c[7, c] > 0.0 else math.nan
        rec_c[j, 6, c] = step_c[6, c]
    rec_f[j, 0] += main_w
    rec_f[j, 1] += main_limit_w
    rec_f[j, 2] += dis - chg
    rec_f[j, 3] += dem
    rec_f[j, 4] = e_all / cap_all if cap_all > 0.0 else math.nan



class Recorder:
    """Preallocated totals and series of one simulation run."""

    def __init__(self, n_nodes: int, n_classes: int, steps: int, points: int, drop_k: int):
        self.steps = steps
        self.points = max(1, min(points, steps))
        self.bucket = -(-steps // self.points)  # steps per point
        self.points = -(-steps // self.bucket)
        self.drop_k = drop_k
        self.step_c = np.zeros((CS.N, n_classes))
        self.acc_c = np.zeros((3, n_classes))
        self.first_c = np.full((2, n_classes), -1, np.int64)
        self.fl = np.zeros(FL.N)
        self.fl[FL.FIRST_SHED_K] = -1.0
        self.fl[FL.STRANDED_WH] = math.nan
        self.last_sign = np.zeros(n_nodes, np.int8)
        self.rec_c = np.zeros((self.points, CS.N, n_classes))
        self.rec_c[:, CS.RUNTIME_S, :] = math.nan
        self.rec_f = np.zeros((self.points, len(FL.SERIES)))
        self.rec_n = np.zeros(self.points, np.int64)
        self.has_runtime = False

    def point_of(self, k: int) -> int:
        return k // self.bucket

    def finish(self) -> None:
        """Sums of the buckets to means."""
        n = np.maximum(self.rec_n, 1).astype(float)
        for row in (CS.DEMAND_W, CS.SERVED_W, CS.SHED_W):
            self.rec_c[:, row, :] /= n[:, None]
        for row in (FL.MAIN_W, FL.MAIN_LIMIT_W, FL.BATTERY_W, FL.DEMAND_W):
            self.rec_f[:, row] /= n
