"""The allocation kernel of DESIGN.md §2, exact, in O(N) per cycle (plus rare re-sorts).

Stages, each the exact optimum of its own problem given the earlier stages:

1. Limits. A node is usable when online, not tripped and its data finite and in
   range; others get the safe allocation (own battery, no bus) or nothing.
   lo_i/hi_i = protection's narrowed limits (or -max_charge_w/max_discharge_w),
   times the health derate; lo_i = 0 at soc >= soc_max, hi_i = 0 at soc <= soc_min,
   both 0 without capacity; lo_i <= 0 <= hi_i. link L_i = link_max_w.
2. Shedding, lexicographic by priority class (0 first). Served load r_i of a
   usable node is feasible iff r_i <= hi_i + L_i and the bus balances:
   sum_i max(r_i - hi_i, -L_i) <= main_limit_w. Serving r_i costs
   max(0, r_i - free_i) of the common budget, free_i = max(0, hi_i - L_i) (the
   part of a node's own load its battery covers while it still exports its full
   link). Classes are served in order while the budget lasts; in the class that
   is cut, the shed s_i minimises sum s_i^2 / d_i ("pro rata to demand") within
   [d_i - cap_i, d_i - min(cap_i, free_i)], cap_i = min(d_i, hi_i + L_i):
   water-filling with weights d_i. Less critical classes then keep only the
   load their own islands cover for free (never at a more critical node's
   expense: lexicographic maximum of served load per class).
   Restore hysteresis: a node's shed rises at once but falls only after it has
   been lower by the margin for hold_s, and never while a more critical class
   is still holding.
3. Main supply first: main_w = min(main_limit_w, sum_i min(r_i - lo_i, L_i)),
   i.e. all the main supply the links can carry, the spare charging batteries.
4. Balance: the batteries supply P = sum r_i - main_w, each
   b_i in [max(lo_i, r_i - L_i), min(hi_i, r_i + L_i)], minimising
   sum b_i^2 / w_i: water-filling with w_i = usable energy
   capacity_wh * max(0, soc - soc_min) when discharging (batteries empty
   together) and free room capacity_wh * max(0, soc_max - soc) when charging
   (batteries fill together: the fullest-in-time first get the least).
   Ramp: each b_i stays within prev_i +- ramp * dt. The main supply is the
   slack for it (between the least the links need and main-first's most), so
   a change of main supply or load moves the batteries at the ramp; only when
   the load could not be served otherwise are the ramp windows used fully and
   the rest moves beyond them (minimum ramp violation, then balance). No
   previous setpoint on the first cycle: no ramp limit then.
   bus_i = r_i - b_i, so served = battery + bus and sum bus = main_w exactly.
"""

from __future__ import annotations

import math

from numba import njit

from .alloc_waterfill import waterfill, waterfill_subset
from .codes import Alarm

__all__ = ["allocate", "ALLOC_ALARMS", "WEIGHT_FLOOR_WH", "ST_STARTED", "ST_LAM_DIS", "ST_LAM_CHG", "ST_N"]

# Alarm bits this program owns (sets and clears every cycle); health owns the rest.
ALLOC_ALARMS = int(Alarm.SAFE_ALLOCATION) | int(Alarm.LOAD_SHED)
_SAFE = int(Alarm.SAFE_ALLOCATION)
_SHED = int(Alarm.LOAD_SHED)
# A battery with no usable energy keeps a tiny weight so that a total it must
# deliver (when nothing else can) is still split by the same rule.
WEIGHT_FLOOR_WH = 1e-6

# Indices into the scalar state memory.
ST_STARTED, ST_LAM_DIS, ST_LAM_CHG, ST_N = 0, 1, 2, 4


@njit(nogil=True, cache=True)
def _sorted_by(priority, order, tmp):
    """Keep `order` sorted by priority (stable); O(N) check, bottom-up merge sort when broken."""
    n = order.shape[0]
    ok = True
    for j in range(1, n):
        if priority[order[j]] < priority[order[j - 1]]:
            ok = False
            break
    if ok:
        return
    width = 1
    src, dst = order, tmp
    while width < n:
        for a in range(0, n, 2 * width):
            m = min(a + width, n)
            b = min(a + 2 * width, n)
            i, j, k = a, m, a
            while i < m and j < b:
                if priority[src[j]] < priority[src[i]]:
                    dst[k] = src[j]
                    j += 1
                else:
                    dst[k] = src[i]
                    i += 1
                k += 1
            while i < m:
                dst[k] = src[i]
                i += 1
                k += 1
            while j < b:
                dst[k] = src[j]
                j += 1
                k += 1
        src, dst = dst, src
        width *= 2
    if src is not order:
        for j in range(n):
            order[j] = src[j]


@njit(nogil=True, cache=True)
def _fine(x):
    return x >= 0.0 and x < math.inf  # NaN fails both


