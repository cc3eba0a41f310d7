"""Feeder limits between levels, in process (docs/hierarchy.md "Feeder limits"): racks -> rows -> top composed
from the allocation kernel's limits, the curves and the levels, each rack and row narrowing them to its
`feeder_w` (programs/hierarchy/feeder.py), against HiGHS on the flat problem with the same group limits
(tests/feeder_reference.py), node by node."""

from __future__ import annotations

import math

import numpy as np
import pytest

from feeder_reference import reference
from test_hierarchy_exact import flat, fleet, limits_of, tree_of
from vbatt.programs.hierarchy.curves import (Curve, Summary, apply_levels, battery_summary, served, solve_levels,
                                             summarize)
from vbatt.programs.hierarchy.feeder import narrow_levels, narrow_summary

TOL_W = 1e-6
OUT = ("served_w", "shed_w", "battery_w", "bus_w")


def compose(cols, main, tree, f_rack, f_row, rounds=12):
    """The tree's answer after `rounds` link rounds (curves up, levels down, each level at the levels it
    received the round before), and the round from which the racks' levels no longer changed."""
    racks = [idx for row in tree for idx in row]
    nls = [limits_of(cols, idx) for idx in racks]
    base = [summarize(nl) for nl in nls]
    at_rack = [None] * len(racks)  # levels each rack received (from its row) and applied (narrowed)
    applied = [None] * len(racks)
    at_row = [None] * len(tree)
    settled, last = None, None
    for k in range(rounds):
        own = [battery_summary(nl, b, served(nl, lv) if lv is not None else nl.cap)
               for nl, b, lv in zip(nls, base, applied)]
        seen = [narrow_summary(s, f, lv) for s, f, lv in zip(own, f_rack, at_rack)]
        it = iter(range(len(racks)))
        members = [[next(it) for _ in row] for row in tree]
        row_sum = [Summary.total([seen[j] for j in m]) for m in members]
        top = Summary.total([narrow_summary(s, f, lv) for s, f, lv in zip(row_sum, f_row, at_row)])
        lv, main_w = solve_levels(top, main)
        for w, m in enumerate(members):
            at_row[w] = lv
            lw = narrow_levels(row_sum[w], f_row[w], lv)
            for j in m:
                at_rack[j] = lw
                applied[j] = narrow_levels(own[j], f_rack[j], lw)
        key = [(a.lam, tuple(sorted(a.shed.items()))) for a in applied]
        if key != last:
            settled, last = k, key
    n = len(cols["demand_w"])
    out = {k: np.zeros(n) for k in OUT}
    for nl, idx, lv in zip(nls, racks, applied):
        o = apply_levels(nl, lv)
        for k in out:
            out[k][idx] = o[k]
    return out, main_w, settled


def highs_of(cols, main, tree, f_rack, f_row):
    racks = [idx for row in tree for idx in row]
    n = len(cols["demand_w"])
    nls = [limits_of(cols, idx) for idx in racks]
    g = {k: np.zeros(n) for k in ("d", "lo", "hi", "link", "cap", "free", "w_dis", "w_chg")}
    for nl, idx in zip(nls, racks):
        for k, v in (("d", nl.d), ("lo", nl.lo), ("hi", nl.hi), ("link", nl.link), ("cap", nl.cap),
                     ("free", nl.free), ("w_dis", nl.w_dis), ("w_chg", nl.w_chg)):
            g[k][idx] = v
    groups = list(zip(racks, f_rack)) + [(np.concatenate(row), f) for row, f in zip(tree, f_row)]
    return reference(g["d"], g["lo"], g["hi"], g["link"], g["cap"], g["free"], cols["priority"], g["w_dis"],
                     g["w_chg"], groups, main)


def feeders(rng, cols, tree, share):
    """Feeders that bind: a fraction of each subtree's demand (some unbounded)."""
    d = cols["demand_w"]
    f_rack = [float(rng.uniform(*share) * d[idx].sum()) if rng.random() < 0.8 else math.inf
              for row in tree for idx in row]
    f_row = [float(rng.uniform(*share) * d[np.concatenate(row)].sum()) if rng.random() < 0.7 else math.inf
             for row in tree]
    return f_rack, f_row


def subtree_sums(out, tree):
    return ([out["bus_w"][idx].sum() for row in tree for idx in row],
            [out["bus_w"][np.concatenate(row)].sum() for row in tree])


def diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in ("served_w", "battery_w", "bus_w"))


def instance(seed, n=24, shortage=True):
    rng = np.random.default_rng(seed)
    cols, main = fleet(rng, n, shortage)
    cols["soc"] = rng.uniform(0.15, 1.0, n)  # above the reserve: a floor weight makes HiGHS's QP ill-conditioned
    cols["capacity_wh"] = rng.uniform(100, 5000, n)
    tree = tree_of(rng, n, 2, 3)
    return rng, cols, main, tree


