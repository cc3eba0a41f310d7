"""The per-node passes of the energy program: class sums in, serve caps, limits and runtimes out.

Per node: usable energy e_i = capacity_wh * max(0, soc - soc_min) * efficiency (what reaches the
loads of the energy above soc_min); link L_i; demand d_i.
Where the link cannot carry the whole load (d_i > L_i), the part l_i = d_i - L_i must come from
the node's own battery: that energy is the node's own (stranded for everyone else), the node's
runtime is at most e_i / l_i, and it may export only what its own need leaves while its class has
target left (tau_c) or, when longer, while its class would still run (its runtime of the last cycle),
over its link (its battery limit hi_i is narrowed to l_i plus that surplus within one sweep, so the
balancing does not drain it for others). Only min(d_i, L_i) of its demand is pooled; a node of a
class shed for energy has no local need and serves no load of its own (it only exports). A node
without that need pools its energy as far as its discharge and link can deliver it within H:
min(e_i, min(hi_i, d_i + L_i) * H).
H = the longest remaining target, at least `horizon_s`.

Cost: the class sums come from a sweep over the nodes in chunks (`chunk` nodes a cycle, the whole
fleet every `ceil(n / chunk)` cycles: 100 ms by default), so their energy is up to two sweeps old
(at most the fleet's draw over that time: small against reserves of minutes to hours); the class
rules and the per-node limit pass run every cycle; the caps at once when a class's share moves
by more than 1 % (or to or from 0 or 1), else with the sweep. A scatter of many sums per node by
class costs ~10 ns a node (measured), too much for every cycle at 10,000 nodes.
"""

from __future__ import annotations

import math

from numba import njit

from vbatt.programs.codes import Alarm
from vbatt.programs.energy.horizon import horizon_mean, horizon_update
from vbatt.programs.energy.rules import (ST_LAST_RISE_WH, ST_POS, ST_RISE_WH, ST_SLACK_W, ST_SLOPE_WH, ST_STARTED,
                                         ST_SURPRISE_WH, ST_TREND_WH, decide, power_runtime, probe_next, settle)
from vbatt.programs.energy.tree import (T_SWEPT, T_USED, tree_active, tree_classes, tree_probed, tree_release,
                                        tree_sweep)

__all__ = ["energy_step", "ENERGY_ALARMS", "NX_N", "HP_N", "horizon_params"]

ENERGY_ALARMS = int(Alarm.RIDE_THROUGH_SHORT)
# Columns of the sweep's class accumulators: forecast demand, pooled demand now, pooled demand for
# the reserve, pooled energy, local runtime (min), power need, export slack, the power the class's own-need
# locks could add (_release), the power the locks held beyond their class's remaining target could add (a
# class inside its target short of power takes it first: _release), the part of the pooled demand its nodes
# serve where they are from energy no one else could get within the horizon (stranded: _node_values), that
# yield with the class shed (its batteries' export alone: _release); NX_RQ and NX_YQ are not sums: the shares
# of them released at the last sweep's end.
(NX_DFULL, NX_DNOW, NX_DRES, NX_E, NX_LOC, NX_PNEED, NX_PSLK, NX_REL, NX_RQ, NX_YLD, NX_YQ, NX_STR, NX_YLS,
 NX_N) = range(14)
# The class demand forecast's parameters (memory hz_params): on, fixed window (0: the remaining
# target), level, trend, damping, season and profile time constants (s), seed mode (SEED_MODES).
HP_ON, HP_H, HP_LEVEL, HP_TREND, HP_DAMP, HP_SEASON, HP_STAU, HP_SEED, HP_N = 0, 1, 2, 3, 4, 5, 6, 7, 8
SEED_MODES = ("never", "auto", "always")
# The reserve's rise per sweep (_reserve_rise): its trend is smoothed over RISE_TREND_S, the envelope
# of its surprises fades over RISE_TAU_S.
RISE_TREND_S = 60.0
RISE_TAU_S = 3600.0


def horizon_params(p) -> list[float]:
    """hz_params from EnergyParams."""
    return [1.0 if p.demand_forecast else 0.0, p.demand_horizon_s or 0.0, p.demand_level_tau_s,
            p.demand_trend_tau_s, p.demand_damping_s, p.demand_season_s or 1.0, p.demand_season_tau_s,
            float(SEED_MODES.index(p.demand_seed))]


