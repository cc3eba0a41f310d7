"""The per-node passes of the energy program: class sums in, serve caps, limits and runtimes out.

Per node: usable energy e_i = capacity_wh * max(0, soc - soc_min); link L_i; demand d_i.
Where the link cannot carry the whole load (d_i > L_i), the part l_i = d_i - L_i must come from
the node's own battery: that energy is the node's own (stranded for everyone else), the node's
runtime is at most e_i / l_i, and it may export only what its own need over the horizon H leaves
(its battery limit hi_i is narrowed to max(l_i, e_i / H), so the balancing does not drain it for
others). Only min(d_i, L_i) of its demand is pooled. A node without that need pools its energy as
far as its discharge and link can deliver it within H: min(e_i, min(hi_i, d_i + L_i) * H).
H = the longest remaining target, at least `horizon_s`.
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
                link_w, lo_w, hi_w, narrowed, main_limit_w, dt_s,
                soc_min, horizon_s, hold_s,
                class_of, n_cls, target_s, clock_s, latched, state,
                dfull, dnow, dres, energy_wh, local_s, tau, reserve_wh, frac, runtime_s, reachable, s_tau, s_on,
                serve_max_w, node_runtime_s, alarm):
    """Returns the number of classes whose target is unreachable. Reads node inputs (lo_w/hi_w
    when protection narrowed them, forecast_w when a forecast runs); writes serve_max_w,
    node_runtime_s, hi_w (narrowed; lo_w/hi_w written whole when nothing narrowed them before)
    and the RIDE_THROUGH_SHORT alarm bit; class arrays and `state` are memory."""
    n = online.shape[0]
    np_ = class_of.shape[0]
    for c in range(n_cls):
        dfull[c] = 0.0
        dnow[c] = 0.0
        dres[c] = 0.0
        energy_wh[c] = 0.0
        local_s[c] = math.inf
    h_s = horizon_s
    active = False  # no targets: nothing is reserved, the allocation is today's (runtimes still computed)
    for c in range(n_cls):
        h_s = max(h_s, target_s[c] - clock_s[c])
        active |= target_s[c] > 0.0
    e_tot = 0.0
    for i in range(n):
        d = demand_w[i]
        cw = capacity_wh[i]
        sc = soc[i]
        g = max_dis_w[i]
        lk = link_w[i]
        ok = ((online[i] != 0) & (d >= 0.0) & (d < math.inf) & (cw >= 0.0) & (cw < math.inf)
              & (sc >= 0.0) & (sc <= 1.0) & (g >= 0.0) & (g < math.inf) & (lk >= 0.0) & (lk < math.inf))
        hh = hi_w[i] if narrowed else math.inf
        g = min(g, hh) if hh == hh else g
        g = 0.0 if trip[i] != 0 else g
        e = cw * max(0.0, sc - soc_min)
        own = max(0.0, d - lk)
        if not narrowed:
            lo_w[i] = -math.inf
            hi_w[i] = math.inf
        if not ok:
            continue
        p = priority[i]
        c = class_of[min(max(p, 0), np_ - 1)]
        f = forecast_w[i] if use_forecast else d
        f = f if (f >= 0.0) & (f < math.inf) else d
        dfull[c] += f
        dnow[c] += d - own
        dres[c] += min(f, lk)
        if own > 0.0:
            local_s[c] = min(local_s[c], e * 3600.0 / own if g >= own else 0.0)
            pooled = min(max(0.0, e - own * h_s / 3600.0), max(0.0, min(g - own, lk)) * h_s / 3600.0)
            hi_w[i] = min(hi_w[i], max(own, e * 3600.0 / h_s)) if active else hi_w[i]
        else:
            pooled = min(e, min(g, d + lk) * h_s / 3600.0)
        energy_wh[c] += pooled
        e_tot += pooled
    bad = decide(n_cls, dnow, dres, e_tot, main_limit_w, dt_s, hold_s, target_s, clock_s, latched, state,
                 local_s, tau, reserve_wh, frac, runtime_s, reachable, s_tau, s_on)
    for i in range(n):
        p = priority[i]
        c = class_of[min(max(p, 0), np_ - 1)]
        d = demand_w[i]
        fc = frac[c] if active else 1.0
        serve_max_w[i] = math.inf if fc >= 1.0 else fc * d
        lk = link_w[i]
        e = capacity_wh[i] * max(0.0, soc[i] - soc_min)
        own = e * 3600.0 / (d - lk) if d > lk else math.inf
        node_runtime_s[i] = min(runtime_s[c], own)
        a = alarm[i] & ~ENERGY_ALARMS
        alarm[i] = a | ENERGY_ALARMS if reachable[c] == 0 else a
    return bad
