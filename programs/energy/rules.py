"""The class rules of docs/design.md §2b over K priority classes, O(K) per cycle (O(K^2) for the runtimes).

Per class c (index 0 = most critical): demand now `dnow` (W, drives this cycle), demand for the
reserve `dres` (W, the forecast over the horizon), target `target_s`, battery clock `clock_s`
(time the class has depended on the batteries in this shortage), `latched` (shed for energy in
this shortage: stays shed until it is over). Remaining target tau_c = max(0, T_c - clock_c).

Reserve of class c: R_c = sum over k <= c, not latched, of dres_k * tau_k. A class draws on
the batteries only with energy above its threshold: R_{c-1} while it rides through (the main
supply carries none of it) inside its target; R_K (every remaining target) beyond its target or
while it is peak-shaved (the main supply carries part of it, and may still fail). That one rule
gives lazy shedding least critical first (its threshold is the highest), peak shaving only above
the whole reserve, the power order beyond the targets (one threshold for all of them), and the most
critical targets protected first when not all are reachable. Energy is in Wh, power in W, time in s.
"""

from __future__ import annotations

import math

from numba import njit

__all__ = ["decide", "power_runtime", "probe_next", "ride_through", "PROBE_FLOOR_S", "ST_OK_S", "ST_E_WH", "ST_R_WH",
           "ST_N_CLS", "ST_SHORT", "ST_POS", "ST_STARTED", "ST_CAPPED", "ST_SLACK_W", "ST_RISE_WH", "ST_TREND_WH",
           "ST_SURPRISE_WH", "ST_SLOPE_WH", "ST_LAST_RISE_WH", "ST_SETTLE", "ST_N", "settle", "SETTLE_SWEEPS"]

# Indices into the scalar state memory.
(ST_OK_S, ST_E_WH, ST_R_WH, ST_N_CLS, ST_SHORT, ST_POS, ST_STARTED, ST_CAPPED, ST_SLACK_W, ST_RISE_WH, ST_TREND_WH,
 ST_SURPRISE_WH, ST_SLOPE_WH, ST_LAST_RISE_WH, ST_SETTLE, ST_N) = range(16)

_EPS = 1e-9
LOOK_MAX = 120  # cycles the look-ahead of the reserve's rise covers at most
RISE_SURPRISES = 3.0  # a peak-shaved class stops this many of the reserve's late surprises above it
POWER_TOL = 0.01  # a class is latched for power when the export it lacks exceeds this share of its need
# The power runtime's probe is never nearer than this (s), and an estimate below it is 0: "the batteries
# cannot carry the class even now", an answer, re-checked by a probe here every sweep. A probe at m = 0 means
# "none" (the estimate went back to "no bound" and fell again, sweep after sweep: the class's runtime and
# reserve flipped), and a root below it is no time a class can be served (the tree's sums gave 1e-255 s
# where the flat controller's gave 0).
PROBE_FLOOR_S = 0.01
# After a cold start the power runtime's estimates take a few sweeps to stand still (power_runtime: a Newton
# step a sweep from "no bound"); until then, or at most this many sweeps, the energy rule cuts no class (settle).
SETTLE_SWEEPS = 10
SETTLE_TOL = 0.01