@pytest.mark.parametrize("seed", range(4))
def test_reference_without_feeders_is_the_flat_allocator(seed):
    """The reference judges the tree: first it must give the flat allocator's answer when nothing binds."""
    _rng, cols, main, tree = instance(seed)
    inf = [math.inf] * 6
    ref = highs_of(cols, main, tree, inf, [math.inf, math.inf])
    assert diff(ref, flat(cols, main)) < TOL_W


@pytest.mark.parametrize("seed", range(11))
def test_feeders_three_levels_equal_the_reference(seed):
    rng, cols, main, tree = instance(seed, shortage=seed % 3 != 2)
    f_rack, f_row = feeders(rng, cols, tree, (0.05, 0.6))
    h, main_h, settled = compose(cols, main, tree, f_rack, f_row)
    assert settled < 10  # at rest before the last rounds
    racks_bus, rows_bus = subtree_sums(h, tree)
    for b, f in zip(racks_bus + rows_bus, f_rack + f_row):
        assert abs(b) <= f + 1e-9 * (1 + f)  # every feeder holds
    assert abs(h["bus_w"].sum() - main_h) < 1e-6 * (1 + abs(main_h))
    ref = highs_of(cols, main, tree, f_rack, f_row)
    assert abs(main_h - ref["main_w"]) < TOL_W
    assert diff(h, ref) < TOL_W, (diff(h, ref), ref["polished"])


def test_unbounded_feeders_change_nothing():
    rng, cols, main, tree = instance(5)
    h, _, _ = compose(cols, main, tree, [1e9] * 6, [1e9] * 2, rounds=4)
    assert diff(h, flat(cols, main)) < TOL_W


def test_import_limited_rack_sheds_its_own_least_critical_load():
    """Rack A (classes 0 and 3) behind a 300 W feeder, rack B (class 1) unbounded; 2 kW of main supply, no
    batteries: A's class 3 is shed whole, its class 0 takes its feeder; B's class 1 is served whole although
    it is less critical than A's class 0 (the rest of the tree keeps the common levels)."""
    cols = dict(demand_w=np.array([400.0, 200.0, 300.0, 300.0]), max_discharge_w=np.zeros(4),
                max_charge_w=np.zeros(4), link_max_w=np.full(4, 1000.0), soc=np.full(4, 0.5),
                capacity_wh=np.full(4, 1000.0), priority=np.array([0, 3, 1, 1]))
    tree = [[np.array([0, 1]), np.array([2, 3])]]
    h, main_h, _ = compose(cols, 2000.0, tree, [300.0, math.inf], [math.inf])
    assert h["served_w"].tolist() == pytest.approx([300.0, 0.0, 300.0, 300.0], abs=1e-9)
    assert main_h == pytest.approx(900.0)
    ref = highs_of(cols, 2000.0, tree, [300.0, math.inf], [math.inf])
    assert diff(h, ref) < TOL_W


def test_export_limited_rack_serves_its_own_less_critical_load():
    """Rack B's batteries (2 x 400 W) behind a 300 W feeder, no main supply: it exports its feeder's 300 W to
    rack A's class 0 and serves its own class 3 with the 500 W it cannot export, where the flat controller
    (no feeder) would send A all it can and leave B's class 3 only what is left."""
    cols = dict(demand_w=np.array([600.0, 400.0, 400.0]), max_discharge_w=np.array([0.0, 400.0, 400.0]),
                max_charge_w=np.zeros(3), link_max_w=np.full(3, 1000.0), soc=np.full(3, 0.5),
                capacity_wh=np.full(3, 1000.0), priority=np.array([0, 3, 3]))
    tree = [[np.array([0]), np.array([1, 2])]]
    h, _, _ = compose(cols, 0.0, tree, [math.inf, 300.0], [math.inf])
    assert h["served_w"].tolist() == pytest.approx([300.0, 250.0, 250.0], abs=1e-9)
    assert h["bus_w"][1:].sum() == pytest.approx(-300.0)
    f = flat(cols, 0.0)
    assert f["served_w"].tolist() == pytest.approx([600.0, 100.0, 100.0], abs=1e-9)
    assert diff(h, highs_of(cols, 0.0, tree, [math.inf, 300.0], [math.inf])) < TOL_W


def test_clip_is_the_clipped_function():
    rng = np.random.default_rng(3)
    w, a = rng.uniform(0, 5, 15), -rng.uniform(0, 100, 15)
    c = Curve.of(w, a, a + rng.uniform(0, 200, 15))
    for lo, hi in ((c.lo - 1, c.hi + 1), (c.lo + 30, c.hi - 40), (c(0.3), c(0.3)), (c.lo, c.lo + 1e-3)):
        k = c.clip(lo, hi)
        for x in np.linspace(-300, 300, 1201):
            assert k(x) == pytest.approx(min(max(c(x), lo), hi), abs=1e-9)