@njit(nogil=True, cache=True)
def allocate(online, trip, demand_w, max_dis_w, max_chg_w, link_w, soc, capacity_wh, priority,
             narrowed, derate, use_derate, main_limit_w, dt_s,
             soc_min, soc_max, ramp_w_per_s, hold_s, restore_margin,
             order, held_w, timer_s, state,
             battery_w, served_w, shed_w, bus_w, lo_w, hi_w, alarm,
             use, lo, hi, cap, fa, x, w, blo, bhi, sidx, s_w, s_lo, s_hi, s_x, tmp):
    """Reads the node inputs, `priority`, `lo_w`/`hi_w` (when `narrowed`: protection ran
    first), `derate` (health, when `use_derate`), `battery_w` (last setpoint, for the ramp);
    writes battery_w, served_w, shed_w, bus_w, lo_w, hi_w, the allocation alarm bits.
    Returns main_w. Memory: order, held_w, timer_s, state. The rest is scratch."""
    n = online.shape[0]
    big_m = main_limit_w
    whole_safe = not _fine(big_m)
    # -- 1. limits and the nodes that cannot take part -----------------------------------------
    # One branch-free pass for every node (it vectorises: ~2 ns a node where the branchy version
    # with early exits cost ~11), then a fix-up loop over the rare nodes that cannot take part.
    n_out = 0
    for i in range(n):
        d = demand_w[i]
        g = max_dis_w[i]
        c = max_chg_w[i]
        sc = soc[i]
        lk = link_w[i]
        cw = capacity_wh[i]
        ok = ((online[i] != 0) & (trip[i] == 0) & (d >= 0.0) & (d < math.inf) & (g >= 0.0) & (g < math.inf)
              & (c >= 0.0) & (c < math.inf) & (lk >= 0.0) & (lk < math.inf) & (cw >= 0.0) & (cw < math.inf)
              & (sc >= 0.0) & (sc <= 1.0))
        use[i] = ok
        n_out += not ok
        alarm[i] = alarm[i] & ~ALLOC_ALARMS
        l = -c
        h = g
        if narrowed:
            pl = lo_w[i]
            ph = hi_w[i]
            l = max(l, pl) if pl == pl else l
            h = min(h, ph) if ph == ph else h
        if use_derate:
            f = derate[i]
            f = f if (f >= 0.0) & (f <= 1.0) else 1.0
            l *= f
            h *= f
        # The reserve and the top are the allocator's own rule too (not only protection's): a full
        # battery is not charged, one at its reserve not discharged, a node without capacity is
        # no battery at all.
        l = 0.0 if (sc >= soc_max) | (cw <= 0.0) else l
        h = 0.0 if (sc <= soc_min) | (cw <= 0.0) else h
        lo[i] = min(l, 0.0)
        hi[i] = max(h, 0.0)
    if whole_safe or n_out > 0:
        for i in range(n):
            if use[i] and not whole_safe:
                continue
            use[i] = 0
            lo[i] = 0.0
            hi[i] = 0.0
            d = demand_w[i]
            g = max_dis_w[i]
            battery_w[i] = 0.0
            bus_w[i] = 0.0
            served_w[i] = 0.0
            shed_w[i] = 0.0
            lo_w[i] = 0.0
            hi_w[i] = 0.0
            if online[i] == 0:
                continue
            if trip[i] != 0:  # a tripped node gives and takes nothing
                shed_w[i] = d if _fine(d) else 0.0
            else:  # DESIGN §2: the safe allocation, and an alarm
                ok = _fine(d) and _fine(g)
                b = min(d, g) if ok else 0.0
                battery_w[i] = b
                served_w[i] = b
                shed_w[i] = d - b if _fine(d) else 0.0
                hi_w[i] = g if ok else 0.0
                alarm[i] |= _SAFE
            if shed_w[i] > 0.0:
                alarm[i] |= _SHED
    if whole_safe:
        return 0.0
    # -- 2. shedding by priority class --------------------------------------------------------
    slack = big_m
    need_all = 0.0
    holding = False
    for i in range(n):
        if use[i]:
            slack += min(hi[i], link_w[i])
            d = demand_w[i]
            cp = min(d, hi[i] + link_w[i])
            f0 = min(cp, max(0.0, hi[i] - link_w[i]))
            cap[i] = cp
            fa[i] = f0
            need_all += cp - f0
            if d - cp < min(held_w[i], d) - 1e-9 * (1.0 + d):
                holding = True
    # Fast path (the usual case): everything servable is served and no shed is being held, so the
    # class walk (random access through `order`) would change nothing.
    fast = (not holding) and need_all <= slack + 1e-12 * (1.0 + abs(slack))
    if fast:
        for i in range(n):
            if use[i]:
                served_w[i] = cap[i]
                held_w[i] = demand_w[i] - cap[i]
                timer_s[i] = 0.0
    else:
        _sorted_by(priority, order, tmp)
    blocked = False  # a more critical class holds shed (restore hysteresis)
    k = n if fast else 0
    while k < n:
        p = priority[order[k]]
        e = k
        need = 0.0
        nc = 0
        while e < n and priority[order[e]] == p:
            i = order[e]
            e += 1
            if use[i] == 0:
                continue
            d = demand_w[i]
            cp = min(d, hi[i] + link_w[i])
            f0 = min(cp, max(0.0, hi[i] - link_w[i]))
            cap[i] = cp
            fa[i] = f0
            need += cp - f0
            sidx[nc] = i
            nc += 1
        if need <= slack + 1e-12 * (1.0 + abs(slack)):
            for j in range(nc):
                i = sidx[j]
                x[i] = demand_w[i] - cap[i]  # only the forced shed (link-limited)
        else:
            total = -max(slack, 0.0)
            for j in range(nc):
                i = sidx[j]
                d = demand_w[i]
                total += d - fa[i]
                blo[i] = d - cap[i]
                bhi[i] = d - fa[i]
                w[i] = d
            waterfill_subset(sidx, nc, w, blo, bhi, total, x, s_w, s_lo, s_hi, s_x)
        cost = 0.0
        holds = False
        for j in range(nc):
            i = sidx[j]
            d = demand_w[i]
            s_opt = x[i]
            held = min(held_w[i], d)
            eps = 1e-9 * (1.0 + d)
            if s_opt >= held - eps:
                held = s_opt
                timer_s[i] = 0.0
                s = s_opt
            elif blocked or s_opt > held * (1.0 - restore_margin) - eps:
                timer_s[i] = 0.0
                s = held
                holds = True
            else:
                timer_s[i] += dt_s
                if timer_s[i] >= hold_s - 1e-9:
                    held = s_opt
                    timer_s[i] = 0.0
                    s = s_opt
                else:
                    s = held
                    holds = True
            held_w[i] = held
            r = d - s
            served_w[i] = r
            cost += max(0.0, r - fa[i])
        slack -= cost
        blocked = blocked or holds
        k = e
    # -- 3. main supply first -----------------------------------------------------------------
    up = 0.0
    low = 0.0
    tot_r = 0.0
    for i in range(n):
        if use[i]:
            r = served_w[i]
            up += min(r - lo[i], link_w[i])
            low += max(r - hi[i], -link_w[i])
            tot_r += r
    main_max = min(big_m, max(up, 0.0))
    main_min = min(max(low, 0.0), main_max)
    # -- 4. balance the batteries (with the ramp) ---------------------------------------------
    ramp_on = ramp_w_per_s > 0.0 and state[ST_STARTED] != 0.0
    step = ramp_w_per_s * dt_s
    sl = 0.0
    sh = 0.0
    for i in range(n):
        if use[i] == 0:
            blo[i] = 0.0
            bhi[i] = 0.0
            continue
        r = served_w[i]
        bl = max(lo[i], r - link_w[i])
        bh = min(hi[i], r + link_w[i])
        bl = min(bl, bh)
        blo[i] = bl
        bhi[i] = bh
        if ramp_on and battery_w[i] == battery_w[i]:
            prev = battery_w[i]
            sl += min(max(prev - step, bl), bh)
            sh += max(min(prev + step, bh), bl)
        else:
            sl += bl
            sh += bh
    p_bat = tot_r - main_max
    if ramp_on:
        # The main supply is the slack that keeps the batteries inside their ramp windows: it gives
        # up "main first" as far as the ramp needs (and the links and its limit allow).
        p_bat = min(max(p_bat, sl), sh)
        p_bat = min(max(p_bat, tot_r - main_max), tot_r - main_min)
    main_w = tot_r - p_bat
    for i in range(n):
        if use[i] == 0:
            w[i] = 0.0
        elif p_bat >= 0.0:
            w[i] = max(capacity_wh[i] * max(0.0, soc[i] - soc_min), WEIGHT_FLOOR_WH)
        else:
            w[i] = max(capacity_wh[i] * max(0.0, soc_max - soc[i]), WEIGHT_FLOOR_WH)
    if ramp_on:
        # Narrow to the ramp windows where the total allows it; otherwise use them fully.
        for i in range(n):
            if use[i] == 0 or battery_w[i] != battery_w[i]:
                continue
            prev = battery_w[i]
            bl = blo[i]
            bh = bhi[i]
            rl = min(max(prev - step, bl), bh)
            rh = max(min(prev + step, bh), bl)
            if p_bat > sh:
                blo[i] = rh
            elif p_bat < sl:
                bhi[i] = rl
            else:
                blo[i] = rl
                bhi[i] = rh
    si = ST_LAM_DIS if p_bat >= 0.0 else ST_LAM_CHG
    state[si] = waterfill(w, blo, bhi, n, p_bat, x, state[si])
    state[ST_STARTED] = 1.0
    # -- outputs ------------------------------------------------------------------------------
    for i in range(n):
        if use[i] == 0:
            continue
        b = x[i]
        r = served_w[i]
        d = demand_w[i]
        battery_w[i] = b
        bus_w[i] = r - b
        shed_w[i] = d - r
        lo_w[i] = lo[i]
        hi_w[i] = hi[i]
        if d - r > 1e-9 * (1.0 + d):
            alarm[i] |= _SHED
    return main_w
