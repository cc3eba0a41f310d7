"""The allocation of docs/design.md §2 with feeder limits between levels, from HiGHS (a general LP/QP solver),
for tests/test_hierarchy_feeder.py.

The problem, in its plain physical constraints (x = [served r, battery b] per node; bus = r - b):

    lo_i <= b_i <= hi_i,   -L_i <= r_i - b_i <= L_i,   free_i <= r_i <= cap_i     (the node's box and link)
    -F_G <= sum_{i in G} (r_i - b_i) <= F_G                    for every subtree G with a feeder F_G
    sum_i (r_i - b_i) <= main_limit_w

and the lexicographic order of the flat allocator: per priority class in order, the most load served
(an LP, the classes before held at their answer, the classes after at their free load), then the least
sum shed^2 / demand at that total (a QP); then the most main supply (an LP); then the least sum b^2 / w
(a QP). Without feeders it is the flat allocator's problem (tests/test_allocation_highs.py); the test
checks that too, so the reference is checked against the allocator before it judges the tree.

HiGHS's QP stops ~1e-3 W short of the optimum: each QP's answer is polished on its active set (the
bounds and rows it meets, within 1e-4 W) by solving that equality-constrained QP's KKT system exactly.
"""

from __future__ import annotations

import highspy
import numpy as np
import scipy.sparse as sp

from highs_support import highs
from vbatt.programs.hierarchy.curves import WEIGHT_FLOOR_WH

INF = highspy.kHighsInf
ACTIVE_W = 1e-4


def _highs(c, a, row_lo, row_hi, col_lo, col_hi, hess=None, maximise=False):
    return highs(c, a, row_lo, row_hi, col_lo, col_hi, hess_diag=hess, maximise=maximise)


def _slsqp(x0, c, hess, a, row_lo, row_hi, col_lo, col_hi, band=None):
    """min c.x + 0.5 x' diag(hess) x from the LP's answer x0 (HiGHS's active-set QP stalls on this one:
    its Hessian leaves the batteries free)."""
    from scipy.optimize import Bounds, LinearConstraint, minimize

    a = sp.csr_matrix(a).toarray()
    eq = row_lo == row_hi
    ineq = ~eq & (np.isfinite(row_lo) | np.isfinite(row_hi))
    cons = [LinearConstraint(a[eq], row_lo[eq], row_hi[eq])] if eq.any() else []
    cons += [LinearConstraint(a[ineq], row_lo[ineq], row_hi[ineq])] if ineq.any() else []
    f = lambda x: c @ x + 0.5 * hess @ (x * x)  # noqa: E731
    g = lambda x: c + hess * x  # noqa: E731
    both = ~eq & ineq | eq
    one = [LinearConstraint(a[both], row_lo[both], row_hi[both])]
    tries = [("SLSQP", one), ("SLSQP", cons)]
    if band is not None:  # the last row (the class's total) as a narrow band instead of a lower bound
        hb = row_hi.copy()
        hb[-1] = band
        tries.insert(0, ("SLSQP", [LinearConstraint(a[both], row_lo[both], hb[both])]))
    for method, cs in tries + [("trust-constr", cons)]:
        # the first that converges: SLSQP's subproblem fails on some degenerate sets, either way of putting
        # the rows; the interior-point method then (slow: seconds)
        opt = {"ftol": 1e-14, "maxiter": 2000} if method == "SLSQP" else {"gtol": 1e-8, "xtol": 1e-12, "maxiter": 150}
        res = minimize(f, x0, jac=g, method=method, bounds=Bounds(col_lo, col_hi), constraints=cs, options=opt,
                       **({"hess": lambda x: np.diag(hess)} if method == "trust-constr" else {}))
        if res.success:
            break
    return np.clip(res.x, col_lo, col_hi)


def _b_for(r, a, row_lo, row_hi, lo, hi):
    """Batteries that make served load r feasible (an LP), or None."""
    n = len(r)
    try:
        x = _highs(np.zeros(2 * n), a, row_lo, row_hi, np.concatenate([r, lo]), np.concatenate([r, hi]))
    except AssertionError:
        return None
    return x[n:]


def _best(x, c, hess, a, row_lo, row_hi, col_lo, col_hi, served_only=False):
    """(the polished x, polished or not): of the polishes on the active sets within 1e-7..1e-3 W, the feasible
    one with the least objective (a set that misses a binding constraint breaks it; one with a constraint too
    many costs objective)."""
    obj = lambda v: c @ v + 0.5 * hess @ (v * v)  # noqa: E731
    best, done = x, False
    n = len(x) // 2
    for tol in (1e-7, 1e-6, 1e-5, 1e-4, 1e-3):
        xp = _polish(x, c, hess, a, row_lo, row_hi, col_lo, col_hi, tol)
        if served_only:  # the batteries are free in this QP: any that fit the polished served load
            b = _b_for(np.clip(xp[:n], col_lo[:n], col_hi[:n]), a, row_lo, row_hi, col_lo[n:], col_hi[n:])
            if b is None:
                continue
            xp = np.concatenate([np.clip(xp[:n], col_lo[:n], col_hi[:n]), b])
        if _feasible(xp, a, row_lo, row_hi, col_lo, col_hi) and (not done or obj(xp) < obj(best)):
            best, done = xp, True
    return best, done