@njit(nogil=True, cache=True)
def _class_demand(wall_s, n_cls, target_s, clock_s, dres, hp, hz, season, prior, prior_season, dhz):
    """After a sweep: learn the class demand (the pooled demand for the reserve) and set dhz[c], the
    demand the reserve counts: the forecast mean over the class's remaining target (or the fixed
    window), never less than the demand now (a forecast may miss a rise; the reserve must not)."""
    if hp[HP_ON] == 0.0:
        for c in range(n_cls):
            dhz[c] = dres[c]
        return
    # The aggregate's profile fits a class when the class is (nearly) all of it; split by share among
    # classes of other shapes it did worse than a cold start (docs/energy.md). A class's own recorded
    # profile (put in place before its first sample: Energy._preseed) fits it whatever the others do.
    use_prior = hp[HP_SEED] == 2.0 or (hp[HP_SEED] == 1.0 and n_cls == 1)
    horizon_update(wall_s, n_cls, dres, hz, season, prior, prior_season, use_prior, hp[HP_LEVEL], hp[HP_TREND],
                   hp[HP_DAMP], hp[HP_SEASON], hp[HP_STAU], hp[HP_SEED] != 0.0)
    calm = True
    for c in range(n_cls):
        calm &= clock_s[c] <= 0.0
    for c in range(n_cls):
        h = hp[HP_H] if hp[HP_H] > 0.0 else max(0.0, target_s[c] - clock_s[c])
        f = horizon_mean(wall_s, c, h, hz, season, hp[HP_DAMP], hp[HP_SEASON]) if h > 0.0 else math.nan
        # The floor "now": with the main supply carrying every class, the class forecast's level (the
        # demand now smoothed over demand_level_tau_s), not one sweep's sample: the loads' noise of one
        # sweep does not last a target of hours, and the reserve took every upward sample for the whole
        # target (peak.yaml: +-10 W of class 0 a sweep, +-40 Wh of its 4 h target, which the peak-shaving
        # margin then had to cover). In a shortage (a battery clock runs) the demand now, as measured.
        now = horizon_mean(wall_s, c, 0.0, hz, season, hp[HP_DAMP], hp[HP_SEASON]) if calm else dres[c]
        now = now if now == now else dres[c]
        dhz[c] = max(now, f) if f == f else dres[c]


@njit(nogil=True, cache=True)
def _reserve_rise(rise, pace_s, state):
    """After a sweep, from how far the whole reserve rose with the sweep's demand (not with clocks or
    sheds): the rise expected until the next sweep (state[ST_RISE_WH]: the smoothed trend, or the last
    rise, or the last rise plus the smoothed change of the rise (state[ST_SLOPE_WH]), whichever is the
    smallest, as past a peak) and the envelope of the rises beyond that expectation
    (state[ST_SURPRISE_WH]: the loads' noise; on peak.yaml the class forecast moves by ~10 W a
    sweep, ~40 Wh of class 0's 4 h target). A peak-shaved class draws only above the reserve plus
    both (decide), so that the reserve's next rise does not find the batteries drawn to the old one."""
    surprise = rise - state[ST_RISE_WH]
    state[ST_SURPRISE_WH] = max(surprise, state[ST_SURPRISE_WH] * math.exp(-pace_s / RISE_TAU_S))
    a = 1.0 - math.exp(-pace_s / RISE_TREND_S)
    state[ST_SLOPE_WH] += a * (rise - state[ST_LAST_RISE_WH] - state[ST_SLOPE_WH])
    state[ST_LAST_RISE_WH] = rise
    state[ST_TREND_WH] += a * (rise - state[ST_TREND_WH])
    state[ST_RISE_WH] = min(state[ST_TREND_WH], rise, rise + state[ST_SLOPE_WH])  # < 0 past a peak


@njit(nogil=True, cache=True)
def _reserve_wh(n_cls, dhz, target_s, clock_s, latched):
    r = 0.0
    for c in range(n_cls):
        if latched[c] == 0:
            r += dhz[c] * max(0.0, target_s[c] - clock_s[c]) / 3600.0
    return r


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "nsz"})
def _lock_cap(own, e, lock_h, pace_s):
    """A node's battery limit with its own need locked for lock_h hours: the need, plus its surplus above
    the lock at most one sweep's worth (pace_s)."""
    return own + max(0.0, e - own * lock_h) * 3600.0 / pace_s


@njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def _bus_net(g, d, lk):
    """What a node gives the bus (export minus import) with its battery limited to g, its load d served
    (at most its battery and link lk)."""
    c = min(d, g + lk)
    return min(g, lk) - c + min(c, max(0.0, g - lk))


@njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "nsz"})
def _node_values(online, trip, priority, class_of, latched, demand_w, forecast_w, use_forecast, soc, capacity_wh,
                 max_dis_w, link_w, hi_w, narrowed, soc_min, eff, h_s, hz_s, hs_s, rt_s, use_rt, pace_s, v_cls, v_f,
                 v_now, v_res, v_e, v_loc, v_rate, v_g, v_d, v_own, v_eraw, hi_cap, v_pn, v_ps, v_rel, rq, v_yld, v_str,
                 v_yls):
    """Per node (of the slices given): what it adds to its class; branch-free (nodes that cannot take
    part add zeros). hi_cap: the node's own-need limit on its battery (inf: none); v_rel: the power
    lifting that limit would add to the bus (_release), rq: per class, the share of it released at the
    last sweep's end. v_yld: the power the node's lock would add with its lock held only for its class's
    remaining target (not its runtime beyond it). v_str: the
    part of its pooled demand it serves from stranded energy (its draw takes nothing another class could
    get within hs_s[c], the longest horizon its class's draw is held against: _strand_horizons). The callers pass
    slices: a loop over range(a, b) cannot vectorise (a signed index may wrap), ~5x slower here."""
    inv_h = h_s / 3600.0
    np_ = class_of.shape[0]
    for i in range(online.shape[0]):
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
        e = cw * max(0.0, sc - soc_min) * eff
        c = class_of[min(max(priority[i], 0), np_ - 1)]
        v_cls[i] = c
        # A node of a class shed for energy runs no load: it needs nothing of its own battery.
        own = max(0.0, d - lk) if latched[c] == 0 else 0.0
        has = own > 0.0
        f = forecast_w[i] if use_forecast else d
        f = f if (f >= 0.0) & (f < math.inf) else d
        # Its own need is locked for as long as its class has target left, or runs beyond it by the
        # class runtime of the last cycle if that is longer (within the horizon): the first such node
        # to run out sheds its class (the class runtime is at most its e_i / l_i), so its surplus
        # goes to the pool only as far as the pool would run its class out first; the rest it can
        # export once its class no longer runs. (With the remaining target alone, a class beyond its
        # target was shed when such a node ran out, with energy left on the others: measured.)
        lock_h = min(h_s, rt_s[c] if use_rt else hz_s[c]) / 3600.0
        p_own = min(max(0.0, e - own * lock_h), min(g, lk) * inv_h)
        # A node of a class shed for energy serves no load of its own: it only exports, over its link.
        d_own = d if latched[c] == 0 else 0.0
        p_free = min(e, min(g, d_own + lk) * inv_h)
        v_e[i] = (p_own if has else p_free) if ok else 0.0
        # For the deliverable energy within a horizon m (see _horizons): min(v_e, g m, L m + d t),
        # t = how long within m its own load is served. A node with a local need exports only.
        v_g[i] = g if ok else 0.0
        v_rate[i] = lk if ok else 0.0
        v_d[i] = d_own if ok else 0.0
        v_own[i] = own if ok else 0.0
        v_eraw[i] = e if ok else 0.0
        v_f[i] = f if ok else 0.0
        v_now[i] = d - own if ok else 0.0
        v_res[i] = min(f, lk) if ok else 0.0
        # Stranded energy (docs/design.md §2b: counted only for its own node): beyond its own-need lock and
        # what it can export within the horizons its class's draw is held against (hs_s, _strand_horizons), a
        # battery holds energy only its own load can use. If that covers the pooled part of its load (d - own)
        # for that horizon, and its battery can give that part beside its export, its class's draw there takes
        # nothing the other classes could get: the class rules do not count it against their reserve's
        # deliverable energy (rules.decide). (Counted, a class beyond its target on a node with a large battery
        # behind a small link was shed as soon as a more critical class's power runtime bound: the margin there
        # is 0 by construction.)
        ex = min(g, lk)
        dl = d_own - own  # the pooled part of its own load (none for a class shed for energy)
        strand = e - own * lock_h >= (ex + dl) * hs_s[c] / 3600.0
        v_str[i] = min(dl, max(0.0, g - own - ex)) if ok & strand else 0.0
        # Its surplus above that lock it may export as fast as its limits allow, but no more of it
        # than one sweep (pace_s: until the node's next look) can take: so the lock holds, and the
        # surplus is not paced over the horizon (that left it stranded while the nodes without a
        # local need emptied and took the fleet's power with them; measured).
        hi_cap[i] = _lock_cap(own, e, lock_h, pace_s) if ok & has else math.inf
        # Power, as the allocator's shedding stage counts it: serving the load (at most its battery
        # and link) asks cap - f0 of the bus, where f0 is what its battery covers beyond its export;
        # the batteries can give the bus min(hi, L) each.
        gc = min(g, hi_cap[i]) if (e > 0.0) & (cw > 0.0) else 0.0
        cp = min(d, gc + lk)
        v_pn[i] = cp - min(cp, max(0.0, gc - lk)) if ok else 0.0
        v_ps[i] = min(gc, lk) if ok else 0.0
        # What the bus would gain (less import, more export) with the lock lifted to its limits (_release).
        gu = g if (e > 0.0) & (cw > 0.0) else 0.0
        v_rel[i] = max(0.0, _bus_net(gu, d, lk) - v_ps[i] + v_pn[i]) if ok & has else 0.0
        # What the bus would gain with the lock held for its class's remaining target only: the part held for the
        # class's runtime beyond it is the class's time beyond its target, which comes after another class's
        # time inside its target (docs/design.md §2b rules 1 and 2; _release).
        lock_t = min(h_s, hz_s[c]) / 3600.0
        gt = min(g, _lock_cap(own, e, lock_t, pace_s)) if (e > 0.0) & (cw > 0.0) else 0.0
        yields = ok & has & (lock_t < lock_h)
        v_yld[i] = max(0.0, _bus_net(gt, d, lk) - v_ps[i] + v_pn[i]) if yields else 0.0
        # ... and with its class shed: its battery's export alone (its load asks nothing then, so the part of the
        # gain that was its load served from its own battery is no gain).
        v_yls[i] = max(0.0, min(gt, lk) - v_ps[i]) if yields else 0.0
        # Its local runtime: at its own need plus what it gives its class's power now (_release). Not what it yields
        # to another class (_release, yq): that comes only from above its lock for its class's remaining target,
        # and counted, the runtime fell as a yield came and rose as it went; the lock, which holds for the class
        # runtime, followed, and with it the next cycle's shortfall and yield (LP-gap `0.5 2 0.5 2` fleet 13:
        # class 1's runtime 403, 111, 368, 343, 94, 308 s in six 5 s cycles; now 403, 385, 368, 351, 333, 316 s).
        lift = rq[c] * v_rel[i]
        v_loc[i] = (e * 3600.0 / (own + lift) if g >= own else 0.0) if ok & has else math.inf


@njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def _scatter(v_cls, v_f, v_now, v_res, v_e, v_loc, v_pn, v_ps, v_rel, v_yld, v_str, v_yls, nx):
    for i in range(v_cls.shape[0]):
        c = v_cls[i]
        nx[c, NX_STR] += v_str[i]
        nx[c, NX_REL] += v_rel[i]
        nx[c, NX_YLD] += v_yld[i]
        nx[c, NX_YLS] += v_yls[i]
        nx[c, NX_PNEED] += v_pn[i]
        nx[c, NX_PSLK] += v_ps[i]
        nx[c, NX_DFULL] += v_f[i]
        nx[c, NX_DNOW] += v_now[i]
        nx[c, NX_DRES] += v_res[i]
        nx[c, NX_E] += v_e[i]
        nx[c, NX_LOC] = min(nx[c, NX_LOC], v_loc[i])


@njit(nogil=True, cache=True)
def _strand_horizons(n_cls, hz_s, target_s, clock_s, latched, hs_s):
    """hs_s[c]: the longest horizon the class rules hold class c's draw against (rules.decide): riding on the
    batteries inside its target (its battery clock runs), the more critical classes' horizons; else (beyond its
    target, or not on the batteries) every other class's. A node's energy beyond what it can export within
    that is no use to those classes in time: its own load's draw on it is stranded (_node_values v_str). Held
    against the longest horizon of all (an hour at least, horizon_s), a class on link-bound batteries with
    hours of energy was shed in the first minute for a more critical class's 9-minute reserve, which its draw
    did not touch (LP-gap `1 3 0.5 2 --seed 5` fleet 12: class 2 shed in its first seconds, 1,200 s in the
    reference)."""
    for c in range(n_cls):
        riding = latched[c] == 0 and target_s[c] - clock_s[c] > 0.0 and clock_s[c] > 0.0
        h = 0.0
        for k in range(c if riding else n_cls):
            if k != c and latched[k] == 0 and hz_s[k] > 0.0:
                h = max(h, hz_s[k])
        hs_s[c] = h


@njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def _horizons(v_cls, v_e, v_rate, v_g, v_d, v_own, v_eraw, hz_s, n_cls, ax):
    """The energy these nodes can deliver to the pool within m = hz_s[k], at their limits, in two
    forms: with its class served while it has target left (t = min(tau_c, m)): at most its discharge
    limit g_i m and its link L_i m plus its own load d_i t, less its local need l_i t (that is its
    own): min(e_i, g_i m, L_i m + d_i t) - l_i t; and with its class shed now: min(e_i, min(g_i, L_i) m).
    ax[K_ROW, k] += the shed form; ax[c, k] += served - shed, per class c: so the deliverable energy
    with the classes before c served and the others shed is ax[K_ROW, k] + sum_{j < c} ax[j, k]
    (a class may draw only while the more critical classes' reserve stays deliverable without it: its
    own load's energy from its own nodes does not serve them)."""
    kr = ax.shape[0] - 1
    for k in range(n_cls):
        m = hz_s[k]
        if m <= 0.0:  # no target left: no horizon to check
            continue
        t = 0.0
        for i in range(v_e.shape[0]):
            c = v_cls[i]
            own_s = min(hz_s[c], m)
            dl = min(v_g[i] * m, v_rate[i] * m + v_d[i] * own_s) / 3600.0
            # A node with a local need keeps what its own load needs after m while its class has target left:
            # that energy is deliverable to no one within m (its class is shed when the node runs out).
            keep = v_own[i] * max(0.0, hz_s[c] - m) / 3600.0
            served = min(v_e[i], dl) if v_own[i] <= 0.0 else min(v_eraw[i] - keep, dl) - v_own[i] * own_s / 3600.0
            shed = min(v_eraw[i], min(v_g[i], v_rate[i]) * m / 3600.0)
            t += shed
            ax[c, k] += max(0.0, served) - shed
        ax[kr, k] += t


@njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def _power_probe(v_cls, v_e, v_rate, v_g, v_d, v_own, v_eraw, hz_s, probe_s, n_cls, pv):
    """For the power runtime (rules.power_runtime): per class c, the energy these nodes can deliver within
    m = probe_s[c] (0: none) with the classes before c served while they have target left, c served
    throughout (beyond its target too) and the others shed, as _horizons counts it (pv[0, c]), and its
    slope in m (pv[1, c], W, from the left: at a kink the rate before it; Newton's step needs it)."""
    for k in range(n_cls):
        m = probe_s[k]
        if m <= 0.0:
            continue
        t = 0.0
        ts = 0.0
        for i in range(v_e.shape[0]):
            c = v_cls[i]
            e_i = v_e[i] if v_own[i] <= 0.0 else v_eraw[i]
            sr = min(v_g[i], v_rate[i])
            shed = min(v_eraw[i], sr * m / 3600.0)
            shed_w = sr if sr * m / 3600.0 <= v_eraw[i] else 0.0
            hc = m if c == k else hz_s[c]
            own_s = min(hc, m)
            on = 1.0 if m <= hc else 0.0  # its own load is served up to m (the slope of own_s)
            gm = v_g[i] * m
            lm = v_rate[i] * m + v_d[i] * own_s
            dl = min(gm, lm) / 3600.0
            served = min(e_i, dl) - v_own[i] * own_s / 3600.0
            dl_w = v_g[i] if gm <= lm else v_rate[i] + v_d[i] * on
            served_w = (dl_w if dl <= e_i else 0.0) - v_own[i] * on
            use = c <= k
            t += max(0.0, served) if use else shed
            ts += (served_w if served > 0.0 else 0.0) if use else shed_w
        pv[0, k] += t
        pv[1, k] += ts


@njit(nogil=True, cache=True, error_model="numpy")
def _node_outputs(priority, class_of, demand_w, soc, capacity_wh, link_w, soc_min, eff, runtime_s, reachable, frac,
                  node_runtime_s, alarm, serve_max_w):
    np_ = class_of.shape[0]
    for i in range(priority.shape[0]):
        c = class_of[min(max(priority[i], 0), np_ - 1)]
        d = demand_w[i]
        fc = frac[c]
        serve_max_w[i] = math.inf if fc >= 1.0 else fc * d
        lk = link_w[i]
        e = capacity_wh[i] * max(0.0, soc[i] - soc_min) * eff
        own = e * 3600.0 / (d - lk) if d > lk else math.inf
        node_runtime_s[i] = min(runtime_s[c], own)
        m = alarm[i] & ~ENERGY_ALARMS
        alarm[i] = m | ENERGY_ALARMS if reachable[c] == 0 else m


@njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def _caps(priority, class_of, demand_w, frac, serve_max_w):
    np_ = class_of.shape[0]
    for i in range(priority.shape[0]):
        fc = frac[class_of[min(max(priority[i], 0), np_ - 1)]]
        serve_max_w[i] = math.inf if fc >= 1.0 else fc * demand_w[i]


@njit(nogil=True, cache=True, inline="always")
def _inside(c, target_s, clock_s, local_s, latched):
    """Class c rides inside its target: not shed, with target left that its own nodes' energy reaches."""
    return latched[c] == 0 and min(max(0.0, target_s[c] - clock_s[c]), local_s[c]) > 0.0


