"""Exactness across levels, in process (docs/hierarchy.md): racks -> rows -> top composed from the
allocation kernel and the curve summaries, against one flat allocation over the same fleet."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vbatt.programs.allocation import AllocationParams, solve
from vbatt.programs.hierarchy.curves import (Curve, Summary, apply_levels, battery_summary, node_limits, solve_levels,
                                             summarize, served)

P = AllocationParams()


def fleet(rng, n, shortage=True):
    d = rng.uniform(50, 600, n) * (rng.random(n) > 0.05)
    g = rng.uniform(0, 800, n) * (rng.random(n) > 0.1)
    c = rng.uniform(0, 500, n)
    lk = np.where(rng.random(n) < 0.3, rng.uniform(0, 200, n), rng.uniform(200, 2000, n))
    soc = rng.uniform(0.0, 1.0, n)
    cw = rng.uniform(0, 5000, n) * (rng.random(n) > 0.05)
    prio = rng.integers(0, 4, n)
    total = d.sum()
    main = rng.uniform(0.0, 0.6 if shortage else 1.5) * total
    return dict(demand_w=d, max_discharge_w=g, max_charge_w=c, link_max_w=lk, soc=soc, capacity_wh=cw,
                priority=prio), main


def limits_of(cols, idx):
    """A leaf controller: its own allocation gives the limits it uses (independent of the main limit)."""
    sub = {k: v[idx] for k, v in cols.items()}
    o = solve(sub["demand_w"], sub["max_discharge_w"], sub["max_charge_w"], sub["link_max_w"], sub["soc"],
              sub["capacity_wh"], sub["priority"], 0.0)
    return node_limits(sub["priority"], sub["demand_w"], o["lo_w"], o["hi_w"], sub["link_max_w"], sub["soc"],
                       sub["capacity_wh"], soc_min=P.soc_min, soc_max=P.soc_max)


def hierarchy(cols, main, tree):
    """tree: rows of racks of node index arrays. Two rounds: the shed levels from the class curves, then the
    battery level from the curves at the served load of the first levels."""
    racks = [idx for row in tree for idx in row]
    nls = [limits_of(cols, idx) for idx in racks]
    base = [summarize(nl) for nl in nls]

    def up(parts):  # racks -> rows -> top: each level adds its children's summaries (as the link does)
        it = iter(parts)
        rows = [Summary.total([next(it) for _ in row]) for row in tree]
        return Summary.total(rows)

    lv0, _ = solve_levels(up(base), main)
    full = [battery_summary(nl, b, served(nl, lv0)) for nl, b in zip(nls, base)]
    lv1, main_w = solve_levels(up(full), main, lv0)
    out = {k: np.zeros(len(cols["demand_w"])) for k in ("served_w", "shed_w", "battery_w", "bus_w")}
    for nl, idx in zip(nls, racks):
        o = apply_levels(nl, lv1)
        for k in out:
            out[k][idx] = o[k]
    return out, main_w


def flat(cols, main):
    return solve(cols["demand_w"], cols["max_discharge_w"], cols["max_charge_w"], cols["link_max_w"],
                 cols["soc"], cols["capacity_wh"], cols["priority"], main)


def tree_of(rng, n, rows, racks):
    cuts = np.sort(rng.choice(np.arange(1, n), rows * racks - 1, replace=False))
    parts = np.split(rng.permutation(n), cuts)
    return [parts[r * racks:(r + 1) * racks] for r in range(rows)]


def check(cols, main, tree):
    h, main_h = hierarchy(cols, main, tree)
    f = flat(cols, main)
    for k in h:
        assert np.max(np.abs(h[k] - f[k])) < 1e-6, k
    assert abs(main_h - f["main_w"]) < 1e-6
    for p in range(4):  # the class totals (what the issue asks for; per node is stronger)
        m = cols["priority"] == p
        assert abs(h["served_w"][m].sum() - f["served_w"][m].sum()) < 1e-6
        assert abs(h["battery_w"][m].sum() - f["battery_w"][m].sum()) < 1e-6
    assert abs(h["bus_w"].sum() - main_h) < 1e-6 * (1 + abs(main_h))  # the top's feed balances
    return h, f


@pytest.mark.parametrize("seed", range(40))
def test_three_levels_equal_flat_in_shortage(seed):
    rng = np.random.default_rng(seed)
    cols, main = fleet(rng, 36)
    h, f = check(cols, main, tree_of(rng, 36, 3, 3))
    if seed == 0:  # the case is a shortage: some class is cut
        assert f["shed_w"].sum() > 1.0


@pytest.mark.parametrize("seed", range(20))
def test_three_levels_equal_flat_with_spare_main_supply(seed):
    rng = np.random.default_rng(1000 + seed)
    cols, main = fleet(rng, 24, shortage=False)
    check(cols, main, tree_of(rng, 24, 2, 3))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(4, 30), shortage=st.booleans())
def test_hierarchy_equals_flat_property(seed, n, shortage):
    rng = np.random.default_rng(seed)
    cols, main = fleet(rng, n, shortage)
    check(cols, main, tree_of(rng, n, 2, 2))


def test_global_priority_order_across_children():
    """Class 3 runs in rack B only while no class 0 load is shed in rack A: the order is global."""
    cols = dict(demand_w=np.array([500.0, 500.0, 400.0, 400.0]), max_discharge_w=np.array([0.0, 0.0, 300.0, 300.0]),
                max_charge_w=np.zeros(4), link_max_w=np.full(4, 1000.0), soc=np.full(4, 0.8),
                capacity_wh=np.full(4, 1000.0), priority=np.array([0, 0, 3, 3]))
    tree = [[np.array([0, 1]), np.array([2, 3])]]
    h, f = check(cols, 500.0, tree)
    # 500 W main + 600 W of rack B's batteries: rack A's class 0 (1000 W) first, then 100 W for class 3
    assert h["served_w"].tolist() == pytest.approx([500.0, 500.0, 50.0, 50.0])
    assert h["bus_w"][2:].sum() == pytest.approx(-500.0)  # rack B exports to rack A through the feed


def test_curve_sum_is_the_curve_of_the_union():
    rng = np.random.default_rng(7)
    w, a = rng.uniform(0, 5, 20), -rng.uniform(0, 100, 20)
    b = a + rng.uniform(0, 200, 20)
    whole = Curve.of(w, a, b)
    parts = Curve.of(w[:7], a[:7], b[:7]) + Curve.of(w[7:], a[7:], b[7:])
    for x in np.linspace(-200, 200, 997):
        assert parts(x) == pytest.approx(np.clip(x * w, a, b).sum(), abs=1e-9)
        assert whole(x) == pytest.approx(parts(x), abs=1e-9)
    for t in np.linspace(whole.lo, whole.hi, 101):
        assert np.clip(whole.solve(t) * w, a, b).sum() == pytest.approx(t, abs=1e-9)


def moving_errors(seed, rounds=120, lag_up=2, lag_down=2, dt_s=0.1, n_rows=3, n_racks=3, per_rack=20):
    """Demand moving as the simulated profile does (a sine of 60 W over 120 s per node, random phases),
    batteries draining; the tree sees its leaves' curves `lag_up` rounds late and the leaves apply levels
    `lag_down` rounds late (one poll per level each way). Per round: the largest |tree - flat| of a class
    total (served, battery), relative to the fleet's demand."""
    rng = np.random.default_rng(seed)
    n = n_rows * n_racks * per_rack
    cols, main = fleet(rng, n)
    cols["capacity_wh"] = rng.uniform(300, 900, n)
    base_d = cols["demand_w"].copy()
    phase = rng.uniform(0, 120, n)
    tree = [[np.arange(n)[(r * n_racks + k) * per_rack:(r * n_racks + k + 1) * per_rack] for k in range(n_racks)]
            for r in range(n_rows)]
    racks = [idx for row in tree for idx in row]
    sums, levels, errs = [], [], []
    lv = None
    for t in range(rounds):
        cols["demand_w"] = np.where(base_d > 0, base_d + 60 * np.sin(2 * np.pi * (t * dt_s + phase) / 120), 0.0)
        nls = [limits_of(cols, idx) for idx in racks]
        # each leaf: its curves at its current data and the served load of the levels it applies now
        cur = levels[-1 - lag_down] if len(levels) > lag_down else None
        parts = []
        for nl in nls:
            b = summarize(nl)
            parts.append(battery_summary(nl, b, served(nl, cur)) if cur is not None else b)
        s = parts[0]
        for p in parts[1:]:
            s = s + p
        sums.append(s)
        seen = sums[-1 - lag_up] if len(sums) > lag_up else sums[0]
        lv, _ = solve_levels(seen, main, lv)
        levels.append(lv)
        f = flat(cols, main)
        if t < 2 * (lag_up + lag_down) + 2:  # settling from the start (no battery curves yet)
            cols["soc"] = np.clip(cols["soc"] - f["battery_w"] * dt_s / 3600 / np.maximum(cols["capacity_wh"], 1e-9),
                                  0, 1)
            continue
        out = {k: np.zeros(n) for k in ("served_w", "battery_w")}
        for nl, idx in zip(nls, racks):
            o = apply_levels(nl, cur)
            for k in out:
                out[k][idx] = o[k]
        scale = cols["demand_w"].sum()
        errs.append(max(abs(out[k][cols["priority"] == p].sum() - f[k][cols["priority"] == p].sum()) / scale
                        for k in out for p in range(4)))
        # the drain: the flat allocation's battery power moves the charge (the same for both)
        cols["soc"] = np.clip(cols["soc"] - f["battery_w"] * dt_s / 3600 / np.maximum(cols["capacity_wh"], 1e-9),
                              0, 1)
    return np.array(errs)


@pytest.mark.parametrize("seed", range(3))
def test_moving_demand_within_a_tenth_of_a_percent(seed):
    errs = moving_errors(seed)
    assert errs.size > 100
    assert errs.max() < 1e-3, errs.max()
