"""Exact allocation across levels (docs/hierarchy.md): curves go up, levels come down.

The flat allocator of docs/design.md §2 finds two kinds of common level over all its nodes:

* stage 2 (shedding), per priority class p, a shed level mu_p: node i of the class sheds
  s_i = clamp(mu_p * d_i, d_i - cap_i, d_i - free_i); mu_p = -inf serves the class whole, +inf
  leaves it only the load its own battery covers for free (`free_i`);
* stage 4 (balance), one battery level lam: b_i = clamp(lam * w_i, blo_i, bhi_i).

Each is found from a sum over *all* nodes of a monotone piecewise-linear function of the level.
A sum of such functions is again one, and it is exactly described by its breakpoints: a child
controller reports, per class, the curve S_p(mu) = sum of its nodes' sheds, and the battery curves
T(lam) (discharge and charge weights) at its current served load, plus three scalars. A parent adds
its children's curves (union of breakpoints, values summed: `Curve.__add__`), which is the curve of
the union of their nodes; it passes the sum upward unchanged. The top controller solves its main
supply limit against the sum exactly as the flat allocator does (`solve_levels`) and sends the
levels down; every level in between forwards them unchanged (they are global: one price for the
whole tree), and each leaf controller applies them to its nodes (`apply_levels`). The result is
the flat allocation of the whole fleet, node by node, to rounding.

The battery curves depend on the served load, which depends on the shed levels: a leaf reports
them at the served load of the last levels it applied, so after a change the tree settles in two
round trips (levels, then curves at the new served load); at rest it is exact.

Not covered here: the ramp and the restore hold (a leaf must have both at zero: the config refuses
them), and the feeders between levels (each subtree narrows the curves and levels to its feeder:
programs/hierarchy/feeder.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vbatt.programs.hierarchy import classes as hc

__all__ = ["Curve", "Summary", "Levels", "NodeLimits", "node_limits", "summarize", "served", "battery_summary",
           "solve_levels", "apply_levels", "FULL", "FREE", "WEIGHT_FLOOR_WH"]

FULL = -math.inf  # shed level that serves the class whole
FREE = math.inf  # shed level that leaves the class only its free load
WEIGHT_FLOOR_WH = 1e-6  # as the allocation kernel: a battery without usable energy keeps a tiny weight


@dataclass(frozen=True)
class Curve:
    """sum_i clamp(x * w_i, a_i, b_i) as breakpoints: f(x) = np.interp(x, xs, ys) (constant beyond the ends)."""

    xs: np.ndarray
    ys: np.ndarray

    @staticmethod
    def of(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> "Curve":
        """O(n log n): sort the breakpoints, then integrate the slope (each node adds w_i between
        its breakpoints a_i/w_i and b_i/w_i); the rounding of the running sum stays ~n ulp."""
        w, a, b = (np.asarray(v, dtype=np.float64) for v in (w, a, b))
        pos = w > 0.0
        y0 = float(a[pos].sum() + np.clip(0.0, a[~pos], b[~pos]).sum())
        p, q, wp = a[pos] / w[pos], b[pos] / w[pos], w[pos]
        if p.size == 0:
            return Curve(np.zeros(1), np.array([y0]))
        xs, inv = np.unique(np.concatenate([p, q]), return_inverse=True)
        dslope = np.zeros(xs.size)
        np.add.at(dslope, inv[:p.size], wp)
        np.add.at(dslope, inv[p.size:], -wp)
        slope = np.cumsum(dslope)[:-1]  # on (xs[j], xs[j+1])
        ys = np.empty(xs.size)
        ys[0] = y0
        ys[1:] = y0 + np.cumsum(slope * np.diff(xs))
        return Curve(xs, ys).compact()

    @staticmethod
    def total(curves: list["Curve"]) -> "Curve":
        """The sum of many curves at once (union of their knots)."""
        if not curves:
            return Curve.zero()
        xs = np.unique(np.concatenate([c.xs for c in curves]))
        ys = np.zeros(xs.size)
        for c in curves:
            ys += np.interp(xs, c.xs, c.ys)
        return Curve(xs, ys).compact()

    @staticmethod
    def zero() -> "Curve":
        return Curve(np.zeros(1), np.zeros(1))

    def __call__(self, x: float) -> float:
        return float(np.interp(x, self.xs, self.ys))

    def __add__(self, other: "Curve") -> "Curve":
        xs = np.union1d(self.xs, other.xs)
        return Curve(xs, np.interp(xs, self.xs, self.ys) + np.interp(xs, other.xs, other.ys)).compact()

    @property
    def lo(self) -> float:
        return float(self.ys[0])

    @property
    def hi(self) -> float:
        return float(self.ys[-1])

    def compact(self) -> "Curve":
        """Drop knots inside a straight piece (exact: the function is unchanged)."""
        xs, ys = self.xs, self.ys
        if xs.size <= 2:
            return self
        dx0, dy0 = xs[1:-1] - xs[:-2], ys[1:-1] - ys[:-2]
        dx1, dy1 = xs[2:] - xs[1:-1], ys[2:] - ys[1:-1]
        # collinear to rounding of the larger of the two slopes' products
        cross = dy0 * dx1 - dy1 * dx0
        keep = np.ones(xs.size, bool)
        keep[1:-1] = np.abs(cross) > 1e-13 * (np.abs(dy0 * dx1) + np.abs(dy1 * dx0))
        return Curve(xs[keep], ys[keep])

    def clip(self, a: float, b: float) -> "Curve":
        """x -> min(max(f(x), a), b) for a nondecreasing f, a <= b: again piecewise linear, with a knot
        where f crosses a bound (a feeder limit: programs/hierarchy/feeder.py)."""
        xs, ys = self.xs, self.ys
        if a <= ys[0] and ys[-1] <= b:
            return self
        new = [xs]
        for t in (a, b):
            j = np.flatnonzero((ys[:-1] < t) & (ys[1:] > t))  # segments crossing t (strictly)
            new.append(xs[j] + (t - ys[j]) * (xs[j + 1] - xs[j]) / (ys[j + 1] - ys[j]))
        nx = np.unique(np.concatenate(new))
        return Curve(nx, np.clip(np.interp(nx, xs, ys), a, b)).compact()

    def solve(self, t: float) -> float:
        """The smallest x with f(x) = t; -inf (+inf) at or below (above) the curve's range, to rounding:
        every term then sits at its lower (upper) clamp whatever its weight has drifted to since the
        curve was made (a finite end knot times a drifted weight would miss the clamp by that drift),
        and a total that rounding puts a hair below the top does not flip the level back and forth."""
        xs, ys = self.xs, self.ys
        tol = 1e-12 * (abs(ys[0]) + abs(ys[-1]) + 1.0)
        if t <= ys[0] + tol:
            return -math.inf
        if t >= ys[-1] - tol:
            return math.inf
        j = int(np.searchsorted(ys, t, side="left"))
        if j == 0:
            return float(xs[0])
        y0, y1 = ys[j - 1], ys[j]
        return float(xs[j - 1] + (t - y0) * (xs[j] - xs[j - 1]) / (y1 - y0))


@dataclass
class NodeLimits:
    """What stage 1 of the allocation kernel derives per usable node (the limits it used)."""

    prio: np.ndarray
    d: np.ndarray  # demand_w
    lo: np.ndarray
    hi: np.ndarray
    link: np.ndarray
    cap: np.ndarray  # most load servable
    free: np.ndarray  # load its own battery covers while it still exports its whole link
    w_dis: np.ndarray  # usable energy above soc_min (floored)
    w_chg: np.ndarray  # room below soc_max (floored)


def node_limits(prio, demand_w, lo_w, hi_w, link_max_w, soc, capacity_wh, serve_max_w=None, *,
                soc_min: float = 0.1, soc_max: float = 1.0) -> NodeLimits:
    """From the limits the allocation kernel used (its lo_w/hi_w outputs) and the node inputs, for
    the usable nodes only (the caller selects them)."""
    d = np.asarray(demand_w, np.float64)
    lo, hi, lk = (np.asarray(v, np.float64) for v in (lo_w, hi_w, link_max_w))
    sm = np.full(d.size, np.inf) if serve_max_w is None else np.asarray(serve_max_w, np.float64)
    sm = np.where(np.isnan(sm), np.inf, np.maximum(sm, 0.0))
    cap = np.minimum(np.minimum(d, hi + lk), sm)
    free = np.minimum(cap, np.maximum(0.0, hi - lk))
    cw, sc = np.asarray(capacity_wh, np.float64), np.asarray(soc, np.float64)
    w_dis = np.maximum(cw * np.maximum(0.0, sc - soc_min), WEIGHT_FLOOR_WH)
    w_chg = np.maximum(cw * np.maximum(0.0, soc_max - sc), WEIGHT_FLOOR_WH)
    return NodeLimits(np.asarray(prio, np.int64), d, lo, hi, lk, cap, free, w_dis, w_chg)


@dataclass
class Summary:
    """What a controller offers its parent for the exact split (docs/hierarchy.md)."""

    own_w: float = 0.0  # stage 2 budget its nodes bring: sum min(hi, link)
    classes: dict[int, Curve] = field(default_factory=dict)  # per class: the shed curve S_p(mu)
    # at its current served load:
    up_w: float = 0.0  # sum min(r - lo, link): the most main supply its links can take
    served_w: float = 0.0  # sum r
    dis: Curve = field(default_factory=Curve.zero)  # battery curve with the discharge weights
    chg: Curve = field(default_factory=Curve.zero)  # ... with the charge weights
    bus_w: float = 0.0  # its net import from the feed now (status, not used by the solve)
    battery_w: float = 0.0  # its battery power now (status)
    energy: np.ndarray | None = None  # the energy offer per class (classes.py), None without one

    @staticmethod
    def total(parts: list["Summary"]) -> "Summary":
        """The subtree's summary: every curve summed once over all children."""
        keys = sorted({k for p in parts for k in p.classes})
        ens = [p.energy for p in parts if p.energy is not None]
        return Summary(sum(p.own_w for p in parts),
                       {k: Curve.total([p.classes[k] for p in parts if k in p.classes]) for k in keys},
                       sum(p.up_w for p in parts), sum(p.served_w for p in parts),
                       Curve.total([p.dis for p in parts]), Curve.total([p.chg for p in parts]),
                       sum(p.bus_w for p in parts), sum(p.battery_w for p in parts),
                       hc.total(ens, ens[0].shape[0]) if ens else None)

    def __add__(self, o: "Summary") -> "Summary":
        cls = dict(self.classes)
        for p, c in o.classes.items():
            cls[p] = cls[p] + c if p in cls else c
        return Summary.total([self, o]) if self.energy is not None or o.energy is not None else \
            Summary(self.own_w + o.own_w, cls, self.up_w + o.up_w, self.served_w + o.served_w,
                    self.dis + o.dis, self.chg + o.chg, self.bus_w + o.bus_w, self.battery_w + o.battery_w)


