"""Energy across levels through a feeder, in process (docs/hierarchy.md "Energy across levels"): a subtree's
energy offer is narrowed by its feeder (programs/hierarchy/feeder_energy.py) as its curves are, so the
top's class runtime, reserve and reachability count the energy behind a feeder only as far as the feeder
carries it out (the rest is stranded for the rest of the tree, for the group's own loads only).

The leaves are real ScanEngines with the energy program and the `tree` program, the top the link's
TreeDecider, the decisions leased to the leaves each cycle as the link does. The state is one instant:
no battery draws between cycles (battery_w 0 before each), so the figures are a function of it and the
top's power runtime converges to its fixed point in a few cycles (a Newton step a cycle)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from hierarchy_energy import ENERGY, K, EnergyPlant, leaf_yaml, subset  # noqa: E402
from energy_plant import FleetSpec, fleet_yaml  # noqa: E402
from energy_reference import ride_through_lp  # noqa: E402

from vbatt.programs.energy.tree import T_AT
from vbatt.programs.hierarchy import classes as hc
from vbatt.programs.hierarchy.curves import Levels, Summary
from vbatt.programs.hierarchy.decisions import TreeDecider
from vbatt.programs.hierarchy.feeder import narrow_summary
from vbatt.programs.hierarchy.feeder_energy import narrow_energy

TARGETS = {0: 7200.0, 3: 0.0}
PROGRAMS = [{"energy": dict(ENERGY)}, "allocation"]  # power runtime on, a whole sweep a cycle
# rack B: the critical loads, 4 x 500 W of class 0 on 4 x 400 Wh usable (1,000 W discharge each)
B = dict(prio=[0] * 4, dem=[500.0] * 4, cap=[500.0] * 4, dis=[1000.0] * 4)


def _fleet(a: dict) -> tuple[FleetSpec, np.ndarray, np.ndarray]:
    """Rack A (`a`: most of the energy) then rack B, soc 0.9 (soc_min 0.1: 80 % usable), links 2,000 W."""
    n_a = len(a["prio"])
    f = FleetSpec(a["prio"] + B["prio"], a["dem"] + B["dem"], a["cap"] + B["cap"], [0.9] * (n_a + 4),
                  a["dis"] + B["dis"], [2000.0] * (n_a + 4))
    return f, np.arange(n_a), np.arange(n_a, n_a + 4)


def _run(f: FleetSpec, racks, feeders, flat_fleet: FleetSpec | None, cycles: int = 12, dt: float = 1.0,
         rows: list | None = None, targets: dict = TARGETS):
    """The tree (one leaf per rack, rack r behind feeders[r]; rows: (rack indices, row feeder) pairs, one row
    per rack without a feeder by default) and a flat controller over flat_fleet (f if None), main supply 0.
    Returns per cycle the top's rows and the flat's, and the top."""
    rows = rows if rows is not None else [([r], math.inf) for r in range(len(racks))]
    flat = EnergyPlant(fleet_yaml(flat_fleet if flat_fleet is not None else f, main_limit_w=0.0,
                                  ride_through_s=targets, programs=PROGRAMS, period_s=dt))
    leaves = [EnergyPlant(leaf_yaml(subset(f, i), 0.0, targets, dt, True, PROGRAMS)) for i in racks]
    top = TreeDecider(K, pace_s=dt, horizon_s=3600.0, power_on=True)
    dec, seen = None, []
    try:
        for _ in range(cycles):
            for p in leaves:
                p.n["battery_w"][:] = 0.0  # one instant: nothing drawn between cycles
                p.cycle()
            # each leaf's offer through its feeder (as its link puts it on its uplink), at the decisions it had
            lv = Levels({}, 0.0, True, dec)
            offers = [narrow_summary(Summary(energy=hc.offer_of(p.img.read_published()[0], K)), fw, lv).energy
                      for p, fw in zip(leaves, feeders)]
            offers = [narrow_summary(Summary(energy=hc.total([offers[r] for r in rs], K)), fw, lv).energy
                      for rs, fw in rows]
            # as the link: neutral decisions until the leaves' sums are swept at the tree's, then the rules
            dec = top.round(hc.total(offers, K), 0.0, dt)
            for p in leaves:  # as the leaf's link: the values, then the lease
                t = p.mem["energy.tree"]
                t[T_AT:T_AT + dec.size] = dec.reshape(-1)
                t[0] = math.inf
            if top.mode != "deciding":
                continue
            flat.n["battery_w"][:] = 0.0
            flat.cycle()  # its first cycle is the top's first round on the whole tree
            fr = {int(p): (float(flat.mem["energy.frac"][c]), int(flat.mem["energy.latched"][c]))
                  for c, p in enumerate(flat.mem["energy.priority"][:len(targets)])}
            seen.append(([dict(r) for r in top.rows], [r | dict(zip(("frac", "latched"), fr[r["priority"]]))
                                                       for r in flat.class_rows()]))
        return seen, top
    finally:
        flat.close()
        for p in leaves:
            p.close()


def test_energy_behind_a_tight_feeder_counts_for_the_tree_only_as_far_as_the_feeder_carries_it():
    """Rack A holds 20,000 Wh (one 500 W load of class 0, four 100 W of class 3) behind a 300 W feeder;
    rack B the rest of class 0 (2,000 W) on 1,600 Wh. The critical class rides through on B's energy
    plus what the feeder brings; A's own class 0 load takes A's energy without the feeder. Whatever the
    schedule, class 0 is served whole at most m* = 1,600 Wh / (2,000 - 300) W = 3,388.2 s (the cut at
    the feeder: A gives the rest of the tree at most 300 W). Before, the top summed A's energy as if the
    tree could take all of it: runtime 26,779.3 s, its 7,200 s target reachable, reserve 4,992.4 Wh (the
    flat controller's, which has no feeder). Now its power runtime is m*: runtime m*, reserve D_0 m*,
    unreachable; the reference LP with the feeder as a group row (a MIP, 60 steps of 120 s) agrees to one
    step. With the feeder unbounded the tree is the flat controller."""
    a = dict(prio=[0, 3, 3, 3, 3], dem=[500.0, 100.0, 100.0, 100.0, 100.0], cap=[5000.0] * 5, dis=[2000.0] * 5)
    f, ra, rb = _fleet(a)
    seen, top = _run(f, [ra, rb], [300.0, math.inf], None)
    rows, flat = seen[-1]
    m_star = 1600.0 * 3600.0 / (2000.0 - 300.0)
    r0 = rows[0]
    assert r0["priority"] == 0 and top.power_s[0] == pytest.approx(m_star, abs=1e-6)
    assert r0["runtime_s"] == pytest.approx(m_star, abs=1e-6), rows
    assert r0["reserve_wh"] == pytest.approx(2500.0 * m_star / 3600.0, abs=1e-6)
    assert not r0["reachable"]
    # the flat controller, which knows no feeder, counts A's energy for class 0 (the top's figure before)
    assert flat[0]["runtime_s"] > 7200.0 and flat[0]["reachable"], flat
    # the reference: the flat problem with the feeder's row (tests/energy_reference.py, groups)
    lp = ride_through_lp(f.priority, f.demand_w, f.usable_wh(), f.max_discharge_w, f.link_max_w, TARGETS, 60, 120.0,
                         whole=True, groups=[(ra, 300.0)])
    assert lp[0] < 7200.0 and abs(lp[0] - r0["runtime_s"]) <= 120.0, (lp, r0)
    # no feeder: nothing narrowed, the tree is the flat controller
    seen, _ = _run(f, [ra, rb], [math.inf, math.inf], None)
    rows, flat = seen[-1]
    for t, x in zip(rows, flat):
        assert t["priority"] == x["priority"]
        assert t["runtime_s"] == pytest.approx(x["runtime_s"], abs=1e-6)
        assert t["reserve_wh"] == pytest.approx(x["reserve_wh"], abs=1e-6)
        assert t["reachable"] == x["reachable"]


@pytest.mark.parametrize("feeder_w", [300.0, 1500.0])
def test_a_group_behind_its_feeder_is_to_the_top_what_one_node_behind_its_link_is_to_a_flat_controller(feeder_w):
    """A node is itself such a group (its link its feeder, docs/hierarchy.md "Feeder limits"). Rack A: four
    50 W loads of class 3 on 16,000 Wh behind the feeder; a flat controller over rack B and ONE node for
    rack A (its loads, energy and discharge summed, its link the feeder) counts A's energy by the node's
    rules (pooled within the horizon at its limits, its load's own use without the link). The top of the
    tree, on A's offer narrowed by its feeder, decides the same per class: runtime, reserve, reachability,
    share and latch, once both have taken their power runtime's steps. (Class 3, beyond its target behind
    the feeder, is shed by both when class 0's power runtime binds at 300 W: the rules count any draw
    against the reserve's margin; the LP would run it as long as class 0. Not the feeder's doing: the same
    for one node behind its link.)"""
    a = dict(prio=[3] * 4, dem=[50.0] * 4, cap=[5000.0] * 4, dis=[2000.0] * 4)
    f, ra, rb = _fleet(a)
    one = FleetSpec([3] + B["prio"], [200.0] + B["dem"], [20000.0] + B["cap"], [0.9] * 5, [8000.0] + B["dis"],
                    [feeder_w] + [2000.0] * 4)
    seen, top = _run(f, [ra, rb], [feeder_w, math.inf], one)
    for rows, flat in seen[-6:]:
        assert [t["priority"] for t in rows] == [x["priority"] for x in flat] == [0, 3]
        for t, x in zip(rows, flat):
            for key in ("runtime_s", "reserve_wh", "frac"):
                assert t[key] == pytest.approx(x[key], abs=1e-6), (key, rows, flat)
            assert t["reachable"] == x["reachable"] and t["latched"] == bool(x["latched"]), (rows, flat)
    rows = seen[-1][0]
    if feeder_w < 2000.0 - 1600.0 * 3600.0 / 7200.0:  # B's 1,600 Wh plus the feeder fall short of 7,200 s
        assert rows[0]["runtime_s"] == pytest.approx(1600.0 * 3600.0 / (2000.0 - feeder_w), abs=1e-6)
        assert not rows[0]["reachable"]
    else:
        assert rows[0]["reachable"]


def test_an_unbounded_or_a_loose_feeder_changes_no_energy_offer():
    """F = inf passes the offer through; the default feeder_w (1e9 W, finite) binds nowhere a fleet's limits
    reach: the offer bit for bit (the tree stays the flat controller)."""
    a = dict(prio=[0, 3, 3, 3, 3], dem=[500.0, 100.0, 100.0, 100.0, 100.0], cap=[5000.0] * 5, dis=[2000.0] * 5)
    f, ra, _rb = _fleet(a)
    p = EnergyPlant(leaf_yaml(subset(f, ra), 0.0, TARGETS, 1.0, True, PROGRAMS))
    try:
        for _ in range(3):
            p.cycle()
        o = hc.offer_of(p.img.read_published()[0], K)
    finally:
        p.close()
    assert not np.isnan(o[0, hc.C_PROBE_S]) and o[0, hc.C_DELIV] > 0.0  # a probe and a table to narrow
    assert narrow_energy(o, math.inf) is o
    np.testing.assert_array_equal(narrow_energy(o, 1e9), o)
    tight = narrow_energy(o, 300.0)
    assert tight[0, hc.C_PROBE_WH] < o[0, hc.C_PROBE_WH] and tight[:, hc.C_E].sum() < o[:, hc.C_E].sum()


def test_nested_feeders_compose():
    """Two racks of 16,000 Wh each (four 50 W loads of class 3) behind 300 W feeders, both in a row behind
    450 W; rack B (class 0, 2,000 W on 1,600 Wh) outside the row. The row passes up its racks' narrowed
    offers narrowed again: the rest of the tree gets at most min(450, 300 + 300) W of their energy, so
    class 0 lasts m* = 1,600 Wh / (2,000 - 450) W = 3,716.1 s (the reference LP with the three feeders'
    rows, measured 3,600 s: within one step). Without the row's feeder the racks give 600 W (4,114.3 s,
    the LP 4,080 s); without any feeder the top counted their energy whole: 50,333.3 s, reachable."""
    a = dict(prio=[3] * 8, dem=[50.0] * 8, cap=[5000.0] * 8, dis=[2000.0] * 8)
    f, ra, rb = _fleet(a)
    r1, r2 = ra[:4], ra[4:]
    seen, top = _run(f, [r1, r2, rb], [300.0, 300.0, math.inf], None, rows=[([0, 1], 450.0), ([2], math.inf)])
    m_star = 1600.0 * 3600.0 / (2000.0 - 450.0)
    r0 = seen[-1][0][0]
    assert r0["priority"] == 0 and r0["runtime_s"] == pytest.approx(m_star, abs=1e-6) and not r0["reachable"]
    assert r0["reserve_wh"] == pytest.approx(2000.0 * m_star / 3600.0, abs=1e-6)
    lp = ride_through_lp(f.priority, f.demand_w, f.usable_wh(), f.max_discharge_w, f.link_max_w, TARGETS, 60, 120.0,
                         whole=True, groups=[(r1, 300.0), (r2, 300.0), (ra, 450.0)])
    assert abs(lp[0] - m_star) <= 120.0, lp


def test_energy_behind_a_feeder_in_real_processes(tmp_path):
    """Three levels in real processes (a top, a row, 2 racks x 3 nodes, each its own `vbatt run`, real Modbus on
    127.0.0.1), main supply 0: rack-00 holds 48,000 Wh (three 50 W loads of class 3) behind a 300 W feeder, rack-01
    the critical class (3 x 500 W on 3 x 400 Wh). The top's class 0 runtime is the cut at the feeder on rack-01's
    energy when it stopped, E_B / (1,500 - 300) W (within 30 s: the answers take a few link rounds, the batteries
    drain meanwhile; measured 0.5 s), unreachable; the flat controller over the same nodes, which has no feeder,
    counts rack-00's energy (measured 28,776 s, reachable)."""
    import json

    import yaml

    from vbatt.hierarchy.demo import Layout, Tree, compare, write_configs

    lay = Layout(rows=1, racks=2, nodes=3, seed=3, cycle_ms=50, poll_ms=100, share=0.0, rest=False, lease_ms=4000,
                 ride_through_s={0: 7200, 3: 0}, feeder_w={"rack-00": 300.0})
    plan = write_configs(tmp_path, lay)
    rack_a = dict(priority=3, demand_w=50.0, capacity_wh=20000.0, soc=0.9, max_discharge_w=2000.0,
                  max_charge_w=2000.0, link_max_w=2000.0)
    rack_b = dict(priority=0, demand_w=500.0, capacity_wh=500.0, soc=0.9, max_discharge_w=1000.0,
                  max_charge_w=1000.0, link_max_w=2000.0)
    for name, targets in (("rack-00", {3: 0.0}), ("rack-01", {0: 7200.0}), ("flat", {0: 7200.0, 3: 0.0})):
        p = tmp_path / f"{name}.yaml"
        d = yaml.safe_load(p.read_text())
        for n in d["nodes"]:
            n.update(rack_a if n["id"].startswith("n-00") else rack_b)
        d["plant"]["ride_through_s"] = targets  # a config names present classes only
        p.write_text(yaml.safe_dump(d, sort_keys=False))
    tree = Tree(plan, tmp_path)
    try:
        tree.start_all(flat=True)
        tree.settle([n for n in plan if n.startswith(("rack", "row"))], 40, 300, decided_rounds=20, answers=10)
    finally:
        tree.stop_all()
    e = compare(plan)["energy"]
    snap = json.loads(open(plan["rack-01"]["snapshot"]).read())["nodes"]
    m_star = sum(n["capacity_wh"] * max(0.0, n["soc"] - 0.1) for n in snap) * 3600.0 / (1500.0 - 300.0)
    print("real processes, class 0 runtime behind a 300 W feeder:", e["0"]["runtime_s"], "closed form", m_star)
    assert abs(e["0"]["runtime_s"]["tree"] - m_star) <= 30.0, (e, m_star)
    assert not e["0"]["reachable"]["tree"]
    assert e["0"]["runtime_s"]["flat"] > 7200.0 and e["0"]["reachable"]["flat"], e


