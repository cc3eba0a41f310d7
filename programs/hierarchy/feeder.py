"""Feeder limits between levels (docs/hierarchy.md "Feeder limits"): a subtree's net exchange with its
parent's bus stays within its feeder, |sum of its nodes' bus_w| <= F (`hierarchy.uplink.feeder_w`).

The flat allocation of docs/design.md §2 with one more kind of constraint, one per subtree (they nest:
a rack's nodes lie inside its row's). A node is itself such a group: its link L_i bounds its bus, its
battery brings hi_i. Stage 2 (shedding) in those terms: serving r_i *spends* max(0, r_i - free_i) of the
budget. A group G whose children spend x in all (the sum of their spends as they see it) spends, as its
parent sees it,

    max(0, x - E_G)   with   x <= U_G,   E_G = max(0, own - F),   U_G = F + own,   own = sum of the
                                                                                    children's own_w

(own: what its batteries bring, sum min(hi, link); the group brings min(F, own) to its parent). U_G:
the group cannot import more than F; E_G: what its batteries give beyond what the feeder can export is
free for its own loads and of no use to anyone else. Both are spent class by class, in the order of
the classes. So, for a class p with shed curve S(mu) = sum of the children's sheds (their spend is
S.hi - S(mu)), the group's children shed

    clip(S(mu), S.hi - U_rem, S.hi - E_rem)       (U_rem, E_rem: what the classes before p left)

at the parent's level mu: a monotone piecewise-linear curve again (`Curve.clip`), which is what the
group offers its parent for class p. Going down, a group whose clip binds gives its children the
level at which S meets the bound (its own level: higher, it sheds more, when its import saturates;
lower, it serves more from its own batteries, when its export saturates); otherwise the parent's.
The same in stage 4: the group's batteries give clip(T(lam), r - F, r + F) (r its served load), so it
offers the clipped battery curve and gives its children the level at which T meets the bound. And
stage 3: the group's links take at most min(F, sum of its children's).

This is the KKT form of the lexicographic problem with the group constraints (per class: most load
served, then the least sum shed^2 / demand; the most main supply; then the least sum b^2 / w): a node's
level is the top's plus the multipliers of the binding groups on its path. At F = inf nothing binds
and every level is the top's: the flat allocation. tests/test_hierarchy_feeder.py compares it with
HiGHS on that problem.

The curve a group offers for class p depends on what its classes before p spent, which depends on the
levels it received for them: it is taken at the levels it received last (exact at rest, like the
battery curves at the served load of the last levels; after a change the tree settles class by class).
"""

from __future__ import annotations

import dataclasses
import math

from vbatt.programs.hierarchy.curves import FULL, Curve, Levels, Summary
from vbatt.programs.hierarchy.feeder_energy import narrow_energy

__all__ = ["narrow_summary", "narrow_levels", "at"]


def at(c: Curve, x: float) -> float:
    """c(x), with the levels' infinities (FULL: the curve's start, FREE: its end)."""
    if x == -math.inf:
        return c.lo
    if x == math.inf:
        return c.hi
    return c(x)


def _level(c: Curve, x: float, a: float, b: float) -> tuple[float, float]:
    """(the children's total, the level for them): x itself when c(x) lies in [a, b], else where c meets
    the bound it crossed (any level of a flat stretch of c gives every child the same)."""
    y = at(c, x)
    if y < a:
        return a, c.solve(a)
    if y > b:
        return b, c.solve(b)
    return y, x


def _walk(s: Summary, feeder_w: float, lv: Levels | None):
    """Per class in order: (the clipped curve, the children's level). Without levels (none received yet)
    the classes are taken as served whole (the top's answer when no class is cut)."""
    e_rem = max(0.0, s.own_w - feeder_w)
    u_rem = feeder_w + s.own_w
    for p in sorted(s.classes):
        c = s.classes[p]
        a = max(c.lo, c.hi - u_rem)
        b = max(a, min(c.hi, c.hi - e_rem))
        y, mu = _level(c, FULL if lv is None else lv.mu(p), a, b)
        spent = c.hi - y
        u_rem = max(0.0, u_rem - spent)
        e_rem = max(0.0, e_rem - spent)
        yield p, c, a, b, mu


def _band(s: Summary, feeder_w: float) -> tuple[float, float]:
    return s.served_w - feeder_w, s.served_w + feeder_w


def narrow_summary(s: Summary, feeder_w: float, lv: Levels | None, horizon_s: float = 3600.0) -> Summary:
    """What a group offers its parent: `s` (the sum of its children's offers) seen through its feeder,
    taken at the levels `lv` it received last; its energy offer too (feeder_energy.py: the energy beyond
    what the feeder carries out within a horizon is stranded for the rest of the tree; horizon_s: the
    energy program's)."""
    if not math.isfinite(feeder_w):
        return s
    cls = {p: c.clip(a, b) for p, c, a, b, _ in _walk(s, feeder_w, lv)}
    lo, hi = _band(s, feeder_w)
    return dataclasses.replace(s, own_w=min(feeder_w, s.own_w), classes=cls, up_w=min(feeder_w, s.up_w),
                               dis=s.dis.clip(lo, hi), chg=s.chg.clip(lo, hi),
                               energy=narrow_energy(s.energy, feeder_w, None if lv is None else lv.energy, horizon_s))


def narrow_levels(s: Summary, feeder_w: float, lv: Levels) -> Levels:
    """The levels a group gives its children (whose offers sum to `s`) for the levels `lv` it received."""
    if not math.isfinite(feeder_w):
        return lv
    shed = dict(lv.shed)
    for p, _c, _a, _b, mu in _walk(s, feeder_w, lv):
        shed[p] = mu
    lo, hi = _band(s, feeder_w)
    t = s.dis if lv.dis else s.chg
    _y, lam = _level(t, lv.lam, max(t.lo, min(lo, t.hi)), max(t.lo, min(hi, t.hi)))
    return dataclasses.replace(lv, shed=shed, lam=lam)
