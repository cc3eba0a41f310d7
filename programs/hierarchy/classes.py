"""Energy across levels (docs/hierarchy.md "Energy across levels"): the per-class quantities a child
offers its parent, their sum over a subtree, and the class rows (reserve, runtime, reachable) of the
whole tree from that sum.

The energy program (programs/energy) reduces its nodes to per-class sums before its class rules run:
the demand now and for the reserve (now: a leaf's class demand forecast is not additive, so the top of
the tree forecasts the sum itself, decisions.py), the pooled usable energy, the first node to run out of its own
energy (a minimum), the remaining target. Those sums are additive over nodes, so a parent adds its
children's and runs the same runtime rule (`ride_through`) over the sum: for the same per-node
contributions this is the flat controller's runtime over the union of the nodes. (Each node's
contribution depends on its controller's class state, e.g. how long its class has ridden on the
batteries; docs/hierarchy.md says when that differs from the flat controller's.)

The power probe's answer (programs/energy/tree.py PROBE: the m the last whole sweep probed class k at,
the deliverable energy A(m) within it and its slope) is a sum over nodes too: a subtree's A at m is the sum
of its children's when they all probed at the same m (else the subtree's m is NaN: no answer yet). So are
the inputs of a class's power shortfall (programs/energy/kernel.py `_release`): the power its loads ask of
the bus before any own-need lock is lifted (`power_need_w`: the top lifts them, on the tree's sums) and
the power lifting those locks would add (`release_w`).

An offer is an array (K, N_COLS), row k = priority k (the tree's classes are the priorities 0..K-1).
"""

from __future__ import annotations

import math

import numpy as np

from vbatt.programs.energy.rules import ST_N_CLS, ride_through
from vbatt.programs.energy.tree import P_N, P_PNEED, P_REL, P_S, P_W, P_WH, P_YLD, P_YLS, T_USED, probe_at

__all__ = ["COLS", "N_COLS", "empty", "offer_of", "total", "check", "rows", "row"]

COLS = ("demand_w", "reserve_demand_w", "energy_wh", "local_s", "left_s", "target_s", "latched",
        "pool_now_w", "power_need_w", "power_slack_w", "deliverable_wh", "leaves", "leaves_on_tree", "absent",
        "probe_s", "probe_wh", "probe_w", "release_w", "yield_w", "stranded_w", "yield_shed_w")
N_COLS = len(COLS)
(C_DNOW, C_DRES, C_E, C_LOC, C_LEFT, C_TARGET, C_LATCHED, C_POOL, C_PNEED, C_PSLACK, C_DELIV, C_LEAVES,
 C_ON_TREE, C_ABSENT, C_PROBE_S, C_PROBE_WH, C_PROBE_W, C_REL, C_YLD, C_STR, C_YLS) = range(N_COLS)
# a class without nodes in the subtree (its deliverable energy still counts: within its remaining target
# the subtree's other nodes deliver it, and the class rules check every class's horizon); no probe answer
_NONE = (0.0, 0.0, 0.0, math.inf, math.nan, math.nan, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, math.nan, 0.0, 0.0,
         0.0, 0.0, 0.0, 0.0)
_SUMMED = [C_DNOW, C_DRES, C_E, C_POOL, C_PNEED, C_PSLACK, C_DELIV, C_LEAVES, C_ON_TREE, C_ABSENT, C_PROBE_WH,
           C_PROBE_W, C_REL, C_YLD, C_STR, C_YLS]


def empty(k: int) -> np.ndarray:
    return np.tile(np.array(_NONE), (k, 1))


def offer_of(v: dict, k: int) -> np.ndarray:
    """From a published image (views with the energy program's published memory, `mem.energy.*`):
    the offer of this controller's nodes; all classes absent without an energy program."""
    out = empty(k)
    if "mem.energy.state" not in v:
        return out
    g = lambda name: v["mem.energy." + name]  # noqa: E731
    # how many leaves' sums are in a total (the sums jump when a child comes or goes), how many of them
    # were taken at the tree's decisions (not at a leaf's own, before its first lease or in a fallback),
    # and how many configured children of the subtree's levels are missing from it (a level adds its own)
    out[:, C_LEAVES] = 1.0
    out[:, C_ON_TREE] = float(g("tree")[T_USED] == 1.0)
    has = np.bincount(np.clip(v["node.priority"], 0, k), minlength=k + 1)[:k] > 0
    n_own = int(g("state")[ST_N_CLS])
    # the deliverable energy per horizon with every class served (row n_own of the program's table)
    deliv = g("deliverable_wh")[n_own]
    for c in range(n_own):
        p = int(g("priority")[c])
        if not 0 <= p < k:
            continue
        out[p, :C_PROBE_S] = (g("demand_w")[c], g("reserve_demand_w")[c], g("energy_wh")[c], g("local_s")[c],
                              max(0.0, g("target_s")[c] - g("clock_s")[c]), g("target_s")[c], float(g("latched")[c]),
                              g("pool_now_w")[c], g("power_need_w")[c], g("power_slack_w")[c], deliv[c], 1.0,
                              float(g("tree")[T_USED] == 1.0), 0.0)
        out[p, C_STR] = g("stranded_w")[c]
        if not has[p]:  # a class of the tree it has no node of: only its deliverable energy counts
            out[p, [C_LEFT, C_TARGET]] = math.nan
        t = g("tree")
        j = probe_at(t.shape[0]) + P_N * p
        if j + P_N <= t.shape[0]:
            out[p, [C_PROBE_S, C_PROBE_WH, C_PROBE_W]] = t[j + P_S], t[j + P_WH], t[j + P_W]
            # the shortfall's inputs of the last whole sweep (none before the first: 0)
            got = t[[j + P_PNEED, j + P_REL, j + P_YLD, j + P_YLS]]
            out[p, [C_PNEED, C_REL, C_YLD, C_YLS]] = np.where(np.isnan(got), 0.0, got)
    return out


