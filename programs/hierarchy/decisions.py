"""The energy decisions of a tree of controllers, at its top (docs/hierarchy.md "Energy across levels").

The class rules of the energy program (programs/energy/rules.py `decide`) run on per-class sums only.
The leaves offer those sums (classes.py, summed at every level), so the top runs `decide` once on the
whole tree's sum with its own main supply limit, exactly as a flat controller over the same nodes runs
it on its own sweep, and keeps what `decide` keeps between cycles (the battery clocks, the shed latches,
the hold timer and the reserve's rise). Per priority it sends down what `decide` wrote
(programs/energy/tree.py `DECISIONS`), beside the levels and under their lease; each leaf's energy
program uses it in place of its own. Every node then sees the flat controller's class state: its cap,
its own-need lock and its runtime are the flat controller's (while the leaves' sums are taken at that
state, they are the flat controller's sums, so the next decision is the flat one again).

A middle level forwards its parent's decisions and keeps their clocks and latches (`adopt`), so that
when its parent stops renewing them it decides for its subtree from where the tree was.

The rules run only on a round whose sums are the flat controller's (`round`): every configured child
of every level present (`absent` 0) and every leaf's sums swept wholly at the tree's decisions. Until
the first such round the top sends neutral decisions (nothing capped or latched, every target whole:
the flat controller's state before its first cycle), so that the leaves' sums become the tree's; after
it, a round that is not whole holds the last decisions (a leaf back from a fallback, a child joining)
and the time it held is counted on the clocks at the next step. A latch, a clock that starts or a rise
of the reserve decided on part of the tree, or on a leaf's own sums, would stay for the whole shortage
(measured in real processes: the top latched a class the flat controller keeps, on the round in which
a leaf's sums still came from a sweep at its own class state). Only when the tree stays incomplete
longer than `wait_s` (a child gone for good) do the rules run on what is there, as before: capping,
but latching nothing and counting no rise of the reserve on a leaf's own sums.

The reserve's class demand is the flat controller's too: the leaves offer their pooled demand for the
reserve *now* (a forecast per leaf does not add up to the forecast of the sum), and the top runs the
energy program's class forecast (programs/energy/kernel.py `_class_demand`, with its own energy
parameters `hp`) on the tree's sum at the wall time of the round: the mean over each class's remaining
target, never below the demand now, as a flat controller over the same nodes.

So is the power runtime (programs/energy/rules.py `power_runtime`: per class the largest m with
A(m) >= the demand of the classes up to it within m). A(m) needs every node, so the top asks: with its
decisions it sends per class the horizons a flat controller's sweep takes (D_HORIZON) and its estimate m
(D_PROBE); every leaf's sweep probes its nodes there (programs/energy/tree.py) and offers A(m) and its
slope; every level adds them; when the tree's answer to the question is back (every leaf probed at that
m) the top takes the Newton step on the sum, as a flat controller does on its own sweep, and asks anew.
Until then it keeps its estimate and asks the same question (a round trip takes a few link rounds).
Its reserve, runtime and reachability then end where the tree's power does, as the flat controller's.
"""

from __future__ import annotations

import math

import numpy as np

from vbatt.programs.energy.horizon import HZ_N
from vbatt.programs.energy.kernel import (HP_N, HP_ON, NX_N, NX_REL, NX_RQ, NX_YLD, NX_YLS, NX_YQ, _class_demand,
                                          _release, _reserve_rise, _reserve_wh)
from vbatt.programs.energy.rules import (SETTLE_SWEEPS, ST_N, ST_OK_S, ST_SETTLE, ST_SHORT, ST_SLACK_W, decide,
                                         power_runtime, probe_next, settle)
from vbatt.programs.energy.tree import (D_FRAC, D_HORIZON, D_LATCHED, D_LEFT, D_N, D_PROBE, D_REACHABLE, D_RELEASE,
                                        D_RUNTIME, D_TARGET, D_YIELD)
from vbatt.programs.hierarchy import classes as hc

__all__ = ["TreeDecider"]