def _polish(x, c, hess, a, row_lo, row_hi, col_lo, col_hi, tol=ACTIVE_W):
    """The exact optimum of min c.x + 0.5 x' diag(hess) x on the active set of the approximate optimum x:
    the KKT system of the equality-constrained QP, solved by least squares (exact when consistent; where
    the objective leaves variables free, any of their values)."""
    a = sp.csr_matrix(a).toarray()
    ax = a @ x
    fixed = (np.abs(x - col_lo) < tol) | (np.abs(x - col_hi) < tol)
    xf = np.where(np.abs(x - col_lo) < tol, col_lo, col_hi)
    act = (np.abs(ax - row_lo) < tol) | (np.abs(ax - row_hi) < tol)
    rhs_rows = np.where(np.abs(ax - row_lo) < tol, row_lo, row_hi)[act]
    free = ~fixed
    af = a[act][:, free]
    rhs = rhs_rows - a[act][:, fixed] @ xf[fixed]
    nf, na = int(free.sum()), int(act.sum())
    k = np.zeros((nf + na, nf + na))
    k[:nf, :nf] = np.diag(hess[free])
    k[:nf, nf:] = af.T
    k[nf:, :nf] = af
    sol = np.linalg.lstsq(k, np.concatenate([-c[free], rhs]), rcond=None)[0]
    out = np.where(fixed, xf, 0.0)
    out[free] = sol[:nf]
    return out


def _feasible(x, a, row_lo, row_hi, col_lo, col_hi, tol=1e-7) -> bool:
    ax = sp.csr_matrix(a) @ x
    return bool(np.all(ax >= row_lo - tol) & np.all(ax <= row_hi + tol) & np.all(x >= col_lo - tol)
                & np.all(x <= col_hi + tol))


def reference(d, lo, hi, link, cap, free, prio, w_dis, w_chg, groups, main_limit_w) -> dict:
    """HiGHS's allocation. groups: list of (node index array, feeder_w); returns served_w, battery_w, bus_w,
    main_w, and `polished`: how many QPs' polish was kept (a polish that breaks a constraint is not)."""
    n = len(d)
    eye = sp.identity(n, format="csr")
    rows = [sp.hstack([eye, -eye])]
    rlo, rhi = [-link], [link]
    for idx, f in groups:
        if np.isfinite(f):
            g = np.zeros(n)
            g[idx] = 1.0
            rows.append(sp.csr_matrix(np.concatenate([g, -g])[None, :]))
            rlo.append([-f])
            rhi.append([f])
    rows.append(sp.csr_matrix(np.concatenate([np.ones(n), -np.ones(n)])[None, :]))
    rlo.append([-INF])
    rhi.append([main_limit_w])
    a = sp.vstack(rows).tocsr()
    row_lo, row_hi = np.concatenate(rlo), np.concatenate(rhi)
    r = free.copy()  # classes not decided yet: their free load
    polished = 0
    for p in np.unique(prio):
        m = prio == p
        col_lo = np.concatenate([r, lo])
        col_hi = np.concatenate([r, hi])
        col_lo[:n][m], col_hi[:n][m] = free[m], cap[m]
        sel = np.concatenate([m.astype(float), np.zeros(n)])
        x = _highs(sel, a, row_lo, row_hi, col_lo, col_hi, maximise=True)
        t = float(sel @ x)
        if t >= cap[m].sum() - 1e-9:
            r[m] = cap[m]
            continue
        # the class's total held at its optimum; least sum (d - r)^2 / d
        a2 = sp.vstack([a, sp.csr_matrix(sel[None, :])]).tocsr()
        lo2, hi2 = np.concatenate([row_lo, [t - 1e-6]]), np.concatenate([row_hi, [INF]])  # less gains nothing
        dm = np.maximum(d, 1e-12)
        hess = np.concatenate([np.where(m, 2.0 / dm, 0.0), np.zeros(n)])
        lin = np.concatenate([np.where(m, -2.0, 0.0), np.zeros(n)])
        xq = _slsqp(x, lin, hess, a2, lo2, hi2, col_lo, col_hi, band=t + 1e-6)
        lo2[-1] = hi2[-1] = t
        xq, ok = _best(xq, lin, hess, a2, lo2, hi2, col_lo, col_hi, served_only=True)
        polished += ok
        r[m] = np.clip(xq[:n][m], free[m], cap[m])
    # main supply first: the most sum (r - b), r held
    col_lo, col_hi = np.concatenate([r, lo]), np.concatenate([r, hi])
    x = _highs(np.concatenate([np.zeros(n), np.ones(n)]), a, row_lo, row_hi, col_lo, col_hi)
    main_w = float(r.sum() - x[n:].sum())
    p_bat = r.sum() - main_w
    w = w_dis if p_bat >= 0.0 else w_chg
    # the balance: least sum b^2 / w with sum b = p_bat (the top's row at main_w)
    row_lo2, row_hi2 = row_lo.copy(), row_hi.copy()
    row_lo2[-1] = row_hi2[-1] = main_w
    hess = np.concatenate([np.zeros(n), w.max() / w])
    c0 = np.zeros(2 * n)
    xq = _highs(c0, a, row_lo2, row_hi2, col_lo, col_hi, hess=hess)
    xq, ok = _best(xq, c0, hess, a, row_lo2, row_hi2, col_lo, col_hi)
    polished += ok
    b = xq[n:]
    return {"served_w": r, "battery_w": b, "bus_w": r - b, "main_w": main_w, "polished": polished,
            "weights_floored": bool(np.any(w <= WEIGHT_FLOOR_WH))}