def test_random_fleets_behind_a_feeder_match_the_reference_lp():
    """12 seeded fleets of one class (target 7,200 s): 2 racks of 4 nodes, demand 100-500 W, rack A four times
    the energy, discharge 0.5-3 x and links 1-3 x the demand, rack A behind a feeder of 0-60 % of its demand.
    The top's class runtime (its power runtime through the narrowed probe, or its energy) is the reference LP's
    with the feeder's row (whole steps, 60 x 120 s) to one step (measured 0-102.5 s, the LP on its grid below);
    where the feeder binds, the flat controller (no feeder) says thousands of seconds more."""
    rng = np.random.default_rng(1)
    targets = {0: 7200.0}
    binds = 0
    for case in range(12):
        dem = rng.uniform(100, 500, 8)
        cap = rng.uniform(100, 1000, 8)
        cap[:4] *= 4
        dis = rng.uniform(0.5, 3, 8) * dem
        link = rng.uniform(1, 3, 8) * dem
        f = FleetSpec([0] * 8, dem, cap, rng.uniform(0.4, 0.95, 8), dis, link)
        ra, rb = np.arange(4), np.arange(4, 8)
        fw = float(rng.uniform(0.0, 0.6) * dem[:4].sum())
        seen, _ = _run(f, [ra, rb], [fw, math.inf], None, cycles=16, targets=targets)
        top, flat = seen[-1][0][0], seen[-1][1][0]
        lp = ride_through_lp(f.priority, f.demand_w, f.usable_wh(), f.max_discharge_w, f.link_max_w, targets, 60,
                             120.0, whole=True, groups=[(ra, fw)])
        assert abs(min(top["runtime_s"], 7200.0) - lp[0]) <= 120.0, (case, fw, top, lp)
        binds += flat["runtime_s"] > top["runtime_s"] + 1000.0
    assert binds >= 4, binds
