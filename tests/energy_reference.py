"""The reference formulation of docs/design.md §2b for tests: a linear programme on a time grid, solved by HiGHS.

`ride_through_lp`: an outage, the ride-through per class (below). `peak_shed_lp`: peak shaving with the
main supply present and the whole reserve held, the least shed energy per class (its docstring).

The main supply has failed (main limit `main_limit_w`, 0 for an outage). Variables per step t
(length dt_s): the served fraction x[c, t] of each priority class (pro rata inside the class: node
i of class c is served x[c, t] * d_i) and the battery power b[i, t] of each node. Constraints:
  0 <= x <= 1, x[c, t] >= x[c, t+1]           a class once shed stays shed (ride-through = time
                                                 until the first shed = sum_t x[c, t] * dt)
  0 <= b[i, t] <= hi_i                          discharge limit (0 at or below soc_min)
  -L_i <= d_i x[c(i), t] - b[i, t] <= L_i        the node's bus flow within its link
  0 <= sum_i (d_i x - b) <= main_limit_w          bus balance (main supply only imports)
  sum_t b[i, t] dt / 3600 <= e_i                  the node's usable energy
With `whole` (the reference the simulation is held to when limits bind) x is 0/1: a step counts only
if the class is served whole in it, as the simulation counts a class served in part as shed (the
relaxation counts 70 % served as 0.7 of a step: more than the time to the first shed when power or
links bind); and beyond its target a class runs only while every more critical class does.
Objectives, lexicographic: for each class, most critical first, the served time within its target
(sum_t min(1, (T_c - t dt) / dt)^+ x[c, t]), each held at its optimum for the next; then the
served load weighted by gamma^t (earlier counts more: shedding as late as the targets allow, the
power order beyond the targets), ties to the more critical class. With `whole`, beyond the targets:
lazy in the power order, the served time of the least critical class first (the time every class
runs), then the next, each held.
"""

from __future__ import annotations

import highspy
import numpy as np
import scipy.sparse as sp

__all__ = ["ride_through_lp", "peak_shed_lp", "reserve_demand_w"]

INF = highspy.kHighsInf


class _Rows:
    """The constraint rows lo <= A x <= hi, added one at a time (each stage of a lexicographic solve
    adds the row that holds the stage's optimum)."""

    def __init__(self, ncol: int):
        self.ncol = ncol
        self.lo, self.hi, self.data, self.ri, self.ci = [], [], [], [], []

    def __call__(self, entries, lo_v: float, hi_v: float) -> None:
        r = len(self.lo)
        for col, v in entries:
            self.ri.append(r)
            self.ci.append(col)
            self.data.append(v)
        self.lo.append(lo_v)
        self.hi.append(hi_v)

    def matrix(self):
        return sp.coo_matrix((self.data, (self.ri, self.ci)), shape=(len(self.lo), self.ncol))


def _solve(cost, a, row_lo, row_hi, col_lo, col_hi, n_int: int = 0) -> tuple[np.ndarray, float]:
    """n_int: the first n_int columns are integer (0/1 by their bounds)."""
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    for opt in ("primal_feasibility_tolerance", "dual_feasibility_tolerance", "mip_feasibility_tolerance"):
        h.setOptionValue(opt, 1e-9)
    h.setOptionValue("mip_rel_gap", 0.0)
    h.setOptionValue("mip_abs_gap", 1e-7)
    lp = highspy.HighsLp()
    a = sp.csc_matrix(a)
    lp.num_col_, lp.num_row_ = a.shape[1], a.shape[0]
    lp.col_cost_ = np.asarray(cost, float)
    lp.col_lower_, lp.col_upper_ = np.asarray(col_lo, float), np.asarray(col_hi, float)
    lp.row_lower_, lp.row_upper_ = np.asarray(row_lo, float), np.asarray(row_hi, float)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = a.indptr, a.indices, a.data
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = a.shape[1], a.shape[0]
    lp.sense_ = highspy.ObjSense.kMaximize
    if n_int:
        lp.integrality_ = ([highspy.HighsVarType.kInteger] * n_int
                           + [highspy.HighsVarType.kContinuous] * (a.shape[1] - n_int))
    h.passModel(lp)
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kOptimal, h.modelStatusToString(h.getModelStatus())
    return np.asarray(h.getSolution().col_value), h.getInfo().objective_function_value