@njit(nogil=True, cache=True)
def ride_through(k_n, dres, tau0, latched, e_wh, rt, tau, on, loc):
    """Runtime per class if the main supply failed now (every clock runs), under the rule of
    `decide` in continuous time: event by event (a remaining target runs out, the energy left
    reaches a class's threshold, which sheds it, or a class's first node runs out of its own energy
    at loc[c], which sheds it too). Writes rt (s; inf = never shed, 0 = already shed)."""
    for c in range(k_n):
        tau[c] = tau0[c]
        on[c] = latched[c] == 0
        rt[c] = math.inf if on[c] else 0.0
    t = 0.0
    e = e_wh
    for _ in range(2 * k_n + 2):
        # Shed at this instant, least critical first (its threshold is the highest), until stable.
        while True:
            r_all = 0.0
            for c in range(k_n):
                if on[c] and tau[c] > 0.0:
                    r_all += dres[c] * tau[c] / 3600.0
            pre = 0.0
            cut = -1
            gone = False  # a more critical class is shed: beyond its target a class yields (the power order)
            for c in range(k_n):
                thr = pre if tau[c] > 0.0 else r_all
                if on[c] and dres[c] > 0.0 and (e <= thr + _EPS * (1.0 + e) or t >= loc[c] - _EPS * (1.0 + t)
                                                or (gone and tau[c] <= 0.0)):
                    cut = c
                if on[c] and tau[c] > 0.0:
                    pre += dres[c] * tau[c] / 3600.0
                gone |= not on[c] and dres[c] > 0.0
            if cut < 0:
                break
            on[cut] = False
            rt[cut] = t
        drain = 0.0
        r_all = 0.0
        r_rate = 0.0
        for c in range(k_n):
            if on[c]:
                drain += dres[c]
                if tau[c] > 0.0:
                    r_all += dres[c] * tau[c] / 3600.0
                    r_rate += dres[c]
        if drain <= 0.0:
            break
        # The next event: a remaining target runs out, or e meets a threshold.
        s = math.inf
        pre = 0.0
        pre_rate = 0.0
        for c in range(k_n):
            if on[c] and tau[c] > 0.0:
                s = min(s, tau[c])
            if on[c] and dres[c] > 0.0:
                s = min(s, max(0.0, loc[c] - t))
            if tau[c] > 0.0:
                thr, thr_rate = pre, pre_rate
            else:
                thr, thr_rate = r_all, r_rate
            slope = drain - thr_rate  # W: how fast e approaches the threshold
            if on[c] and slope > 0.0:
                s = min(s, max(0.0, e - thr) * 3600.0 / slope)
            if on[c] and tau[c] > 0.0:
                pre += dres[c] * tau[c] / 3600.0
                pre_rate += dres[c]
        if s == math.inf:
            break
        e -= drain * s / 3600.0
        for c in range(k_n):
            if on[c] and tau[c] > 0.0:
                tau[c] = max(0.0, tau[c] - s)
        t += s


@njit(nogil=True, cache=True)
def _lookahead(r1, slope, rho):
    """Energy (Wh) the reserve will rise beyond what cutting the class whole can recharge (rho Wh a
    cycle, main's spare; the batteries' charge limits are not known here), over the coming cycles: the
    expected rises after this one, r1 + slope, r1 + 2 slope, ... while above rho (slope <= 0)."""
    acc = 0.0
    best = 0.0
    r = r1
    for _ in range(LOOK_MAX):
        r += slope
        if r <= rho:
            break
        acc += r - rho
        best = max(best, acc)
    return best