@njit(nogil=True, cache=True)
def _release(n_cls, main_limit_w, slack_w, target_s, clock_s, local_s, latched, dnow, nx, pneed):
    """After a sweep: the part of a class's power need that neither the main supply nor the batteries'
    export can carry (the classes inside their targets served first, then the others, in class order, as
    decide's power pass) is a local need of the class, as a load beyond a node's link is the node's: it
    can only come from the class's own batteries. So the own-need locks of the class's nodes give it, up to
    their limits (nx[c, NX_RQ]: the share of what they could add, applied by _limits every cycle), and
    pneed[c] no longer asks it of the bus. Energy a lock keeps for the class's later load is worth nothing
    to a class cut now (a class once cut stays shed); held, the class was served in part for want of
    power while its own node kept the energy (LP-gap fleet 13: class 0 at 96 % from 650 s, the reference
    whole to 720 s on a 5 s grid). Only for a class on the batteries alone (the main supply carries none
    of it, as its battery clock counts): with the main supply there a shortfall is a peak, shaved by the
    energy rule, and the locks keep the outage's local need. A class beyond its target does so only while
    no class inside its target is served: its lock's energy goes to the pool when it is shed, and the
    energy rule (decide) does not count it as drawn (`--seed 7` fleet 1: class 0, beyond its 600 s
    target, ran to 860 s on it against the reference's 780 s).
    Before that, a class inside its target short of power takes what the other classes' own-need locks hold
    beyond their own remaining targets (nx[k, NX_YLD], the share released nx[k, NX_YQ]): that energy is the
    other class's time beyond its target, second to any class's time inside its target (docs/design.md §2b
    rules 1 and 2; LP-gap `0.5 2 0.5 2` fleet 17: class 0, 30 s short of its 300 s target, kept a node's
    energy for its own load to 490 s, and class 1 was shed at 270 s of its 600 s target for want of 150 W;
    the reference met both targets). First, since its own locks' energy is its own later need. So does a class
    beyond its target (rule 2: the energy above every reserve serves all loads in the power order; a lock's time
    beyond its own class's target is not a reserve): LP-gap `0.5 2 0.5 2` fleet 13, class 2 (target 0) was shed at
    235 s for 676 W while class 0's node 6 and class 1's node 4 held 774 W for their classes' runtimes beyond
    their targets, and class 0 rode to 785 s on it; the reference sheds class 2 at 270-280 s and class 0 at its
    600 s target. Returns the power so given (W: the batteries' export slack grows by it)."""
    p_left = main_limit_w + slack_w
    given = 0.0
    for k in range(n_cls):
        nx[k, NX_YQ] = 0.0
    riding = False  # a class inside its target is served
    for inside in (True, False):
        cum = 0.0
        for c in range(n_cls):
            on_batt = main_limit_w <= cum + 1e-9 * (1.0 + cum)
            cum += dnow[c]
            if _inside(c, target_s, clock_s, local_s, latched) != inside:
                continue
            riding |= inside and pneed[c] > 0.0
            q = 0.0
            if latched[c] == 0 and pneed[c] > 0.0:
                for k in range(n_cls if on_batt else 0):
                    short = pneed[c] - max(0.0, p_left)
                    # A class after this one in the pass's order that asks power finds none left once this one
                    # took what it lacks: it is shed, so its load asks nothing and its locks give only their
                    # batteries' export (NX_YLS), not the part that served its own load (counted as given, the
                    # power pass served a class beyond its target whole while one inside its target got 90 %
                    # in the cycle three nodes emptied: LP-gap `1 3 0.5 2` fleet 11 at 1 s cycles).
                    k_in = _inside(k, target_s, clock_s, local_s, latched)
                    later = (k > c if k_in == inside else inside) and pneed[k] > 0.0
                    basis = nx[k, NX_YLS] if later else nx[k, NX_YLD]
                    room = basis * (1.0 - nx[k, NX_YQ])
                    if k == c or short <= 0.0 or room <= 0.0:
                        continue
                    y = min(short, room)
                    nx[k, NX_YQ] += y / basis
                    p_left += y
                    given += y
                rel = nx[c, NX_REL] if on_batt and (inside or not riding) else 0.0
                use = min(max(0.0, pneed[c] - max(0.0, p_left)), rel)
                q = use / rel if rel > 0.0 else 0.0
                pneed[c] -= use
                p_left -= pneed[c]
            nx[c, NX_RQ] = q
    return given


@njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def _limits(narrowed, active, hi_cap, lo_w, hi_w, n_cls, nx, v_cls, v_rel, v_yld):
    """Every cycle (protection writes lo_w/hi_w afresh): the own-need limits of the last sweep, lifted by
    what the class's power needs now, or by what another class's target needs of them (_release)."""
    n = hi_w.shape[0]
    lift = False
    for c in range(n_cls):
        lift |= (nx[c, NX_RQ] > 0.0) | (nx[c, NX_YQ] > 0.0)
    if narrowed:
        if active and lift:
            for i in range(n):
                c = v_cls[i]
                hi_w[i] = min(hi_w[i], hi_cap[i] + max(nx[c, NX_RQ] * v_rel[i], nx[c, NX_YQ] * v_yld[i]))
        elif active:
            for i in range(n):
                hi_w[i] = min(hi_w[i], hi_cap[i])
    else:
        for i in range(n):
            c = v_cls[i]
            lo_w[i] = -math.inf
            hi_w[i] = ((hi_cap[i] + (max(nx[c, NX_RQ] * v_rel[i], nx[c, NX_YQ] * v_yld[i]) if lift else 0.0))
                       if active else math.inf)