def ride_through_lp(priority, demand_w, usable_wh, max_discharge_w, link_max_w, targets_s: dict,
                    steps: int, dt_s: float, main_limit_w: float = 0.0, gamma: float = 0.97,
                    whole: bool = False, groups=()) -> dict[int, float]:
    """Ride-through per class (s, at most steps * dt_s) of the lexicographic optimum. whole: the
    class indicators x are 0/1 (a mixed-integer programme): a step counts only if the class is served
    whole in it. Without it (the relaxation) a class served at 70 % counts 0.7 of a step, which is
    more than the time until the first shed when power or links bind (see docs/energy.md).
    groups: (node indices, feeder_w) pairs, a subtree's feeder in a tree of controllers
    (docs/hierarchy.md "Feeder limits"): -feeder_w <= sum over its nodes of (d_i x - b_i) <= feeder_w."""
    prio = np.asarray(priority)
    classes = np.unique(prio)
    k_n, n, s_n = classes.size, prio.size, steps
    cls = np.searchsorted(classes, prio)
    d = np.asarray(demand_w, float)
    nz = k_n * s_n
    zi = lambda c, t: c * s_n + t  # noqa: E731
    yi = lambda i, t: nz + i * s_n + t  # noqa: E731
    bi = lambda i, t: nz + (n + i) * s_n + t  # noqa: E731
    ncol = nz + 2 * n * s_n
    row = _Rows(ncol)

    for t in range(s_n):
        for i in range(n):
            row([(yi(i, t), d[i]), (bi(i, t), -1.0)], -link_max_w[i], link_max_w[i])
            row([(zi(cls[i], t), 1.0), (yi(i, t), -1.0)], -INF, 0.0)  # the class is whole only if every node is
        row([(yi(i, t), d[i]) for i in range(n)] + [(bi(i, t), -1.0) for i in range(n)], 0.0, main_limit_w)
        for idx, f_w in groups:
            row([(yi(i, t), d[i]) for i in idx] + [(bi(i, t), -1.0) for i in idx], -f_w, f_w)
    for i in range(n):
        row([(bi(i, t), dt_s / 3600.0) for t in range(s_n)], -INF, usable_wh[i])
    for c in range(k_n):
        for t in range(s_n - 1):
            row([(zi(c, t), 1.0), (zi(c, t + 1), -1.0)], 0.0, INF)
    if whole:
        # As the energy program: a class cut has its one partial step, then stays shed (no flapping):
        # a node is served in step t+1 only while its class was whole in step t.
        for t in range(s_n - 1):
            for i in range(n):
                row([(yi(i, t + 1), 1.0), (zi(cls[i], t), -1.0)], -INF, 0.0)
    # Beyond its target a class runs only while every more critical class runs (the power order of
    # §2: the least critical is shed first); inside its target it may outlast one beyond its own.
    tstart0 = np.arange(s_n) * dt_s
    for c in range(1, k_n if whole else 0):
        beyond = tstart0 >= targets_s.get(int(classes[c]), 0.0)
        for t in np.nonzero(beyond)[0]:
            for k in range(c):
                row([(zi(c, t), 1.0), (zi(k, t), -1.0)], -INF, 0.0)
    col_lo = np.zeros(ncol)
    col_hi = np.concatenate([np.ones(nz + n * s_n), np.repeat(np.asarray(max_discharge_w, float), s_n)])
    tstart = np.arange(s_n) * dt_s

    for c, p in enumerate(classes):
        w = np.clip((targets_s.get(int(p), 0.0) - tstart) / dt_s, 0.0, 1.0)
        if not w.any():
            continue
        cost = np.zeros(ncol)
        cost[c * s_n:(c + 1) * s_n] = w
        _, opt = _solve(cost, row.matrix(), row.lo, row.hi, col_lo, col_hi, nz if whole else 0)
        row([(zi(c, t), w[t]) for t in range(s_n) if w[t] > 0], opt - 1e-7 * (1.0 + opt), INF)
    if whole:
        # Beyond the targets, lazy in the power order: the time every class runs first (the least
        # critical one's), then the next, ... the most critical last; each held at its optimum.
        for c in reversed(range(k_n)):
            cost = np.zeros(ncol)
            cost[c * s_n:(c + 1) * s_n] = 1.0
            x, opt = _solve(cost, row.matrix(), row.lo, row.hi, col_lo, col_hi, nz)
            row([(zi(c, t), 1.0) for t in range(s_n)], opt - 1e-7 * (1.0 + opt), INF)
        z = np.round(x[:nz].reshape(k_n, s_n))
        return {int(p): float(z[c].sum() * dt_s) for c, p in enumerate(classes)}
    cost = np.zeros(ncol)
    dem = np.bincount(cls, d, k_n)
    g = gamma ** np.arange(s_n)
    for c in range(k_n):
        cost[c * s_n:(c + 1) * s_n] = g * dem[c] * (1.0 + 1e-3 * (k_n - c))
    for i in range(n):
        cost[yi(i, 0):yi(i, 0) + s_n] = 1e-3 * g * d[i]
    x, _ = _solve(cost, row.matrix(), row.lo, row.hi, col_lo, col_hi, nz if whole else 0)
    z = x[:nz].reshape(k_n, s_n)
    return {int(p): float(z[c].sum() * dt_s) for c, p in enumerate(classes)}