@dataclass(frozen=True)
class Levels:
    """The common levels of the whole tree, sent down unchanged."""

    shed: dict[int, float]  # class -> mu (FULL: served whole; FREE: free load only)
    lam: float  # battery level
    dis: bool  # weights: usable energy (discharge) or free room (charge)
    # the energy decisions per priority class (decisions.py; programs/energy/tree.py DECISIONS), or None
    energy: np.ndarray | None = field(default=None, compare=False)

    def mu(self, p: int) -> float:
        # a class the top did not see (a node that just came online) gets only its free load
        return self.shed.get(p, FREE)


def _shed_curve(nl: NodeLimits, m: np.ndarray) -> Curve:
    d = nl.d[m]
    return Curve.of(d, d - nl.cap[m], d - nl.free[m])


def summarize(nl: NodeLimits) -> Summary:
    """The served-load-independent part of a leaf's summary (stage 2)."""
    cls = {int(p): _shed_curve(nl, nl.prio == p) for p in np.unique(nl.prio)}
    return Summary(own_w=float(np.minimum(nl.hi, nl.link).sum()), classes=cls)


def served(nl: NodeLimits, lv: Levels) -> np.ndarray:
    """The served load r_i under the levels (stage 2 applied)."""
    mu = np.array([lv.mu(int(p)) for p in nl.prio])
    a, b = nl.d - nl.cap, nl.d - nl.free
    with np.errstate(invalid="ignore"):
        s = np.clip(mu * nl.d, a, b)
    s = np.where(nl.d > 0.0, s, 0.0)  # inf * 0
    return nl.d - s


