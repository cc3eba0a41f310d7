"""The per-node passes of the energy program: class sums in, serve caps and runtimes out.

Usable energy of a node e_i = capacity_wh * max(0, soc - soc_min). Stranded energy: over the
horizon H a node's battery can deliver at most rate_i * H, rate_i = min(hi_i, d_i + L_i) (its
discharge limit, and no more than its own load plus what its link exports); the rest cannot reach
any load in time and is not pooled. A node that cannot import its whole load (d_i > L_i) lives on
its own battery for the difference: its runtime is also limited to e_i / (d_i - L_i).
"""

from __future__ import annotations

import math

from numba import njit

from ..codes import Alarm
from .rules import decide

__all__ = ["energy_step", "ENERGY_ALARMS"]

ENERGY_ALARMS = int(Alarm.RIDE_THROUGH_SHORT)


@njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def energy_step(online, trip, priority, demand_w, forecast_w, use_forecast, soc, capacity_wh, max_dis_w,
                link_w, hi_w, narrowed, main_limit_w, dt_s,
                soc_min, horizon_s, hold_s,
                class_of, n_cls, target_s, clock_s, latched, state,
                dnow, dres, energy_wh, tau, reserve_wh, frac, runtime_s, reachable, s_tau, s_on,
                serve_max_w, node_runtime_s, alarm):
    """Returns the number of classes whose target is unreachable. Reads node inputs (and hi_w
    when protection narrowed it, forecast_w when a forecast runs); writes serve_max_w,
    node_runtime_s and the RIDE_THROUGH_SHORT alarm bit; class arrays and `state` are memory."""
    n = online.shape[0]
    np_ = class_of.shape[0]
    for c in range(n_cls):
        dnow[c] = 0.0
        dres[c] = 0.0
        energy_wh[c] = 0.0
    # Horizon of the stranded-energy judgement: the longest remaining target, at least horizon_s.
    h_s = horizon_s
    for c in range(n_cls):
        h_s = max(h_s, target_s[c] - clock_s[c])
    e_tot = 0.0
    for i in range(n):
        d = demand_w[i]
        cw = capacity_wh[i]
        sc = soc[i]
        g = max_dis_w[i]
        lk = link_w[i]
        ok = ((online[i] != 0) & (d >= 0.0) & (d < math.inf) & (cw >= 0.0) & (cw < math.inf)
              & (sc >= 0.0) & (sc <= 1.0) & (g >= 0.0) & (g < math.inf) & (lk >= 0.0) & (lk < math.inf))
        if not ok:
            continue
        p = priority[i]
        c = class_of[min(max(p, 0), np_ - 1)]
        f = forecast_w[i] if use_forecast else d
        f = f if (f >= 0.0) & (f < math.inf) else d
        dnow[c] += d
        dres[c] += f
        if narrowed:
            hh = hi_w[i]
            g = min(g, hh) if hh == hh else g
        g = 0.0 if trip[i] != 0 else g
        e = cw * max(0.0, sc - soc_min)
        e = min(e, min(g, d + lk) * h_s / 3600.0)
        energy_wh[c] += e
        e_tot += e
    bad = decide(n_cls, dnow, dres, e_tot, main_limit_w, dt_s, hold_s, target_s, clock_s, latched, state,
                 tau, reserve_wh, frac, runtime_s, reachable, s_tau, s_on)
    for i in range(n):
        p = priority[i]
        c = class_of[min(max(p, 0), np_ - 1)]
        d = demand_w[i]
        fc = frac[c]
        serve_max_w[i] = math.inf if fc >= 1.0 else fc * d
        lk = link_w[i]
        e = capacity_wh[i] * max(0.0, soc[i] - soc_min)
        own = e * 3600.0 / (d - lk) if d > lk else math.inf
        node_runtime_s[i] = min(runtime_s[c], own)
        a = alarm[i] & ~ENERGY_ALARMS
        alarm[i] = a | ENERGY_ALARMS if reachable[c] == 0 else a
    return bad
