"""O(N) optimality check of an allocation against docs/design.md §2 (for tests and diagnostics).

Given the inputs of `allocation.solve` and its outputs, `kkt_violations` lists
every condition that does not hold (empty list = optimal):

* feasibility: served = battery + bus, sum bus = main_w, every box and link
  limit, 0 <= shed <= demand, 0 <= main_w <= main_limit_w;
* shedding (lexicographic): classes more critical than the cut class fully
  served (up to what their links allow), the cut class split pro rata
  (s_i = clamp(a * d_i, d_i - cap_i, d_i - free_i) for one a), less critical
  classes served only from their own free island capacity, and the budget
  exhausted whenever anything could still be served;
* main supply first: main_w = min(main_limit_w, sum min(r_i - lo_i, L_i));
* balance: b_i = clamp(lam * w_i, box_i) for one lam (water-filling KKT).

Limits come from max_charge_w/max_discharge_w (or protection's lo_w/hi_w), with the
allocator's own SoC rule (no charge at soc_max, no discharge at soc_min, none without capacity).
No ramp and no hysteresis: those are stateful (the check is of one solve). The inputs are
taken at the kernel's resolution (`at_resolution`): below RES_W / RES_WH a value is zero.
"""

from __future__ import annotations

import numpy as np

from vbatt.programs.allocation.kernel import RES_W, RES_WH, WEIGHT_FLOOR_WH

__all__ = ["kkt_violations", "clamp_multiplier_ok", "at_resolution"]

_POWER = ("demand_w", "max_charge_w", "max_discharge_w", "link_max_w", "lo_w", "hi_w", "main_limit_w")


def at_resolution(inp: dict) -> dict:
    """The instance as the kernel sees it: powers below RES_W and energies below RES_WH are zero."""
    out = dict(inp)
    for k, v in inp.items():
        res = RES_W if k in _POWER else RES_WH if k == "capacity_wh" else None
        if res is not None and v is not None:
            a = np.asarray(v, float)
            out[k] = np.where(np.abs(a) < res, 0.0, a) if a.ndim else (0.0 if abs(a) < res else float(a))
    return out


def clamp_multiplier_ok(x, w, lo, hi, tol: float) -> tuple[bool, float]:
    """Is x_i = clamp(lam * w_i, lo_i, hi_i) for one lam (within tol W)? O(N).

    clamp(lam * w_i, lo_i, hi_i) is monotone in lam, so the lam that put x_i within tol of it form
    an interval [a_i, b_i] (w_i > 0); one lam fits all iff max a_i <= min b_i. (Sorting nodes into
    free / at a bound by tol first is not the same: a free node within tol of a bound would be
    read as sitting on it, and its bound as a multiplier bound the exact answer need not meet.)"""
    x, w, lo, hi = (np.asarray(a, dtype=np.float64) for a in (x, w, lo, hi))
    if x.size == 0:
        return True, 0.0
    pos = w > 0
    # reachable at all: within tol of the box, and a node without weight at clamp(0)
    ok = np.all(np.abs(x - np.clip(x, lo, hi)) <= tol)
    ok &= np.all(np.abs(x[~pos] - np.clip(0.0, lo[~pos], hi[~pos])) <= tol)
    with np.errstate(over="ignore"):
        a = np.where(x[pos] - tol > lo[pos], (x[pos] - tol) / w[pos], -np.inf)
        b = np.where(x[pos] + tol < hi[pos], (x[pos] + tol) / w[pos], np.inf)
    lower = np.max(a, initial=-np.inf)
    upper = np.min(b, initial=np.inf)
    ok &= lower <= upper
    lam = lower if np.isfinite(lower) else (upper if np.isfinite(upper) else 0.0)
    return bool(ok), float(lam)