LEAF_WITH = ("hierarchy: {{uplink: {{port: 0, plaintext: true}}}}\nnodes: [{{id: a, demand_w: 1}}]\n"
             "programs:\n  - allocation: {{{key}: {value}}}\n  - tree\n")


@pytest.mark.parametrize("key, value", [("ramp_w_per_s", 500), ("restore_hold_s", 5), ("restore_margin", 0.05)])
def test_a_leaf_with_a_ramp_or_a_restore_hold_is_refused_with_its_line(key, value):
    """The tree's levels replace a leaf's allocation: its ramp or hold would be kept only in a fallback."""
    from vbatt.config.plant import load_config_text
    from vbatt.config.yamlsrc import ConfigError

    with pytest.raises(ConfigError) as e:
        load_config_text(LEAF_WITH.format(key=key, value=value), "rack.yaml")
    msg = str(e.value)
    assert f"rack.yaml:4: programs[0].allocation.{key}: {float(value)!r} on a leaf" in msg, msg
    load_config_text(LEAF_WITH.format(key=key, value=0), "rack.yaml")  # 0: accepted
    middle = LEAF_WITH.format(key=key, value=value).replace("  - tree\n", "")  # no uplink: no tree, no levels
    load_config_text(middle.replace("hierarchy: {uplink: {port: 0, plaintext: true}}\n", ""), "flat.yaml")


def test_feeders_in_real_processes(tmp_path):
    """Three levels (top, a row, 2 racks x 3 nodes), each its own `vbatt run`, real Modbus on 127.0.0.1: rack-00's
    feeder and the row's at a fraction of their demand (the top's main supply 0.35 of the demand: a shortage). At rest
    every feeder holds and the racks' nodes equal HiGHS on the flat problem with those limits, to 1e-6 W."""
    import json

    from vbatt.hierarchy.demo import Layout, Tree, _nodes, write_configs
    from vbatt.programs.hierarchy.curves import node_limits

    lay = Layout(rows=1, racks=2, nodes=3, seed=3, cycle_ms=50, poll_ms=100, share=0.35, lease_ms=4000)
    demand = {}
    for n in _nodes(lay):
        r, k = n["rack"]
        demand[f"rack-{r}{k}"] = demand.get(f"rack-{r}{k}", 0.0) + n["demand_w"]
        demand[f"row-{r}"] = demand.get(f"row-{r}", 0.0) + n["demand_w"]
    lay.feeder_w = {"rack-00": round(0.15 * demand["rack-00"], 3), "row-0": round(0.4 * demand["row-0"], 3)}
    plan = write_configs(tmp_path, lay)
    tree = Tree(plan, tmp_path)
    try:
        tree.start_all(flat=False)
        tree.settle([n for n in plan if n.startswith(("rack", "row"))], 40, 300)
    finally:
        tree.stop_all()
    racks = sorted(n for n in plan if n.startswith("rack"))
    snaps = {r: json.loads(open(plan[r]["snapshot"]).read())["nodes"] for r in racks}
    nodes = [x for r in racks for x in snaps[r]]
    col = lambda k: np.array([x[k] for x in nodes], float)  # noqa: E731
    nl = node_limits(col("priority").astype(int), col("demand_w"), col("lo_w"), col("hi_w"), col("link_max_w"),
                     col("soc"), col("capacity_wh"))
    at, groups = 0, []
    for r in racks:
        groups.append((np.arange(at, at + len(snaps[r])), lay.feeder_w.get(r, math.inf)))
        at += len(snaps[r])
    for w in range(lay.rows):
        idx = np.concatenate([g for (g, _f), r in zip(groups[:len(racks)], racks) if r.startswith(f"rack-{w}")])
        groups.append((idx, lay.feeder_w.get(f"row-{w}", math.inf)))
    main = json.loads(open(tmp_path / "plan.json").read())["main_limit_w"]
    ref = reference(nl.d, nl.lo, nl.hi, nl.link, nl.cap, nl.free, nl.prio, nl.w_dis, nl.w_chg, groups, main)
    tree_out = {k: col(k) for k in ("served_w", "battery_w", "bus_w")}
    for idx, f in groups:
        assert abs(tree_out["bus_w"][idx].sum()) <= f + 1e-6
    assert abs(tree_out["bus_w"][groups[0][0]].sum()) == pytest.approx(lay.feeder_w["rack-00"], abs=1e-6)  # binds
    print("real processes: largest node difference to HiGHS (W):", diff(tree_out, ref), "subtree bus / feeder (W):",
          [(round(float(tree_out["bus_w"][idx].sum()), 6), f) for idx, f in groups])
    assert diff(tree_out, ref) < TOL_W