def _boxes(nl: NodeLimits, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bh = np.minimum(nl.hi, r + nl.link)
    bl = np.minimum(np.maximum(nl.lo, r - nl.link), bh)
    return bl, bh


def battery_summary(nl: NodeLimits, base: Summary, r: np.ndarray) -> Summary:
    """`base` completed with the stage 3/4 part at served load r."""
    bl, bh = _boxes(nl, r)
    return Summary(base.own_w, base.classes, float(np.minimum(r - nl.lo, nl.link).sum()), float(r.sum()),
                   Curve.of(nl.w_dis, bl, bh), Curve.of(nl.w_chg, bl, bh))


def solve_levels(s: Summary, main_limit_w: float, prev: Levels | None = None) -> tuple[Levels, float]:
    """The top's decision on the whole tree's summary: the levels and main_w (stages 2-4).

    Stage 2 needs only the class curves; stages 3-4 use the battery part of `s`, which the leaves
    computed at the served load of `prev` (the levels they last applied)."""
    slack = main_limit_w + s.own_w
    shed: dict[int, float] = {}
    for p in sorted(s.classes):
        c = s.classes[p]
        need = c.hi - c.lo
        if need <= slack + 1e-12 * (1.0 + abs(slack)):
            shed[p] = FULL
            slack -= need
        else:
            total = c.hi - max(slack, 0.0)
            shed[p] = c.solve(total) if total < c.hi else FREE
            slack -= c.hi - total
    main_max = min(main_limit_w, max(s.up_w, 0.0))
    p_bat = s.served_w - main_max
    dis = p_bat >= 0.0
    lam = (s.dis if dis else s.chg).solve(p_bat)
    return Levels(shed, lam, dis), main_max


def apply_levels(nl: NodeLimits, lv: Levels) -> dict[str, np.ndarray]:
    """A leaf's outputs under the tree's levels (stages 2 and 4 applied to its own nodes)."""
    r = served(nl, lv)
    bl, bh = _boxes(nl, r)
    w = nl.w_dis if lv.dis else nl.w_chg
    with np.errstate(invalid="ignore"):
        b = np.clip(lv.lam * w, bl, bh)
    return {"served_w": r, "shed_w": nl.d - r, "battery_w": b, "bus_w": r - b}