def peak_shed_lp(priority, demand_w, usable_wh, room_wh, max_discharge_w, max_charge_w, link_max_w,
                 main_limit_w, targets_s: dict, dt_s: float, reserve_w=None) -> dict:
    """Peak shaving with the outage reserve held (docs/design.md §2b rule 3), the least shed energy
    per class: the main supply is present and may give at most main_limit_w (a number or one per
    step), the demand changes over time (demand_w: nodes x steps, the demand of each step), and at
    the end of every step the batteries must hold the whole reserve R(t) = sum_c D_c(t) T_c of the
    next step's demand (main may fail at any moment: every target whole). reserve_w (classes x
    (steps + 1), W; default the class demand, the steps after the last repeating it) is D_c(t).

    Variables per step t: the served fraction x[c, t] of each class (pro rata inside the class, any
    share, changing freely from step to step: the least shed energy, a lower bound for any policy
    that knows the future), the battery power b[i, t] in [-max_charge_w, max_discharge_w] (> 0
    discharge), the energy e[i, t] above soc_min (e[i, 0] = usable_wh, 0 <= e <= room_wh: up to
    soc_max) and a breach s[t] >= 0 of the reserve. Constraints: the bus flow of each node within its
    link, main in [0, main_limit], e[i, t+1] = e[i, t] - b[i, t] dt, sum_i e[i, t+1] + s[t] >= R(t+1).
    Lexicographic, each stage held at its optimum for the next: the least breach sum_t s[t] (0 when
    the reserve can be held), then the most served energy of class 0, then of class 1, ... (the
    least critical class shed first). Returns {"shed_wh": {priority: Wh}, "breach_wh": Wh,
    "served": classes x steps, "energy_wh": sum_i e[i, t] and "reserve_wh": R(t), t = 0..steps}."""
    prio = np.asarray(priority)
    d = np.asarray(demand_w, float)
    n, s_n = d.shape
    classes = np.unique(prio)
    k_n = classes.size
    cls = np.searchsorted(classes, prio)
    dem = np.zeros((k_n, s_n))
    for i in range(n):
        dem[cls[i]] += d[i]
    if reserve_w is None:
        reserve_w = np.concatenate([dem, dem[:, -1:]], axis=1)
    tg = np.array([targets_s.get(int(p), 0.0) for p in classes])
    r_wh = (np.asarray(reserve_w, float) * tg[:, None]).sum(axis=0) / 3600.0  # R(t), t = 0..steps
    main = np.broadcast_to(np.asarray(main_limit_w, float), (s_n,))
    h = dt_s / 3600.0
    xi = lambda c, t: c * s_n + t  # noqa: E731
    bi = lambda i, t: k_n * s_n + i * s_n + t  # noqa: E731
    ei = lambda i, t: k_n * s_n + n * s_n + i * (s_n + 1) + t  # noqa: E731
    si = lambda t: k_n * s_n + n * s_n + n * (s_n + 1) + t  # noqa: E731
    ncol = si(s_n)
    row = _Rows(ncol)

    for t in range(s_n):
        for i in range(n):
            row([(xi(cls[i], t), d[i, t]), (bi(i, t), -1.0)], -link_max_w[i], link_max_w[i])
            row([(ei(i, t + 1), 1.0), (ei(i, t), -1.0), (bi(i, t), h)], 0.0, 0.0)
        row([(xi(cls[i], t), d[i, t]) for i in range(n)] + [(bi(i, t), -1.0) for i in range(n)], 0.0, main[t])
        row([(ei(i, t + 1), 1.0) for i in range(n)] + [(si(t), 1.0)], r_wh[t + 1], INF)
    col_lo = np.zeros(ncol)
    col_hi = np.full(ncol, INF)
    col_hi[: k_n * s_n] = 1.0
    for i in range(n):
        col_lo[bi(i, 0):bi(i, 0) + s_n] = -float(max_charge_w[i])
        col_hi[bi(i, 0):bi(i, 0) + s_n] = float(max_discharge_w[i])
        col_hi[ei(i, 0):ei(i, 0) + s_n + 1] = float(room_wh[i])
        col_lo[ei(i, 0)] = col_hi[ei(i, 0)] = float(usable_wh[i])

    cost = np.zeros(ncol)
    cost[si(0):si(0) + s_n] = -1.0
    _, opt = _solve(cost, row.matrix(), row.lo, row.hi, col_lo, col_hi)
    row([(si(t), 1.0) for t in range(s_n)], -INF, -opt + 1e-7 * (1.0 - opt))
    breach = -opt
    x = None
    for c in range(k_n):
        cost = np.zeros(ncol)
        cost[xi(c, 0):xi(c, 0) + s_n] = dem[c]
        x, opt = _solve(cost, row.matrix(), row.lo, row.hi, col_lo, col_hi)
        row([(xi(c, t), dem[c, t]) for t in range(s_n)], opt - 1e-7 * (1.0 + opt), INF)
    served = x[: k_n * s_n].reshape(k_n, s_n)
    shed = ((1.0 - served) * dem).sum(axis=1) * h
    energy = np.array([sum(x[ei(i, t)] for i in range(n)) for t in range(s_n + 1)])
    return {"shed_wh": {int(p): float(shed[c]) for c, p in enumerate(classes)}, "breach_wh": float(breach),
            "served": served, "energy_wh": energy, "reserve_wh": r_wh}


def reserve_demand_w(demand_w, dt_s: float, targets_s: dict, level_w=None):
    """D_c(t) of the reserve with a perfect forecast, classes x steps, from the class demand of every step
    (steps x classes, class k = priority k): the mean demand that came over the next T_c (truncated at
    the end, as runtime/scenario/reserve.py), at least `level_w` (steps x classes: the demand now as the
    energy program smooths it; None: no floor, reserve.py's reserve). A class without target: its demand."""
    d = np.asarray(demand_w, float)
    n, k_n = d.shape
    cum = np.concatenate([np.zeros((1, k_n)), np.cumsum(d, axis=0)])
    came = d.copy()
    k = np.arange(n)
    for c in range(k_n):
        h = int(round(targets_s.get(c, 0.0) / dt_s))
        if h > 0:
            e = np.minimum(n, k + h)
            came[:, c] = (cum[e, c] - cum[k, c]) / (e - k)
    return (came if level_w is None else np.maximum(came, level_w)).T
