"""A subtree's energy offer through its feeder (docs/hierarchy.md "Feeder limits", "Energy across levels").

The energy offer (classes.py) sums over nodes what the class rules consume. Behind a feeder F the sum
overstates what the rest of the tree can use: within a horizon m the group's batteries reach loads
outside it with at most F m; its own loads take its energy without the feeder. So of the energy A_G(m)
its nodes can deliver within m, the tree can use at most

    min(A_G(m), D_G(m) + F m)         D_G(m): the group's own demand within m, as the rule counts it

(a cut of the transshipment: the group's surplus above its own loads leaves it over the feeder only).
The rest is stranded behind the feeder, for its own loads only (docs/design.md §2b: stranded energy counts
only for its own node or group), as a node's energy beyond what its limits deliver within the horizon
is not pooled. Nested feeders compose: a row narrows the sum of its racks' narrowed offers, which is the
same recursion as the flow through a tree (each level passes up at most its feeder's worth of surplus).
With F = inf the offer is unchanged, so the tree is the flat controller there.

Per column (D_j the group's reserve demand now of class j, C_DRES; latched classes count none; hz_j the
horizon the leaves' sweep took, the decisions' D_HORIZON, else the remaining target at most the first
node out; all in the units of the rules, D min(hz, m) in W s):
- the deliverable energy per horizon (C_DELIV[k], every class with target left served, at m = hz_k):
  D_G(m) = sum_j D_j min(hz_j, m) over the classes with target left (beyond its target a class's own
  load is not deliverable to the reserve: kernel._horizons);
- the power probe of class k at m (C_PROBE_WH, its slope C_PROBE_W; the classes before k served for
  their horizons, k throughout, the others shed: kernel._power_probe): D_G(m) = sum_{j<k} D_j min(hz_j,
  m) + D_k m, the demand rules.power_runtime holds A against; the slope where the cap binds is that
  demand's (from the left) plus F. The capped A is the minimum of concave functions: concave, so the
  top's Newton step keeps its property (from above the root it stays above it);
- the pooled energy (C_E, within the horizon H = the tree's longest remaining target, at least horizon_s,
  as a node's is): at most (sum_j D_j + F) H over the classes not latched, each class's part scaled alike;
- the batteries' export slack for the power pass (C_PSLACK): at most the group's own power need plus F;
- the stranded draw (C_STR): where the group's energy covers F and its own pooled loads over the horizon
  H and its batteries give both, all of its classes' pooled demand (their draw is no one else's energy).

Not narrowed: the import side (a group whose own loads need more than its batteries and F can bring,
stranded demand rather than stranded energy: the allocation sheds it inside the group, the top's rules
count it as served from the pool) and the demand columns.
"""

from __future__ import annotations

import math

import numpy as np

from vbatt.programs.energy.tree import D_HORIZON, D_LEFT
from vbatt.programs.hierarchy import classes as hc

__all__ = ["narrow_energy"]


def _horizons(o: np.ndarray, dec: np.ndarray | None) -> np.ndarray:
    """Per priority, the horizon the leaves' sweep took: the decisions' where there are (the tree's
    question), else the remaining target at most the first node out of its own energy."""
    own = np.nan_to_num(np.minimum(o[:, hc.C_LEFT], o[:, hc.C_LOC]), nan=0.0, posinf=0.0)
    if dec is None:
        return np.maximum(0.0, own)
    h = dec[:o.shape[0], D_HORIZON]
    return np.maximum(0.0, np.where(np.isnan(h), own, h))


def _longest_s(o: np.ndarray, dec: np.ndarray | None) -> float:
    """The longest remaining target of the tree (the decisions'), else of the subtree: a leaf without a
    node of the class with the longest target pools its own energy within a shorter horizon than the
    flat controller, but its feeder's cap is the tree's."""
    left = np.nan_to_num(o[:, hc.C_LEFT], nan=0.0)
    if dec is not None:
        left = np.maximum(left, np.nan_to_num(dec[:o.shape[0], D_LEFT], nan=0.0))
    return float(left.max(initial=0.0))


def narrow_energy(offer: np.ndarray | None, feeder_w: float, dec: np.ndarray | None = None,
                  horizon_s: float = 3600.0) -> np.ndarray | None:
    """What a group whose children's offers sum to `offer` offers its parent through its feeder
    `feeder_w` (W); dec: the decisions it received last (K, D_N; None: none yet), for the horizons the
    leaves swept at; horizon_s: the energy program's `horizon_s` (the pooled energy's least horizon)."""
    if offer is None or not math.isfinite(feeder_w):
        return offer
    o = offer.copy()
    k_n = o.shape[0]
    on = o[:, hc.C_LATCHED] == 0.0
    dres = np.where(on, np.nan_to_num(o[:, hc.C_DRES], nan=0.0), 0.0)
    hz = _horizons(o, dec)
    riding = on & (hz > 0.0)
    f = float(feeder_w)
    for k in range(k_n):
        # the deliverable energy within hz_k with every class with target left served
        m = hz[k]
        if m > 0.0:
            cap = (float((dres[riding] * np.minimum(hz[riding], m)).sum()) + f * m) / 3600.0
            o[k, hc.C_DELIV] = min(o[k, hc.C_DELIV], cap)
        # the power probe of class k at its m
        m = o[k, hc.C_PROBE_S]
        if m == m and m > 0.0:
            before = riding & (np.arange(k_n) < k)
            dem = dres[k] * m + float((dres[before] * np.minimum(hz[before], m)).sum())
            dem_w = dres[k] + float(dres[before & (hz >= m)].sum())
            cap, cap_w = (dem + f * m) / 3600.0, dem_w + f
            a, a_w = o[k, hc.C_PROBE_WH], o[k, hc.C_PROBE_W]
            if cap < a:
                o[k, hc.C_PROBE_WH], o[k, hc.C_PROBE_W] = cap, cap_w
            elif cap == a:  # the left slope of a minimum where both meet: the larger one
                o[k, hc.C_PROBE_W] = max(a_w, cap_w)
    # the pooled energy within H, and the export slack
    h_s = max(float(horizon_s), _longest_s(o, dec))
    e = np.nan_to_num(o[:, hc.C_E], nan=0.0)
    # Stranded behind the feeder (as a node's behind its link, kernel._node_values): where the group's energy
    # covers its export F and its own pooled loads over the whole horizon, and its batteries give both, its
    # classes' draw there takes nothing from the rest of the tree (rules.decide's stranded draw)
    dnow = np.where(on, np.nan_to_num(o[:, hc.C_DNOW], nan=0.0), 0.0)
    s = np.nan_to_num(o[:, hc.C_PSLACK], nan=0.0)
    own_w = float(np.nan_to_num(o[:, hc.C_PNEED], nan=0.0).sum())  # the group's own power need
    if e.sum() >= (float(dnow.sum()) + f) * h_s / 3600.0 and s.sum() >= own_w + f:
        o[:, hc.C_STR] = np.maximum(o[:, hc.C_STR], dnow)
    cap = (float(dres.sum()) + f) * h_s / 3600.0
    if e.sum() > cap:
        o[:, hc.C_E] = e * (cap / e.sum())
    if s.sum() > own_w + f:
        o[:, hc.C_PSLACK] = s * ((own_w + f) / s.sum())
    return o
