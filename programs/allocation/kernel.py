"""The allocation kernel of docs/design.md §2, exact, in O(N) per cycle (plus rare re-sorts).

Stages, each the exact optimum of its own problem given the earlier stages:

1. Limits. Every power and energy input whose magnitude is below the physical
   resolution (RES_W, RES_WH) is zero from here on (see there). A node is usable
   when online, not tripped and its data finite and in range; others get the safe
   allocation (own battery, no bus) or nothing.
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
   [d_i - cap_i, d_i - min(cap_i, free_i)], cap_i = min(d_i, hi_i + L_i, serve_max_i)
   (serve_max_i: a program's cap on the load served, e.g. the energy program's reserve):
   water-filling with weights d_i. Less critical classes then keep only the
   load their own islands cover for free (never at a more critical node's
   expense: lexicographic maximum of served load per class).
   Restore hysteresis: a node's shed rises at once but falls only after it has
   been lower by the margin for hold_s, and never while a more critical class
   is still holding. It holds the allocator's own shed (for power, and what the
   limits force); the part a program's cap (serve_max_i) forces follows the cap
   both ways: the program that cuts decides when the cut ends, and keeps it calm.
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

from vbatt.programs.allocation.waterfill import waterfill_lam, waterfill_subset
from vbatt.programs.codes import Alarm

__all__ = ["allocate", "ALLOC_ALARMS", "WEIGHT_FLOOR_WH", "RES_W", "RES_WH", "ST_STARTED", "ST_LAM_DIS",
           "ST_LAM_CHG", "ST_N"]

# Alarm bits this program owns (sets and clears every cycle); health owns the rest.
ALLOC_ALARMS = int(Alarm.SAFE_ALLOCATION) | int(Alarm.LOAD_SHED)
_SAFE = int(Alarm.SAFE_ALLOCATION)
_SHED = int(Alarm.LOAD_SHED)
# A battery with no usable energy keeps a tiny weight so that a total it must
# deliver (when nothing else can) is still split by the same rule.
WEIGHT_FLOOR_WH = 1e-6
# The physical resolution: a power or energy whose magnitude is below it is zero (a nanowatt is far
# below any meter or converter; no device can be told to move it). Without it, values such as
# 1e-255 W reach the water-fill as weights (w_i = d_i) and slopes so small that a Newton step lands
# ~1e255 away: the exact lam is then out of reach in the iteration budget, and an allocation that
# breaks the bus balance followed. Every input the kernel reads goes through `_res` (the limit pass
# and every later read of the same input), so all paths (scan, solve, benchmarks) see the same zero.
RES_W = 1e-9
RES_WH = 1e-9
# A water-fill's sum off its target by more than this (relative) did not converge: the safety nets
# below then close the gap inside the bounds. Converged ones are within 1e-12 (alloc_waterfill).
NET_REL = 1e-9

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


@njit(nogil=True, cache=True, inline="always")
def _res(x, res):
    """x, or 0 when |x| < res (NaN and inf pass: they are caught as bad data)."""
    return 0.0 if abs(x) < res else x


@njit(nogil=True, cache=True, inline="always")
def _limits_shed(d, hi, lk):
    """The shed the node's own limits force: its demand beyond its battery and its link together. The
    restore hold keeps this (and the shed for power), not what a program's cap forces."""
    return d - min(d, hi + lk)


@njit(nogil=True, cache=True)
def _fine(x):
    return x >= 0.0 and x < math.inf  # NaN fails both