@njit(nogil=True, cache=True)
def energy_step(online, trip, priority, demand_w, forecast_w, use_forecast, soc, capacity_wh, max_dis_w,
                link_w, lo_w, hi_w, narrowed, main_limit_w, dt_s,
                soc_min, eff, horizon_s, hold_s, chunk, restore_s, power_on,
                class_of, n_cls, target_s, clock_s, latched, state, nx,
                dfull, dnow, dres, energy_wh, local_s, tau, reserve_wh, frac, prev_frac, runtime_s, reachable,
                s_tau, s_on, s_cum, s_tot, hz_s, ax, a_wh, probe_s, probe_wh, power_s, power_cap,
                v_cls, v_f, v_now, v_res, v_e, v_loc, v_rate, v_g, v_d,
                v_own, v_eraw, hi_cap, v_pn, v_ps, v_rel, pneed,
                serve_max_w, node_runtime_s, alarm, wall_s, hp, hz, season, prior, prior_season, dhz,
                tree, prio_of, slack_w, v_yld, v_str, stranded_w, v_yls):
    """Returns the number of classes whose target is unreachable. Reads node inputs (lo_w/hi_w
    when protection narrowed them, forecast_w when a forecast runs); writes serve_max_w,
    node_runtime_s, hi_w (narrowed; lo_w/hi_w written whole when nothing narrowed them before)
    and the RIDE_THROUGH_SHORT alarm bit. Memory: the class arrays, `nx` (the sweep's class
    accumulators), `state`, hi_cap (per node), the class demand forecast (hp its parameters, hz its
    state, season its profiles, prior/prior_season the recorded aggregate's, dhz the demand the
    reserve counts). v_* are scratch. In a tree of controllers, `tree` holds the tree's class decisions
    (tree.py): while leased they stand in for decide()'s, before the sweep and after decide()."""
    on_tree = tree_classes(wall_s, tree, prio_of, n_cls, target_s, clock_s, latched, frac, runtime_s,
                           reachable) >= 0
    tree_release(wall_s, tree, prio_of, n_cls, nx[:, NX_RQ], nx[:, NX_YQ])  # the tree's power shortfall (tree.py)
    n = online.shape[0]
    h_s = horizon_s
    active = False  # no targets: nothing is reserved, the allocation is today's (runtimes still computed)
    for c in range(n_cls):
        h_s = max(h_s, target_s[c] - clock_s[c])
        active |= target_s[c] > 0.0
    # a leaf of a tree: the tree's targets, not only its own (a leaf whose classes have none takes the caps)
    active |= on_tree and tree_active(wall_s, tree)
    # -- the sweep: this cycle's chunk of nodes (all of them on the first cycle) --------------------
    first = state[ST_STARTED] == 0.0
    if first:  # no share decided yet: the scan opens the caps when it starts (a calm restore starts from there)
        for c in range(n_cls):
            prev_frac[c] = 1.0
    pace_s = max(dt_s * -(-n // max(chunk, 1)), 1e-3)  # one sweep
    a = 0 if first else int(state[ST_POS])
    b = n if first else min(n, a + chunk)
    # the sums offered upward are the tree's only when every cycle of their sweep had its decisions
    tree[T_SWEPT] = (1.0 if on_tree else 0.0) if a == 0 else (tree[T_SWEPT] if on_tree else 0.0)
    if not on_tree:
        tree[T_USED] = 0.0
    if a == 0:
        for c in range(n_cls):
            for j in range(NX_N):
                if j != NX_RQ and j != NX_YQ:
                    nx[c, j] = 0.0
            nx[c, NX_LOC] = math.inf
            hz_s[c] = max(0.0, target_s[c] - clock_s[c])
            if first:
                power_s[c] = math.inf
            if not first:
                hz_s[c] = min(hz_s[c], local_s[c])
            # the power runtime's next estimate (power_runtime), at most the horizon and the local runtime, an
            # estimate of 0 re-checked at the floor (probe_next); a leaf of a tree has the tree's pool, not its
            # own: no estimate (its table is the tree's)
            probe_s[c] = (0.0 if on_tree or latched[c] != 0 or not power_on
                          else probe_next(power_s[c], h_s, local_s[c] if not first else h_s))
            probe_wh[0, c] = 0.0
            probe_wh[1, c] = 0.0
            if not on_tree:
                hz_s[c] = min(hz_s[c], power_s[c])
        for j in range(ax.shape[0]):
            for k in range(n_cls):
                ax[j, k] = 0.0
        if on_tree:  # the tree's horizons and its question for the power runtime (tree.py)
            tree_sweep(wall_s, tree, prio_of, n_cls, hz_s, probe_s)
    # s_tau is scratch until decide: the horizons the class rules hold each class's draw against
    _strand_horizons(n_cls, hz_s, target_s, clock_s, latched, s_tau)
    _node_values(online[a:b], trip[a:b], priority[a:b], class_of, latched, demand_w[a:b], forecast_w[a:b],
                 use_forecast, soc[a:b], capacity_wh[a:b], max_dis_w[a:b], link_w[a:b], hi_w[a:b], narrowed, soc_min,
                 eff, h_s, hz_s, s_tau, runtime_s, not first, pace_s, v_cls[a:b], v_f[a:b], v_now[a:b], v_res[a:b],
                 v_e[a:b], v_loc[a:b],
                 v_rate[a:b], v_g[a:b], v_d[a:b], v_own[a:b], v_eraw[a:b], hi_cap[a:b], v_pn[a:b], v_ps[a:b],
                 v_rel[a:b], nx[:, NX_RQ], v_yld[a:b], v_str[a:b], v_yls[a:b])
    _scatter(v_cls[a:b], v_f[a:b], v_now[a:b], v_res[a:b], v_e[a:b], v_loc[a:b], v_pn[a:b], v_ps[a:b], v_rel[a:b],
             v_yld[a:b], v_str[a:b], v_yls[a:b], nx)
    _horizons(v_cls[a:b], v_e[a:b], v_rate[a:b], v_g[a:b], v_d[a:b], v_own[a:b], v_eraw[a:b], hz_s, n_cls, ax)
    _power_probe(v_cls[a:b], v_e[a:b], v_rate[a:b], v_g[a:b], v_d[a:b], v_own[a:b], v_eraw[a:b], hz_s, probe_s, n_cls,
                 probe_wh)
    lo, hi = a, b
    if b >= n:
        for c in range(n_cls):
            dfull[c] = nx[c, NX_DFULL]
            dnow[c] = nx[c, NX_DNOW]
            dres[c] = nx[c, NX_DRES]
            energy_wh[c] = nx[c, NX_E]
            local_s[c] = nx[c, NX_LOC]
            pneed[c] = nx[c, NX_PNEED]
            stranded_w[c] = nx[c, NX_STR]
        state[ST_SLACK_W] = 0.0
        for c in range(n_cls):
            state[ST_SLACK_W] += nx[c, NX_PSLK]
            slack_w[c] = nx[c, NX_PSLK]
        given_w = _release(n_cls, main_limit_w, state[ST_SLACK_W], target_s, clock_s, local_s, latched, dnow, nx,
                           pneed)
        if on_tree:  # a leaf of a tree: the tree decides the power shortfall (tree_release)
            for c in range(n_cls):
                nx[c, NX_YQ] = 0.0
        else:
            state[ST_SLACK_W] += given_w
        tree_release(wall_s, tree, prio_of, n_cls, nx[:, NX_RQ], nx[:, NX_YQ])  # while leased, the tree's shares stand
        # a_wh[c, k]: deliverable within hz_s[k] with the classes before c served, the others shed
        for k in range(n_cls):
            run = ax[ax.shape[0] - 1, k]
            for c in range(n_cls):
                a_wh[c, k] = run
                run += ax[c, k]
            a_wh[n_cls, k] = run
        r_old = _reserve_wh(n_cls, dhz, target_s, clock_s, latched)
        _class_demand(wall_s, n_cls, target_s, clock_s, dres, hp, hz, season, prior, prior_season, dhz)
        # the rules read the power runtime this table was made at (its horizons), the new estimate with the
        # next sweep's table: the reserve's times and the table's must be the same
        for c in range(n_cls):
            power_cap[c] = math.inf if on_tree else power_s[c]
        power_runtime(n_cls, probe_s, probe_wh, hz_s, dhz, latched, local_s, h_s, power_s)
        settle(n_cls, latched, power_cap, power_s, pace_s, state)
        # the probe's answer and the power shortfall's inputs, for the offer upward
        tree_probed(tree, prio_of, n_cls, probe_s, probe_wh, nx[:, NX_REL], nx[:, NX_PNEED], nx[:, NX_YLD],
                    nx[:, NX_YLS])
        if not first:
            _reserve_rise(_reserve_wh(n_cls, dhz, target_s, clock_s, latched) - r_old, pace_s, state)
        tree[T_USED] = tree[T_SWEPT]
        b = 0
    state[ST_POS] = b
    state[ST_STARTED] = 1.0
    e_tot = 0.0
    for c in range(n_cls):
        e_tot += energy_wh[c]
    # -- the class rules, every cycle -------------------------------------------------------------
    bad = decide(n_cls, dnow, dhz, e_tot, main_limit_w, dt_s, hold_s, target_s, clock_s, latched, state,
                 local_s, power_cap, a_wh, hz_s, pneed, tau, reserve_wh, frac, runtime_s, reachable, s_tau, s_on, s_cum,
                 s_tot,
                 restore_s, pace_s, prev_frac, stranded_w)
    leased = tree_classes(wall_s, tree, prio_of, n_cls, target_s, clock_s, latched, frac, runtime_s, reachable)
    bad = bad if leased < 0 else leased
    # -- per node: limits every cycle; caps when a class's share changed (or while any is capped:
    # they follow the demand); runtimes and alarms with the sweep ------------------------------------
    _limits(narrowed, active, hi_cap, lo_w, hi_w, n_cls, nx, v_cls, v_rel, v_yld)
    # Caps: all at once when a class's share moved by more than 1 % of its demand or reached or
    # left 0 or 1 (a shed or a restore acts in this cycle); small moves (a share that follows the
    # demand) with the sweep, at most one sweep late.
    moved = first
    for c in range(n_cls):
        fc = frac[c] if active else 1.0
        pf = prev_frac[c]
        edge = (fc <= 0.0) | (fc >= 1.0) | (pf <= 0.0) | (pf >= 1.0)
        moved |= (fc != pf) & (edge | (abs(fc - pf) > 0.01))
        prev_frac[c] = fc
    if moved:
        _caps(priority, class_of, demand_w, prev_frac, serve_max_w)
    _node_outputs(priority[lo:hi], class_of, demand_w[lo:hi], soc[lo:hi], capacity_wh[lo:hi], link_w[lo:hi], soc_min,
                  eff, runtime_s, reachable, prev_frac, node_runtime_s[lo:hi], alarm[lo:hi], serve_max_w[lo:hi])
    return bad
