"""Vectorised battery physics for simulated nodes (numba, one call per step for all nodes).

Per node: open-circuit voltage linear in SoC, terminal voltage V = Voc - I*R with
I solving R*I^2 - Voc*I + P = 0 (P = battery power at the terminals), SoC
integration of the cell-side energy with charge/discharge efficiency, and a
first-order thermal model (on where a thermal resistance is given). With ideal
parameters (R = 0, efficiency 1, no thermal model) every reported value is
exactly what the config says, so tests can check exact numbers.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["PROFILE_CONST", "PROFILE_SINE", "PROFILE_STEP", "PROFILE_CSV", "step_physics", "demand_at"]

PROFILE_CONST, PROFILE_SINE, PROFILE_STEP, PROFILE_CSV = 0, 1, 2, 3


@njit(nogil=True, cache=True)
def demand_at(t_s, kind, base_w, p1, p2, p3, p4, trace, out):
    """Demand of every node at time t_s.

    sine: base + p1*sin(2*pi*(t+p4)/p2) + N(0, p3); step: base before p1, p2 after;
    csv: trace[p3 + (t/p1 mod p2)] (offset p3, length p2, sample spacing p1).
    """
    for i in range(kind.shape[0]):
        k = kind[i]
        if k == 0:
            d = base_w[i]
        elif k == 1:
            d = base_w[i] + p1[i] * math.sin(2.0 * math.pi * (t_s + p4[i]) / p2[i])
            if p3[i] > 0.0:
                d += np.random.normal(0.0, p3[i])
        elif k == 2:
            d = base_w[i] if t_s < p1[i] else p2[i]
        else:
            n = int(p2[i])
            j = int(t_s / p1[i]) % n
            d = trace[int(p3[i]) + j]
        out[i] = d if d > 0.0 else 0.0


@njit(nogil=True, cache=True)
def step_physics(dt_s, command_w, capacity_wh, max_dis_w, max_chg_w,
                 ocv_empty, ocv_full, r_ohm, eff_chg, eff_dis, t_amb, r_th, c_th,
                 soc, temp_c, volt_v, curr_a, avail_dis_w, avail_chg_w):
    """Advance every node by dt_s under its battery power command (> 0 discharge)."""
    for i in range(soc.shape[0]):
        s = soc[i]
        dis = max_dis_w[i] if s > 0.0 else 0.0
        chg = max_chg_w[i] if s < 1.0 else 0.0
        p = command_w[i]
        if not (p == p):  # NaN command: do nothing
            p = 0.0
        p = min(max(p, -chg), dis)
        voc = ocv_empty[i] + (ocv_full[i] - ocv_empty[i]) * s
        r = r_ohm[i]
        if r > 0.0:
            disc = voc * voc - 4.0 * r * p
            cur = (voc - math.sqrt(disc)) / (2.0 * r) if disc > 0.0 else voc / (2.0 * r)
        else:
            cur = p / voc if voc > 0.0 else 0.0
        cell_w = voc * cur  # power at the cells, losses included
        if cell_w > 0.0:
            cell_w = cell_w / eff_dis[i]
        else:
            cell_w = cell_w * eff_chg[i]
        cap = capacity_wh[i]
        if cap > 0.0:
            s = s - cell_w * dt_s / 3600.0 / cap
            s = min(max(s, 0.0), 1.0)
        soc[i] = s
        if r_th[i] > 0.0:
            temp_c[i] += (cur * cur * r - (temp_c[i] - t_amb[i]) / r_th[i]) / c_th[i] * dt_s
        volt_v[i] = voc - cur * r
        curr_a[i] = cur
        avail_dis_w[i] = max_dis_w[i] if s > 0.0 else 0.0
        avail_chg_w[i] = max_chg_w[i] if s < 1.0 else 0.0