# fastmath reassoc (and nsz): the per-cycle sums may be reordered, so the passes vectorise (10,000
# nodes: 179 -> 60 us); no 'nnan'/'ninf': NaN inputs are detected by comparisons and must stay so.
@njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def allocate(online, trip, demand_w, max_dis_w, max_chg_w, link_w, soc, capacity_wh, priority,
             narrowed, derate, use_derate, serve_max_w, capped, main_limit_w, dt_s,
             soc_min, soc_max, ramp_w_per_s, hold_s, restore_margin,
             order, held_w, timer_s, state,
             battery_w, served_w, shed_w, bus_w, lo_w, hi_w, alarm,
             use, cap, fa, x, w, blo, bhi, sidx, s_w, s_lo, s_hi, s_x, tmp):
    """Reads the node inputs, `priority`, `lo_w`/`hi_w` (when `narrowed`: protection ran
    first), `derate` (health, when `use_derate`), `serve_max_w` (a program's cap on the load
    served, e.g. the energy program's, when `capped`), `battery_w` (last setpoint, for the ramp);
    writes battery_w, served_w, shed_w, bus_w, lo_w, hi_w, the allocation alarm bits.
    Returns main_w. Memory: order, held_w, timer_s, state. The rest is scratch.

    The usual cycle (nothing shed beyond what the links force, no shed held) makes three
    passes over the nodes plus two or three of the water-fill: at 100,000 nodes the arrays no
    longer fit the cache and each pass costs its memory traffic, so stages share passes."""
    n = online.shape[0]
    big_m = _res(main_limit_w, RES_W)
    whole_safe = not _fine(big_m)
    # -- 1. limits, and the sums of stages 2 and 3 for the fast path, in one pass ------------------
    # Branch-free (selects, not jumps: ~2 ns a node where the branchy version with early exits
    # cost ~11); the rare nodes that cannot take part are fixed up afterwards. lo_w/hi_w hold the
    # limits from here on. served_w gets the fast path's answer (the class walk rewrites it).
    n_out = 0
    slack = big_m
    need_all = 0.0
    holding = False
    up = 0.0
    low = 0.0
    tot_r = 0.0
    for i in range(n):
        d = _res(demand_w[i], RES_W)
        g = _res(max_dis_w[i], RES_W)
        c = _res(max_chg_w[i], RES_W)
        sc = soc[i]
        lk = _res(link_w[i], RES_W)
        cw = _res(capacity_wh[i], RES_WH)
        ok = ((online[i] != 0) & (trip[i] == 0) & (d >= 0.0) & (d < math.inf) & (g >= 0.0) & (g < math.inf)
              & (c >= 0.0) & (c < math.inf) & (lk >= 0.0) & (lk < math.inf) & (cw >= 0.0) & (cw < math.inf)
              & (sc >= 0.0) & (sc <= 1.0))
        use[i] = ok
        n_out += not ok
        alarm[i] = alarm[i] & ~ALLOC_ALARMS
        l = -c
        h = g
        if narrowed:
            pl = _res(lo_w[i], RES_W)
            ph = _res(hi_w[i], RES_W)
            l = max(l, pl) if pl == pl else l
            h = min(h, ph) if ph == ph else h
        if use_derate:
            f = derate[i]
            f = f if (f >= 0.0) & (f <= 1.0) else 1.0
            l = _res(l * f, RES_W)
            h = _res(h * f, RES_W)
        # The reserve and the top are the allocator's own rule too (not only protection's): a full
        # battery is not charged, one at its reserve not discharged, a node without capacity is
        # no battery at all.
        l = min(0.0 if (sc >= soc_max) | (cw <= 0.0) else l, 0.0)
        h = max(0.0 if (sc <= soc_min) | (cw <= 0.0) else h, 0.0)
        lo_w[i] = l
        hi_w[i] = h
        # Stage 2's sums (see there), and stage 3's for r = cp. A program's cap on the served load
        # (NaN: none) narrows what is servable, like the limits do.
        sm = serve_max_w[i] if capped else math.inf
        cp = min(d, h + lk, max(sm, 0.0) if sm == sm else math.inf)
        f0 = min(cp, max(0.0, h - lk))
        served_w[i] = cp
        slack += min(h, lk) if ok else 0.0
        need_all += cp - f0 if ok else 0.0
        # a shed of its own held (a program's cap may cover it now, but not for the hold's timer)
        holding |= ok & (_limits_shed(d, h, lk) < min(held_w[i], d) - 1e-9 * (1.0 + d))
        up += min(cp - l, lk) if ok else 0.0
        low += max(cp - h, -lk) if ok else 0.0
        tot_r += cp if ok else 0.0
    if whole_safe or n_out > 0:
        for i in range(n):
            if use[i] and not whole_safe:
                continue
            use[i] = 0
            d = _res(demand_w[i], RES_W)
            g = _res(max_dis_w[i], RES_W)
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
            else:  # docs/design.md §2.6: the safe allocation, and an alarm
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
    # Serving r_i costs max(0, r_i - fa_i) of the budget `slack`; cap_i is the most a node can
    # be served. Fast path (the usual case): everything servable is served and no shed is being
    # held, so the class walk (random access through `order`) would change nothing.
    fast = (not holding) and need_all <= slack + 1e-12 * (1.0 + abs(slack))
    if not fast:
        _sorted_by(priority, order, tmp)
        blocked = False  # a more critical class holds shed (restore hysteresis)
        k = 0
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
                d = _res(demand_w[i], RES_W)
                lk = _res(link_w[i], RES_W)
                sm = serve_max_w[i] if capped else math.inf
                cp = min(d, hi_w[i] + lk, max(sm, 0.0) if sm == sm else math.inf)
                f0 = min(cp, max(0.0, hi_w[i] - lk))
                cap[i] = cp
                fa[i] = f0
                need += cp - f0
                sidx[nc] = i
                nc += 1
            if need <= slack + 1e-12 * (1.0 + abs(slack)):
                for j in range(nc):
                    i = sidx[j]
                    x[i] = _res(demand_w[i], RES_W) - cap[i]  # only the forced shed (link-limited)
            else:
                total = -max(slack, 0.0)
                for j in range(nc):
                    i = sidx[j]
                    d = _res(demand_w[i], RES_W)
                    total += d - fa[i]
                    blo[i] = d - cap[i]
                    bhi[i] = d - fa[i]
                    w[i] = d
                waterfill_subset(sidx, nc, w, blo, bhi, total, x, s_w, s_lo, s_hi, s_x)
                # Safety net: the class must cost exactly the budget left. sum blo < total <= sum bhi
                # here, so what the water-fill missed (only if it ran out of steps: a converged one
                # is within 1e-12, far inside the threshold) fits inside the bounds.
                sx = 0.0
                for j in range(nc):
                    sx += x[sidx[j]]
                gap = total - sx
                if abs(gap) > NET_REL * (1.0 + abs(total)):
                    for j in range(nc):
                        i = sidx[j]
                        v = x[i]
                        nv = min(bhi[i], v + gap) if gap > 0.0 else max(blo[i], v + gap)
                        gap -= nv - v
                        x[i] = nv
            cost = 0.0
            holds = False
            for j in range(nc):
                i = sidx[j]
                d = _res(demand_w[i], RES_W)
                s_opt = x[i]
                held = min(held_w[i], d)
                eps = 1e-9 * (1.0 + d)
                # The hold keeps the allocator's own shed (for power, and what the limits force), not the
                # part a program's cap forces: that program decides when its cut ends, and keeps it calm
                # itself (the energy program restores a peak-shaved class at a ramp; an outage's cut is
                # latched). Held here too, a cut the program had lifted stayed shed for the hold while the
                # program counted on the load served (peak.yaml: 1 kW for 300 s past the evening's peak).
                forced = _limits_shed(d, hi_w[i], _res(link_w[i], RES_W))
                own = forced if (cap[i] < d - forced - eps) & (s_opt <= d - cap[i] + eps) else s_opt
                if own >= held - eps:
                    held = own
                    timer_s[i] = 0.0
                    s = s_opt
                elif blocked or own > held * (1.0 - restore_margin) - eps:
                    timer_s[i] = 0.0
                    s = max(s_opt, held)
                    holds |= held > s_opt + eps
                else:
                    timer_s[i] += dt_s
                    if timer_s[i] >= hold_s - 1e-9:
                        held = own
                        timer_s[i] = 0.0
                        s = s_opt
                    else:
                        s = max(s_opt, held)
                        holds |= held > s_opt + eps
                held_w[i] = held
                r = d - s
                served_w[i] = r
                cost += max(0.0, r - fa[i])
            slack -= cost
            blocked = blocked or holds
            k = e
        # -- 3. main supply first (the fast path summed it in pass 1) -------------------------
        up = 0.0
        low = 0.0
        tot_r = 0.0
        for i in range(n):
            if use[i]:
                r = served_w[i]
                lk = _res(link_w[i], RES_W)
                up += min(r - lo_w[i], lk)
                low += max(r - hi_w[i], -lk)
                tot_r += r
    main_max = min(big_m, max(up, 0.0))
    main_min = min(max(low, 0.0), main_max)
    # -- 4. balance the batteries (with the ramp) ---------------------------------------------
    ramp_on = ramp_w_per_s > 0.0 and state[ST_STARTED] != 0.0
    step = ramp_w_per_s * dt_s
    p_bat = tot_r - main_max
    dis = p_bat >= 0.0  # the ramp below may flip it: then the weights are made again
    sl = 0.0
    sh = 0.0
    sw = 0.0
    for i in range(n):
        if use[i] == 0:
            blo[i] = 0.0
            bhi[i] = 0.0
            w[i] = 0.0
            continue
        r = served_w[i]
        lk = _res(link_w[i], RES_W)
        if fast:  # the limits' shed only: a program's cap is not held (see the class walk)
            d = _res(demand_w[i], RES_W)
            held_w[i] = _limits_shed(d, hi_w[i], lk)
            timer_s[i] = 0.0
        bh = min(hi_w[i], r + lk)
        bl = min(max(lo_w[i], r - lk), bh)
        blo[i] = bl
        bhi[i] = bh
        prev = battery_w[i]
        if ramp_on and prev == prev:
            sl += min(max(prev - step, bl), bh)
            sh += max(min(prev + step, bh), bl)
        else:
            sl += bl
            sh += bh
        room = _res(capacity_wh[i], RES_WH) * max(0.0, soc[i] - soc_min if dis else soc_max - soc[i])
        wi = max(room, WEIGHT_FLOOR_WH)
        w[i] = wi
        sw += wi
    slo = sl
    shi = sh
    if ramp_on:
        # The main supply is the slack that keeps the batteries inside their ramp windows: it gives
        # up "main first" as far as the ramp needs (and the links and its limit allow).
        p_bat = min(max(p_bat, sl), sh)
        p_bat = min(max(p_bat, tot_r - main_max), tot_r - main_min)
        if (p_bat >= 0.0) != dis:
            dis = p_bat >= 0.0
            sw = 0.0
            for i in range(n):
                if use[i]:
                    room = _res(capacity_wh[i], RES_WH) * max(0.0, soc[i] - soc_min if dis else soc_max - soc[i])
                    w[i] = max(room, WEIGHT_FLOOR_WH)
                    sw += w[i]
        # Narrow to the ramp windows where the total allows it; otherwise use them fully.
        slo = 0.0
        shi = 0.0
        for i in range(n):
            bl = blo[i]
            bh = bhi[i]
            prev = battery_w[i]
            if use[i] != 0 and prev == prev:
                rl = min(max(prev - step, bl), bh)
                rh = max(min(prev + step, bh), bl)
                if p_bat > sh:
                    bl = rh
                elif p_bat < sl:
                    bh = rl
                else:
                    bl = rl
                    bh = rh
                blo[i] = bl
                bhi[i] = bh
            slo += bl
            shi += bh
    main_w = tot_r - p_bat
    si = ST_LAM_DIS if dis else ST_LAM_CHG
    lam = waterfill_lam(w, blo, bhi, n, p_bat, state[si], slo, shi, sw)
    state[si] = lam
    state[ST_STARTED] = 1.0
    # -- outputs ------------------------------------------------------------------------------
    sb = 0.0
    for i in range(n):
        if use[i] == 0:
            continue
        bl = blo[i]
        bh = bhi[i]
        b = min(bh, max(bl, lam * w[i])) if abs(lam) < math.inf else (bh if lam > 0.0 else bl)
        r = served_w[i]
        d = _res(demand_w[i], RES_W)
        battery_w[i] = b
        bus_w[i] = r - b
        shed_w[i] = d - r
        sb += b
        if d - r > 1e-9 * (1.0 + d):
            alarm[i] |= _SHED
    # Safety net: the bus must carry exactly main_w. An exact water-fill leaves sb = p_bat to 1e-12,
    # and then this changes nothing; only one that ran out of steps is moved, inside the boxes.
    gap = p_bat - sb
    if abs(gap) > NET_REL * (1.0 + abs(slo) + abs(shi)):
        for i in range(n):
            if use[i] == 0:
                continue
            b = battery_w[i]
            nb = min(bhi[i], b + gap) if gap > 0.0 else max(blo[i], b + gap)
            gap -= nb - b
            battery_w[i] = nb
            bus_w[i] = served_w[i] - nb
    return main_w