class TreeDecider:
    """`decide` over the tree's classes (priorities 0..K-1), with its state between rounds."""

    def __init__(self, k: int, hold_s: float = 60.0, restore_s: float = 60.0, *, pace_s: float = 0.1,
                 wait_s: float = 30.0, hp=None, bins: int = 0, horizon_s: float = 3600.0, power_on: bool = True):
        self.k, self.hold_s, self.restore_s = k, hold_s, restore_s
        # the power runtime (the energy parameters' horizon_s and power_runtime): the estimate per priority
        # (s from now; inf: none binds), the question out (the probe's m; NaN: none) and the horizons sent
        self.horizon_s, self.power_on = horizon_s, power_on
        self.power_s = np.full(k, math.inf)
        self.ask = np.full(k, math.nan)
        self.hz_out = np.full(k, math.nan)
        self.answered = np.zeros(k, bool)  # this round brought the whole tree's answer to the question
        self.answers = 0  # rounds that brought an answer to a question (some class's)
        self.since_s = 0.0  # time since every class's question was last answered (rules.settle: a sweep's time)
        # the class demand forecast (kernel.horizon_params of the top's energy parameters; None or off:
        # the reserve counts the demand now), its state per priority, and no recorded profile to seed from
        self.hp = np.zeros(HP_N) if hp is None else np.asarray(hp, np.float64)
        self.hz = np.zeros((k, HZ_N))
        self.season = np.zeros((k, bins))
        self.prior, self.prior_season = np.full(3, math.nan), np.zeros(bins)
        self.frac = np.ones(k)  # the shares of the last round (a peak-shaved cut is restored at a ramp)
        self.pace_s, self.wait_s = pace_s, wait_s  # the link's round; the longest wait for a whole tree
        self.clock_s = np.zeros(k)
        self.latched = np.zeros(k, np.uint8)
        self.dhz = np.zeros(k)  # the reserve's demand of the last round (for the reserve's rise)
        self.state = np.zeros(ST_N)
        self.started = False
        self.leaves = np.zeros(k)  # the leaves in the last round's sums
        self.absent = np.zeros(k)  # the children missing from them
        self.rows: list[dict] = []
        self.last: np.ndarray | None = None  # the decisions in force (held while the tree is not whole)
        self.mode = "waiting"  # waiting (neutral decisions) / deciding / held / partial (rules on part of it)
        self.clean_rounds = 0  # rounds in a row the rules ran on the whole tree at its decisions
        self.unclean_s = 0.0  # how long the sums have not been whole
        self.held_s = 0.0  # time held since the last step, for the clocks

    def adopt(self, dec: np.ndarray, offer: np.ndarray | None) -> None:
        """The parent's decisions (K, D_N): their clocks and latches become this level's, and the
        decisions this level holds when it becomes the top of its subtree on a round that is not whole."""
        have = ~np.isnan(dec[:, D_FRAC])
        target = offer[:, hc.C_TARGET] if offer is not None else np.full(self.k, math.nan)
        ok = have & ~np.isnan(target)
        self.clock_s[ok] = target[ok] - dec[ok, D_LEFT]
        self.latched[have] = dec[have, D_LATCHED] != 0.0
        self.frac[have] = dec[have, D_FRAC]
        # its subtree answers the parent's question: on its own, its next step goes on from there
        self.ask[have], self.hz_out[have] = dec[have, D_PROBE], dec[have, D_HORIZON]
        self.last = dec.copy()
        self.held_s = 0.0

    @staticmethod
    def whole(offer: np.ndarray) -> bool:
        """Every configured child present and every leaf's sums swept at the tree's decisions."""
        ps = ~np.isnan(offer[:, hc.C_TARGET])
        return bool(ps.any()) and not bool(offer[:, hc.C_ABSENT].any()) and \
            bool((offer[ps, hc.C_ON_TREE] == offer[ps, hc.C_LEAVES]).all())

    def round(self, offer: np.ndarray, main_limit_w: float, dt_s: float,
              wall_s: float = math.nan) -> np.ndarray | None:
        """One round of the link at the top of a (sub)tree: the class rules on a whole tree's sums;
        otherwise the neutral decisions (before the first whole round) or the last ones, held."""
        if np.isnan(offer[:, hc.C_TARGET]).all():
            self.rows = []
            return self.last
        whole = self.whole(offer)
        self.unclean_s = 0.0 if whole else self.unclean_s + dt_s
        if whole or self.unclean_s > self.wait_s:
            dec = self.step(offer, main_limit_w, dt_s + self.held_s, wall_s)
            self.held_s = 0.0
            self.mode = "deciding" if whole else "partial"
            self.clean_rounds = self.clean_rounds + 1 if whole else 0
            self.last = dec
            return dec
        self.clean_rounds = 0
        if self.last is None:
            self.mode = "waiting"
            return self.neutral(offer)
        self.mode = "held"
        self.held_s += dt_s
        return self.last

    def neutral(self, offer: np.ndarray) -> np.ndarray:
        """The class state of a flat controller before its first cycle: nothing capped or latched, every
        target whole (the leaves' own-need locks over the whole target, as at a flat controller's first
        sweep)."""
        ps = np.flatnonzero(~np.isnan(offer[:, hc.C_TARGET]))
        out = np.full((self.k, D_N), math.nan)
        target = offer[ps, hc.C_TARGET]
        out[ps, D_FRAC] = 1.0
        out[ps, D_LATCHED] = 0.0
        out[ps, D_LEFT] = target
        out[ps, D_RUNTIME] = target
        out[ps, D_REACHABLE] = 1.0
        out[ps, D_RELEASE] = 0.0  # no lock lifted
        out[ps, D_YIELD] = 0.0
        out[ps, D_TARGET] = target
        # a flat controller's first sweep: the horizons the whole targets, the probe at the longest horizon
        out[ps, D_HORIZON] = target
        out[ps, D_PROBE] = self._longest_s(target) if self.power_on else 0.0
        self.ask[ps], self.hz_out[ps] = out[ps, D_PROBE], target
        self.power_s[ps] = math.inf
        self.rows = [r | {"clock_s": 0.0, "latched": False, "frac": 1.0} for r in hc.rows(offer)]
        return out

    def step(self, offer: np.ndarray, main_limit_w: float, dt_s: float,
             wall_s: float = math.nan) -> np.ndarray | None:
        """One cycle of the class rules on the tree's offer (K, N_COLS) at wall time wall_s (the class
        forecast's clock: NaN runs none). Returns the decisions (K, D_N), NaN for priorities without nodes;
        None when no class has any."""
        ps = np.flatnonzero(~np.isnan(offer[:, hc.C_TARGET]))
        n = ps.size
        if n == 0:
            self.rows = []
            return None
        o = offer[ps]
        col = lambda c: np.ascontiguousarray(o[:, c])  # noqa: E731
        target, dnow, dnow_res, loc = col(hc.C_TARGET), col(hc.C_POOL), col(hc.C_DRES), col(hc.C_LOC)
        # The tree offers the deliverable energy with every class served, one value per horizon; `decide`
        # takes one row per class (a flat controller's A_c: the classes before c served, its own nodes'
        # load not counted for the more critical classes). Every row is that sum here: at the top of a
        # tree the check is the looser one of before A_c (docs/energy.md "The rule").
        a_wh, pneed = np.tile(col(hc.C_DELIV), (n + 1, 1)), col(hc.C_PNEED).copy()
        clock = np.ascontiguousarray(self.clock_s[ps])
        latched = np.ascontiguousarray(self.latched[ps])
        # as the energy program after a sweep: the horizons at the clocks before this cycle, the class
        # demand forecast of the tree's sum, then the reserve's rise with the new class demand. Not
        # when a leaf's sums came or went: that jump is not the demand's (counted as a surprise, it held
        # the batteries back for an hour: measured in the demo while its children came online)
        # (the horizons are those the leaves' sweep took, the tree's (question), as a flat controller's)
        hz = np.maximum(0.0, target - clock)
        sent = self.hz_out[ps]
        hz = np.ascontiguousarray(np.where(np.isnan(sent), hz, sent))
        r_old = _reserve_wh(n, np.ascontiguousarray(self.dhz[ps]), target, clock, latched)
        dres = dnow_res.copy()
        if self.hp[HP_ON] != 0.0 and wall_s == wall_s:
            fc, season = np.ascontiguousarray(self.hz[ps]), np.ascontiguousarray(self.season[ps])
            _class_demand(float(wall_s), n, target, clock, dnow_res, self.hp, fc, season, self.prior,
                          self.prior_season, dres)
            self.hz[ps], self.season[ps] = fc, season
        same = np.array_equal(offer[:, hc.C_LEAVES], self.leaves) and np.array_equal(offer[:, hc.C_ABSENT],
                                                                                      self.absent)
        self.leaves, self.absent = offer[:, hc.C_LEAVES].copy(), offer[:, hc.C_ABSENT].copy()
        # sums some leaf took at its own class state (before its first lease, or in a fallback) are not the
        # tree's: this round may cap, but latches nothing and is no rise of the reserve (one such round,
        # a leaf's own latches taking its energy out of the pool, latched a class for the whole shortage)
        mixed = bool((offer[ps, hc.C_ON_TREE] != offer[ps, hc.C_LEAVES]).any())
        was = latched.copy()
        if self.started and same and not mixed:
            _reserve_rise(_reserve_wh(n, dres, target, clock, latched) - r_old, max(dt_s, 1e-3), self.state)
        self.state[ST_SLACK_W] = float(offer[:, hc.C_PSLACK].sum())
        e_wh = float(offer[:, hc.C_E].sum())
        z = lambda: np.zeros(n)  # noqa: E731
        tau, reserve, frac, rt, s_tau, cum, tot = z(), z(), z(), z(), z(), z(), z()
        reachable, s_on = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
        # The rules' energy of this round at the link's pace: a round late on a loaded machine (seconds)
        # would ask a class riding through for seconds of energy at once and latch it where the flat
        # controller, cycle by cycle, does not; the rest of the time only moves the clocks that run.
        dt_rule = min(float(dt_s), 2.0 * self.pace_s)
        before = clock.copy()
        power_cap = self.power_step(offer, ps, hz, target, clock, latched, dres, loc, float(dt_s))
        # a class's power shortfall on the tree's sums (as a flat controller after its sweep): the share of
        # its nodes' own-need locks lifted, sent down; its power need less what that gives, for `decide`
        nx = np.zeros((n, NX_N))
        nx[:, NX_REL] = offer[ps, hc.C_REL]
        nx[:, NX_YLD] = offer[ps, hc.C_YLD]
        nx[:, NX_YLS] = offer[ps, hc.C_YLS]
        # what the locks held beyond their classes' targets give another class adds to the batteries' slack
        self.state[ST_SLACK_W] += _release(n, float(main_limit_w), self.state[ST_SLACK_W], target, clock, loc,
                                           latched, dnow, nx, pneed)
        decide(n, dnow, dres, e_wh, float(main_limit_w), dt_rule, self.hold_s, target, clock, latched,
               self.state, loc, power_cap, a_wh, hz, pneed, tau, reserve, frac, rt, reachable, s_tau, s_on,
               cum, tot,
               self.restore_s, max(dt_rule, 1e-3), np.ascontiguousarray(self.frac[ps]), col(hc.C_STR))
        extra = float(dt_s) - dt_rule
        if extra > 0.0:
            clock[clock > before] += extra
            if self.state[ST_SHORT] == 0.0:
                self.state[ST_OK_S] += extra
        if mixed:
            latched[:] = was
        self.clock_s[ps], self.latched[ps], self.dhz[ps], self.frac[ps] = clock, latched, dres, frac
        self.started = True
        out = np.full((self.k, D_N), math.nan)
        out[ps, D_FRAC] = frac
        out[ps, D_LATCHED] = latched
        out[ps, D_LEFT] = np.maximum(0.0, target - clock)
        out[ps, D_RUNTIME] = rt
        out[ps, D_REACHABLE] = reachable
        out[ps, D_RELEASE] = nx[:, NX_RQ]
        out[ps, D_YIELD] = nx[:, NX_YQ]
        out[ps, D_TARGET] = target
        self.question(out, ps, target, clock, latched, loc)
        self.rows = [hc.row(p, o[j], reserve[j], rt[j], reachable[j] != 0) | {
            "demand_horizon_w": float(dres[j]), "clock_s": float(clock[j]), "latched": bool(latched[j]),
            "frac": float(frac[j])} for j, p in enumerate(ps)]
        return out

    def _longest_s(self, left_s: np.ndarray) -> float:
        """The probe's longest horizon, as a flat controller's sweep: the horizon or the longest remaining target."""
        return max(self.horizon_s, float(left_s.max()))

    def power_step(self, offer: np.ndarray, ps: np.ndarray, hz, target, clock, latched, dres, loc,
                   dt_s: float) -> np.ndarray:
        """The power runtime before this round's rules (as a flat controller after its sweep): the estimate
        the sums were taken at, for `decide`, returned; the next estimate (a Newton step on the tree's A(m),
        rules.power_runtime, at the horizons hz the leaves' sweep took) for the classes whose question the
        whole tree answered, kept for the others; once every class's is answered, whether the estimates have
        settled since a start (rules.settle; dt_s: the time since the last round)."""
        if not self.started:  # asked nothing yet: a leaf's first sweep on its own probes where neutral() asks
            first = np.isnan(self.ask[ps])
            self.ask[ps[first]] = self._longest_s(target) if self.power_on else 0.0
        cap = np.ascontiguousarray(self.power_s[ps])
        m = self.ask[ps]
        answered = (offer[ps, hc.C_PROBE_S] == m) & (m == m)
        self.answered[ps] = answered
        self.since_s += dt_s
        if not (answered | (latched != 0)).all():
            # no whole sweep's answer this round: not settled yet (rules.settle), at most SETTLE_SWEEPS rounds
            self.state[ST_SETTLE] = min(SETTLE_SWEEPS, self.state[ST_SETTLE] + 1.0)
        if not answered.any():
            return cap
        self.answers += 1
        n = ps.size
        probe = np.ascontiguousarray(np.where(answered, m, 0.0))
        pv = np.ascontiguousarray(np.stack([offer[ps, hc.C_PROBE_WH], offer[ps, hc.C_PROBE_W]]))
        new = np.zeros(n)
        power_runtime(n, probe, pv, hz, dres, latched, np.ascontiguousarray(loc), self._longest_s(target - clock), new)
        self.power_s[ps] = np.where(answered, new, cap)
        if (answered | (latched != 0)).all():  # a flat controller's sweep: every class's estimate anew
            settle(n, latched, cap, new, self.since_s, self.state)
            self.since_s = 0.0
        return cap

    def question(self, out: np.ndarray, ps: np.ndarray, target, clock, latched, loc) -> None:
        """The horizons and the probe's m for the leaves' next sweep (out's D_HORIZON, D_PROBE), as a flat
        controller's next sweep takes them: min(remaining target, first node out, power runtime), and
        min(power runtime, the longest horizon, first node out) at least the probe's floor (rules.probe_next: an
        estimate of 0 is checked there; 0: none, for a latched class). A question not yet answered by the whole
        tree is asked again unchanged."""
        power = self.power_s[ps]
        hz = np.minimum(np.minimum(np.maximum(0.0, target - clock), loc), power)
        longest = self._longest_s(target - clock)
        nxt = np.array([0.0 if latched[j] != 0 or not self.power_on else probe_next(float(power[j]), longest,
                                                                                     float(loc[j]))
                        for j in range(ps.size)])
        m = self.ask[ps]
        self.ask[ps] = np.where(self.answered[ps] | (m != m) | (nxt == 0.0), nxt, m)
        self.hz_out[ps] = hz
        out[ps, D_HORIZON] = hz
        out[ps, D_PROBE] = self.ask[ps]