@njit(nogil=True, cache=True)
def power_runtime(k_n, probe_s, pv, hz_s, dres, latched, local_s, h_s, power_s):
    """After a sweep: per class c, the time power_s[c] (s from now, inf: at least the horizon h_s and its
    local runtime) the batteries can carry classes 0..c whole at their power and link limits: the more
    critical classes for their remaining targets (hz_s), c throughout, the less critical shed. The largest
    m with A(m) >= sum_{j < c} D_j min(tau_j, m) + D_c m, the condition the class rules check at the
    targets (a Hall condition on the prefix [0, m] of a falling demand profile, kernel._horizons) read as
    a time: beyond it the class cannot be served whole, whatever the drain (the relaxed reference LP
    cannot either), so its reserve, its runtime and its nodes' own-need locks count no further (energy
    held for it beyond that is stranded for it by power; docs/energy.md).
    pv[0, c] is A at probe_s[c] (the last estimate) and pv[1, c] its slope there (from the left): a Newton
    step on g(m) = A(m) - demand(m). A is concave, so from above the root the step stays above it (the
    reserve errs on the side of more), converging in a few sweeps; from below (the condition holds at the
    estimate) it steps out, at most to the horizon, and comes back if that was too far. An estimate below
    PROBE_FLOOR_S is 0 (the class cannot be carried even now), an answer that the next probe, at the floor
    (probe_next), keeps or lifts; m = 0 is no probe (inf)."""
    for c in range(k_n):
        m = probe_s[c]
        if latched[c] != 0 or m <= 0.0:
            power_s[c] = math.inf
            continue
        lim = min(h_s, local_s[c])
        dem = dres[c] * m / 3600.0
        dem_w = dres[c]
        for j in range(c):
            if latched[j] == 0 and hz_s[j] > 0.0:
                dem += dres[j] * min(hz_s[j], m) / 3600.0
                dem_w += dres[j] if hz_s[j] >= m else 0.0
        a = pv[0, c]
        gap = a - dem  # Wh
        slope = (pv[1, c] - dem_w) / 3600.0  # Wh/s
        if gap >= -1e-9 * (1.0 + a):
            nxt = m + gap / -slope if slope < 0.0 else math.inf
            power_s[c] = math.inf if m >= lim * (1.0 - 1e-12) or nxt >= lim else nxt
        else:
            # Below a more critical class's horizon the demand rises faster than its slope here says (the
            # demand is concave, not linear): the step stops there, and the next sweep goes on from it.
            kink = 0.0
            for j in range(c):
                if latched[j] == 0 and hz_s[j] < m:
                    kink = max(kink, hz_s[j])
            nxt = max(kink, m + gap / -slope if slope < 0.0 else 0.5 * m)
            power_s[c] = nxt if nxt >= PROBE_FLOOR_S else 0.0


@njit(nogil=True, cache=True)
def settle(k_n, latched, before_s, after_s, pace_s, state):
    """After a sweep's power runtime (before_s: the estimates the class rules used, after_s: the new ones, a
    sweep of pace_s later): state[ST_SETTLE] counts the sweeps since a cold start until every class's estimate
    stands still (a time from now, so it may fall by the sweep; a Newton step moves it by more than that and
    SETTLE_TOL), then holds SETTLE_SWEEPS for good. Until then `decide` cuts no class for energy: with the
    estimates still at "no bound" a class's reserve counted its whole remaining target, which its power could
    not carry, and a class cut stays shed (a controller started in an outage: LP-gap `0.5 2 0.5 2 --seed 5`
    fleet 18 shed class 3 in its first cycle for class 2's reserve, which the batteries could never deliver;
    the reference serves class 3 720 s). With the main supply there at a start, it is long settled when an
    outage comes."""
    if state[ST_SETTLE] >= SETTLE_SWEEPS:
        return
    still = True  # "no bound" at a start and still none: settled at once
    for c in range(k_n):
        a, b = before_s[c], after_s[c]
        still &= latched[c] != 0 or a == b or abs(b - a) <= pace_s + SETTLE_TOL * (1.0 + min(a, b))
    state[ST_SETTLE] = SETTLE_SWEEPS if still else state[ST_SETTLE] + 1.0


@njit(nogil=True, cache=True)
def probe_next(power_s, h_s, local_s):
    """Where the next sweep probes a class's power runtime (rules.power_runtime; the caller asks none, 0,
    for a class latched or with the rule off): the estimate, at most the horizon and the class's local
    runtime, and never below PROBE_FLOOR_S: an estimate of 0 is checked there, so that it stays 0 while
    the batteries cannot carry the class and rises once they can (the probe's A grows above the demand)."""
    return max(PROBE_FLOOR_S, min(power_s, h_s, local_s))


@njit(nogil=True, cache=True)
def _short_of_power(have_w, ask_w):
    """The power a class gets lacks more than POWER_TOL of what it asks (beyond a tolerance only: the
    class sums are up to two sweeps old)."""
    return have_w < ask_w - POWER_TOL * (1.0 + ask_w)