def total(offers: list[np.ndarray], k: int) -> np.ndarray:
    """The subtree's offer: demands and energy summed, the first to run out its minimum, the remaining
    target and the latch as the longest / any (equal where the children agree)."""
    out = empty(k)
    if not offers:
        return out
    a = np.stack(offers)
    out[:, _SUMMED] = a[:, :, _SUMMED].sum(axis=0)
    out[:, C_LOC] = a[:, :, C_LOC].min(axis=0)
    present = ~np.isnan(a[:, :, C_TARGET])
    for col in (C_LEFT, C_TARGET):
        x = np.where(present, a[:, :, col], -math.inf).max(axis=0)
        out[:, col] = np.where(present.any(axis=0), x, math.nan)
    out[:, C_LATCHED] = a[:, :, C_LATCHED].max(axis=0)
    m = a[:, :, C_PROBE_S]
    out[:, C_PROBE_S] = np.where((m == m[0]).all(axis=0), m[0], math.nan)  # one question answered by all
    return out


def check(offer: np.ndarray, who: str = "offer") -> None:
    """Raises ValueError naming the class and the column where an offer's power probe cannot be one: a
    probe's m is NaN (none yet) or >= 0, its energy finite and >= 0 and its slope finite where there is one."""
    m, wh, w = offer[:, C_PROBE_S], offer[:, C_PROBE_WH], offer[:, C_PROBE_W]
    bad = (m < 0) | np.isinf(m) | ((m == m) & (~np.isfinite(wh) | (wh < 0) | ~np.isfinite(w)))
    for col in (C_REL, C_YLD, C_STR, C_YLS):
        x = offer[:, col]
        lost = ~np.isfinite(x) | (x < 0)
        if lost.any():
            p = int(np.flatnonzero(lost)[0])
            raise ValueError(f"{who}: class {p}: {COLS[col]} {float(x[p])!r}: expected a finite power >= 0 W")
    if bad.any():
        p = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{who}: class {p}: probe_s {m[p]!r}, probe_wh {wh[p]!r}, probe_w {w[p]!r}: expected "
                         f"probe_s NaN (none) or a finite m >= 0 s with a finite probe_wh >= 0 and probe_w")


def rows(offer: np.ndarray) -> list[dict]:
    """The snapshot's "classes" rows of a subtree (programs/energy class_rows' keys) from its offer,
    by the energy program's rules: reserve R_c = sum over k <= c, not shed, of D_k tau_k; the runtime
    if the main supply failed now (`ride_through`), at most the first node's own energy."""
    present = [p for p in range(offer.shape[0]) if not math.isnan(offer[p, C_TARGET])]
    n = len(present)
    if n == 0:
        return []
    o = offer[present]
    dres = np.ascontiguousarray(o[:, C_DRES])
    loc = np.ascontiguousarray(o[:, C_LOC])
    latched = (o[:, C_LATCHED] != 0).astype(np.uint8)
    tau = np.minimum(o[:, C_LEFT], loc)
    e = float(o[:, C_E].sum())
    rt, s_tau, s_on = np.zeros(n), np.zeros(n), np.zeros(n, np.uint8)
    ride_through(n, dres, tau, latched, e, rt, s_tau, s_on, loc)
    out, pre = [], 0.0
    for j, p in enumerate(present):
        if not latched[j]:
            pre += dres[j] * tau[j] / 3600.0
        r = min(rt[j], loc[j]) if not latched[j] else 0.0
        left = o[j, C_LEFT]
        out.append(row(p, o[j], pre, r, r >= left - 1e-6 * (1.0 + left)))
    return out


def row(p: int, o: np.ndarray, reserve_wh: float, runtime_s: float, reachable: bool) -> dict:
    """One class row (the snapshot's keys) from the class's offer and what the rules made of it."""
    return {"priority": int(p), "demand_w": float(o[C_DNOW]), "demand_horizon_w": float(o[C_DRES]),
            "reserve_wh": float(reserve_wh), "target_s": float(o[C_TARGET]),
            "runtime_s": float(runtime_s) if math.isfinite(runtime_s) else None,
            "reachable": bool(reachable), "energy_wh": float(o[C_E])}