def kkt_violations(inp: dict, out: dict, main_limit_w: float, soc_min: float = 0.1, soc_max: float = 1.0,
                   tol: float = 1e-6) -> list[str]:
    inp = at_resolution(inp)
    main_limit_w = at_resolution({"main_limit_w": main_limit_w})["main_limit_w"]
    d = np.asarray(inp["demand_w"], float)
    n = d.shape[0]
    prio = np.asarray(inp.get("priority", np.zeros(n)), np.int64)
    lo = -np.asarray(inp["max_charge_w"], float)
    hi = np.asarray(inp["max_discharge_w"], float).copy()
    if inp.get("lo_w") is not None:
        lo = np.maximum(lo, inp["lo_w"])
    if inp.get("hi_w") is not None:
        hi = np.minimum(hi, inp["hi_w"])
    soc0, cap0 = np.asarray(inp["soc"], float), np.asarray(inp["capacity_wh"], float)
    lo = np.where((soc0 >= soc_max) | (cap0 <= 0), 0.0, lo)
    hi = np.where((soc0 <= soc_min) | (cap0 <= 0), 0.0, hi)
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    link = np.asarray(inp["link_max_w"], float)
    soc, cap_wh = np.asarray(inp["soc"], float), np.asarray(inp["capacity_wh"], float)
    b, r, s, u = (np.asarray(out[k], float) for k in ("battery_w", "served_w", "shed_w", "bus_w"))
    m = float(out["main_w"])
    bad: list[str] = []

    def need(cond, what):
        if not np.all(cond):
            idx = np.flatnonzero(~np.asarray(cond, bool))[:5] if np.ndim(cond) else []
            bad.append(f"{what} (nodes {list(idx)})" if len(idx) else what)

    scale = tol * (1 + np.abs(d).sum())
    need(np.isfinite(b) & np.isfinite(r) & np.isfinite(s) & np.isfinite(u), "NaN or inf in the outputs")
    need(np.abs(r - b - u) <= tol, "served_w = battery_w + bus_w")
    need(np.abs(r + s - d) <= tol, "served_w + shed_w = demand_w")
    need(abs(u.sum() - m) <= scale, "sum bus_w = main_w")
    need((b >= lo - tol) & (b <= hi + tol), "lo_w <= battery_w <= hi_w")
    need(np.abs(u) <= link + tol, "|bus_w| <= link_max_w")
    need((s >= -tol) & (s <= d + tol), "0 <= shed_w <= demand_w")
    need(-scale <= m <= main_limit_w + scale, "0 <= main_w <= main_limit_w")
    # shedding, class by class
    capn = np.minimum(d, hi + link)
    free = np.minimum(capn, np.maximum(0.0, hi - link))
    spent = np.sum(np.maximum(r - hi, -link))
    budget_left = main_limit_w - spent
    classes = np.unique(prio)
    cut_seen = False
    for c in classes:
        k = prio == c
        short = r[k] < capn[k] - tol  # could be served more
        if cut_seen:
            need(r[k] <= free[k] + tol, f"class {c} is served beyond its own free island while a more critical "
                                        f"class is cut")
            continue
        if short.any():
            cut_seen = True
            need(budget_left <= scale, f"class {c} is shed while {budget_left:.6g} W of budget is unused")
            ok, _ = clamp_multiplier_ok(s[k], d[k], d[k] - capn[k], d[k] - free[k], tol)
            need(ok, f"class {c}: shed is not pro rata to demand within the link limits")
    # main supply first
    want_m = min(main_limit_w, np.sum(np.minimum(r - lo, link)))
    need(abs(m - want_m) <= scale, f"main_w {m:.9g} != min(main_limit_w, what the links carry) {want_m:.9g}")
    # balance
    blo = np.minimum(np.maximum(lo, r - link), np.minimum(hi, r + link))
    bhi = np.minimum(hi, r + link)
    p = r.sum() - m
    if p >= 0:
        w = np.maximum(cap_wh * np.maximum(0.0, soc - soc_min), WEIGHT_FLOOR_WH)
    else:
        w = np.maximum(cap_wh * np.maximum(0.0, soc_max - soc), WEIGHT_FLOOR_WH)
    ok, _ = clamp_multiplier_ok(b, w, blo, bhi, tol)
    need(ok, "battery_w is not the water-filling split (one multiplier)")
    return bad