@njit(nogil=True, cache=True)
def _others_served(k_n, c, latched, frac, dnow):
    """Whether a class other than c is still served (not latched, a share and a demand)."""
    for j in range(k_n):
        if j != c and latched[j] == 0 and frac[j] > 0.0 and dnow[j] > 0.0:
            return True
    return False


@njit(nogil=True, cache=True)
def decide(k_n, dnow, dres, e_wh, main_limit_w, dt_s, hold_s, target_s, clock_s, latched, state,
           local_s, power_s, a_wh, hz_s, pneed, tau, reserve_wh, frac, rt, reachable, s_tau, s_on, cum_wh, tot_wh,
           restore_s, pace_s, prev_frac, stranded_w):
    """One cycle of the class rules. Writes frac[c]: the fraction of its demand class c may be
    served (what the main supply gives it in priority order, plus the battery energy it may draw
    this cycle), reserve_wh, the runtimes (of the pool, and at most local_s: the first node of
    the class whose own battery runs out) and `reachable`. dnow/dres are the pooled demand (the
    part the links can carry). Returns the number of classes whose target is unreachable.
    restore_s > 0: a peak-shaved class's cut is calm (see below; prev_frac: the shares of the last
    cycle, pace_s: one sweep, the time the reserve's rise in `state` is measured over); 0: off.
    stranded_w: per class, the part of its pooled demand its nodes serve from stranded energy (kernel
    _node_values): that draw takes nothing the other classes' reserve could get, so the energy and the power
    checks (the pooled energy, the deliverable energy within each horizon) count the rest of its draw only."""
    # Battery clocks: class c rides through on the batteries while the main supply can carry none
    # of it (it serves the most critical first); a class it carries in part is being peak-shaved,
    # and main may still fail: its target stays whole. All reset once main has covered everything
    # for hold_s.
    cum = 0.0
    short = False
    for c in range(k_n):
        if dnow[c] > 0.0 and main_limit_w <= cum + _EPS * (1.0 + cum):
            clock_s[c] += dt_s
        cum += dnow[c]
        short |= main_limit_w < cum - _EPS * (1.0 + cum)
    state[ST_SHORT] = 1.0 if short else 0.0
    if short:
        state[ST_OK_S] = 0.0
    else:
        state[ST_OK_S] += dt_s
        if state[ST_OK_S] >= hold_s:
            for c in range(k_n):
                clock_s[c] = 0.0
                latched[c] = 0
    r_all = 0.0
    for c in range(k_n):
        # The reserve of a class counts its remaining target only as far as its nodes' own energy
        # lasts: the first node with a load beyond its link to run out sheds the class (local_s),
        # so energy held for it beyond that is stranded for one class and free for the others.
        # So does its power (power_runtime): the batteries cannot carry it whole beyond power_s. At least
        # this cycle: a class inside its target stays riding through (the power pass below latches it when
        # the export cannot carry it whole), not beyond its target by an estimate.
        tau[c] = min(max(0.0, target_s[c] - clock_s[c]), local_s[c], max(power_s[c], dt_s))
        if latched[c] == 0:
            r_all += dres[c] * tau[c] / 3600.0
    # Power: energy is not enough, it must be deliverable in time. a_wh[c, k] = A_c(hz_k), the energy
    # the batteries can deliver within hz_k (~ tau_k) at their power limits, sum min(e_i, p_i hz_k).
    # A reserve (a demand profile falling at each tau_j) can be served iff for every horizon
    # m = tau_k: A(m) >= sum_j D_j min(tau_j, m) (for a falling demand the prefix [0, m] is the
    # tightest of all sets of time: A is concave, so its breakpoints suffice). cum_wh[k]: that sum
    # over the classes before c; tot_wh[k]: over all.
    for k in range(k_n):
        cum_wh[k] = 0.0
        t = 0.0
        for j in range(k_n):
            if latched[j] == 0:
                t += dres[j] * min(tau[j], tau[k]) / 3600.0
        tot_wh[k] = t
    # This cycle: main supply in priority order, then battery energy above each class's threshold.
    m_left = main_limit_w
    e_left = e_wh
    pre = 0.0
    gone = False  # a more critical class is shed for energy in this shortage
    for c in range(k_n):
        d = dnow[c]
        spare_w = max(m_left, 0.0)  # main's spare if this class and every less critical one were cut
        m = min(max(m_left, 0.0), d)
        m_left -= m
        need_wh = (d - m) * dt_s / 3600.0
        a = 1.0
        if need_wh > 0.0:
            # Riding through (main carries none of it) inside its target: above the reserve of the
            # more critical classes. Peak shaving, or beyond its target: above the whole reserve.
            riding = tau[c] > 0.0 and m <= 0.0
            # Peak shaving (the main supply is there and the class is not riding through): the draw
            # decided now ends at the next cycle, when the reserve may have risen with the demand
            # forecast (kernel.py _reserve_rise). So it stops above the reserve plus its expected
            # rise plus twice the largest surprise of late; below the reserve plus its expected rise
            # it gives back what main serves it (the reserve first: main's spare recharges it). The
            # same for every class beyond its target, whether main still carries part of it or not
            # (else a less critical class would draw deeper than a more critical one).
            shaved = main_limit_w > 0.0 and not riding
            calm = shaved and restore_s > 0.0
            thr = pre if riding else r_all
            # (one surprise above the expected rise: a reserve that falls on average may still rise in the
            # next cycle; a fifth of peak.yaml in 60 s steps: -3.2 Wh with the expected rise alone)
            thr_back = thr + max(0.0, state[ST_RISE_WH] + state[ST_SURPRISE_WH]) if shaved else thr
            soft = thr
            fall_wh = 0.0
            if shaved:
                # ... and above what the reserve will still rise beyond what cutting the class whole can
                # recharge (main's spare): a reserve rising faster than that must be met before it
                # rises (on the small peak instances, seed 12: class 3 cut to 0 and E - R still falling
                # for three cycles, -0.1 Wh). Only a slowing rise is extrapolated (slope <= 0).
                look = _lookahead(state[ST_RISE_WH], min(0.0, state[ST_SLOPE_WH]), spare_w * dt_s / 3600.0)
                thr += max(0.0, state[ST_RISE_WH] + RISE_SURPRISES * state[ST_SURPRISE_WH]) + look
                # Calm (below), the draw aims at `soft`: above this cycle's bound by the reserve's fall a
                # cycle (the bound does not count on the fall: just in time, the cut drew each cycle what
                # the reserve fell in the last) and by a surprise while the draw is spread over more than
                # a cycle, so that the bound binds only where a sweep's noise exceeds a surprise.
                fall_wh = max(0.0, -state[ST_TREND_WH] * dt_s / pace_s)
                soft = thr + fall_wh + state[ST_SURPRISE_WH] * (1.0 - min(1.0, dt_s / max(restore_s, 1e-9)))
            avail = e_left - thr
            drawn = e_wh - e_left
            p_avail = math.inf
            # What the classes before it draw this cycle comes off the margin at every horizon of the
            # remaining targets it protects. A class beyond its target takes it off once: it came off
            # per class with target left, and shed such a class early by that many cycles' draws (one
            # fleet of the LP gap: class 2, target 0, shed at 385 s against the reference's 420 s;
            # class 1 then ran beyond its target on that energy, 790 s against 720 s). A class riding
            # through keeps it per horizon: taken once, one fleet of the binding test ran class 2 (an
            # unreachable target) 530 s against the reference's 480 s, and classes 0 and 1 lost their
            # power 5 s before their 600 s targets (the check assumes the batteries drained in the
            # best order, the allocation's balancing does not; docs/energy.md).
            # A horizon that ends within two sweeps is left to the power pass below: the table is up to a sweep
            # old, and what the more critical class still needs there is its power now, which the pass gives it
            # first. Checked, the draws taken off the margin per horizon (above) outgrew the margin in the last
            # seconds of a more critical class's target, and a class inside its own was latched there for good
            # (LP-gap `0.5 2 0.5 2 --seed 11` fleet 7: class 2 at 598 s, 2 s before class 0's 600 s target ended;
            # the reference serves it 900 s).
            for k in range(c if riding else k_n):
                if latched[k] == 0 and tau[k] > 2.0 * pace_s and hz_s[k] > 0.0:
                    p_avail = min(p_avail, (a_wh[c, k] - cum_wh[k]) if riding else (a_wh[k_n, k] - tot_wh[k]))
                    p_avail -= drawn if riding else 0.0
            p_avail -= 0.0 if riding else drawn
            # Below its threshold a peak-shaved class gives back part of what main serves it, so that
            # main's spare recharges the reserve (the reserve first; the energy rule only: a reserve
            # short of power, not of energy, is not mended by charging).
            # What its nodes serve from their stranded energy is no one else's: it comes off neither margin.
            need_pw = max(0.0, need_wh - min(stranded_w[c], d - m) * dt_s / 3600.0)
            share = math.inf if need_pw <= 0.0 else min(avail, p_avail) / need_pw
            a = 0.0 if latched[c] != 0 else min(1.0, max(0.0, share))
            # no cut for energy on estimates not yet settled (settle): the class is served whole meanwhile
            a = 1.0 if latched[c] == 0 and not shaved and state[ST_SETTLE] < SETTLE_SWEEPS else a
            if shaved and e_left < thr_back:
                a = max(-m / (d - m), (e_left - thr_back) / need_wh)
            elif calm:
                # A peak-shaved class's cut does not flap (docs/design.md §2: no flapping; the allocator
                # leaves a program's cut to the program). Just in time, the cut followed the reserve's
                # noise of each sweep (peak.yaml: a share moving by more than 5 % of the class in 59 cycles
                # a day, 375 reversals). So the class draws the reserve's smoothed fall plus what lies above
                # `soft`, spread over restore_s (the draw moves with the energy, not with one sweep's
                # noise; a watt-hour shed earlier in a deficit is one drawn later), and its share comes back
                # at most by its demand over restore_s (no burst after a cut).
                draw_wh = fall_wh + (e_left - soft) * min(1.0, dt_s / restore_s)
                a = min(a, max(0.0, draw_wh / need_wh))
                a = min(a, ((prev_frac[c] + dt_s / restore_s) * d - m) / (d - m))
            elif not shaved and local_s[c] <= dt_s:
                # A node of the class runs out of its own energy (its load beyond its link) within this
                # cycle: the class is no longer served whole, so it is cut now, whole, and its energy
                # extends the others (as the whole-step reference: a class once not whole stays shed).
                a = 0.0
            elif not shaved and tau[c] <= 0.0 and gone:
                # Beyond its target a class runs only in the power order of §2: never while a more
                # critical class is shed (it would spend energy and power on a less critical load
                # while a more critical one is dark; the whole-step reference holds the same).
                a = 0.0
            # Cut for energy while it rides on the batteries: this cycle's part, then shed until the
            # shortage is over (no flapping: a load restored for minutes and shed again is worth
            # little, and the energy extends the classes still served). A peak-shaved class is cut
            # per cycle, just in time (main may carry it again as its peak passes), and so is a cut
            # for power below.
            if a < 1.0 - 1e-9 and not shaved:
                latched[c] = 1
                # Its ride-through ends with this cycle, whole or in part: a part served now adds nothing
                # to its time and is taken from the classes still served, whose time is still counted
                # (a class beyond its target on a trickle: 0.8 Wh of one 5 s cycle in part was 130 s of
                # class 0 on the discharge-only LP-gap fleet 1). So nothing, while another class is served.
                a = 0.0 if _others_served(k_n, c, latched, frac, dnow) else a
            e_left -= max(a, 0.0) * need_wh  # a recharge is not energy this cycle
        frac[c] = (m + a * (d - m)) / d if d > 0.0 else 1.0
        gone |= latched[c] != 0 and d > 0.0
        if latched[c] == 0:
            pre += dres[c] * tau[c] / 3600.0
            for k in range(k_n):
                cum_wh[k] += dres[c] * min(tau[c], tau[k]) / 3600.0
        reserve_wh[c] = pre
    # Power now, targets first: when the batteries' export (and the main supply) cannot carry every
    # class, the allocator sheds least critical first; a class beyond its target must yield to one
    # inside it, so it gets only the power the classes inside their targets leave (a cap this cycle,
    # not a latch: power comes back when a class is shed).
    # A class riding through whose share the batteries' export cannot carry after the more critical
    # classes inside their targets is served in part by the allocator: no longer whole, so it is shed
    # and latched as a class cut for energy is (served in part it would spend, for minutes of a partial
    # load, energy and export the more critical classes need later; the whole-step reference holds the
    # same). Beyond a tolerance only: the sums are up to two sweeps old.
    p_left = main_limit_w + state[ST_SLACK_W]
    m_left = main_limit_w
    dark = k_n  # the most critical class latched for power here
    for c in range(k_n):
        m = min(max(m_left, 0.0), dnow[c])
        m_left -= m
        if tau[c] > 0.0 and latched[c] == 0:
            ask = frac[c] * pneed[c]
            if m <= 0.0 and ask > 0.0 and _short_of_power(p_left, ask):
                frac[c] = 0.0
                latched[c] = 1
                dark = min(dark, c)
                continue
            p_left -= ask
    for c in range(k_n):
        if not (tau[c] > 0.0 and latched[c] == 0) and pneed[c] > 0.0 and frac[c] > 0.0:
            f_p = min(frac[c], max(0.0, p_left) / pneed[c])
            # Beyond its target, not while a more critical class went dark just now (§2's power order, as
            # `gone` above from the next cycle on: binding-test seed 39 served class 1, beyond its target,
            # at 62 % in the cycle class 0 was latched for power).
            f_p = 0.0 if tau[c] <= 0.0 and c > dark else f_p
            ask = frac[c] * pneed[c]
            if (latched[c] == 0 and main_limit_w <= 0.0 and _short_of_power(f_p * pneed[c], ask)
                    and _others_served(k_n, c, latched, frac, dnow)):
                # Beyond its target with the main supply gone, short of power: its ride-through ended at
                # this first partial cycle, and what it would draw in part spends the energy and export of
                # the classes still served (more critical ones beyond their targets, or any inside its
                # target), whose time is next in the lexicographic order: shed and latched, as a class
                # riding through is above and as a class beyond its target cut for energy is (with the main
                # supply there it is peak-shaved: cut per cycle). The whole-step reference holds the same
                # (docs/energy.md "No part after a class's first shed").
                f_p = 0.0
                latched[c] = 1
                dark = min(dark, c)
            p_left -= f_p * pneed[c]
            frac[c] = f_p
    state[ST_E_WH] = e_wh
    state[ST_R_WH] = pre
    # The runtimes end where the class's own energy or the batteries' power ends (tot_wh is free here:
    # the events' times per class).
    for c in range(k_n):
        tot_wh[c] = min(local_s[c], power_s[c])
    ride_through(k_n, dres, tau, latched, e_wh, rt, s_tau, s_on, tot_wh)
    bad = 0
    for c in range(k_n):
        rt[c] = min(rt[c], tot_wh[c]) if latched[c] == 0 else 0.0
        left = max(0.0, target_s[c] - clock_s[c])
        ok = rt[c] >= left - 1e-6 * (1.0 + left)
        reachable[c] = 1 if ok else 0
        bad += not ok
    return bad
