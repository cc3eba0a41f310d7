"""Energy across levels, in process (docs/hierarchy.md "Energy across levels"): the leaves' energy
offers, carried in the tree model and summed at each level, give the flat controller's demand, reserve
and runtime per class where the leaves' class states are the flat's; with the top's class decisions
leased to the leaves, the tree's runtime, served load and battery power per class are the flat's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from hierarchy_energy import EnergyPlant, leaf_yaml, demo_fleet, power_bound_fleet, subset, tree_vs_flat  # noqa: E402
from energy_plant import lp_gap_fleets  # noqa: E402

from vbatt.hierarchy.wire import TreeLayout
from vbatt.programs.energy.tree import D_FRAC, D_LATCHED, D_LEFT, D_N
from vbatt.programs.hierarchy import classes as hc
from vbatt.programs.hierarchy.curves import Levels, Summary
from vbatt.programs.hierarchy.decisions import TreeDecider


def test_the_energy_offer_survives_the_wire_and_the_sum():
    rng = np.random.default_rng(4)
    t = TreeLayout(8, 64)
    offers = []
    for _ in range(3):
        o = hc.empty(8)
        for p in (0, 1, 3):
            o[p] = (rng.uniform(0, 5e3), rng.uniform(0, 5e3), rng.uniform(0, 1e4), rng.choice([np.inf, 900.0]),
                    rng.uniform(0, 600), 600.0, 0.0, rng.uniform(0, 5e3), rng.uniform(0, 5e3), rng.uniform(0, 5e3),
                    rng.uniform(0, 1e4), 1.0, 1.0, float(rng.integers(0, 3)), 1200.0, rng.uniform(0, 1e4),
                    rng.uniform(-5e3, 5e3), rng.uniform(0, 2e3), rng.uniform(0, 2e3), rng.uniform(0, 1e3),
                    rng.uniform(0, 2e3))
        offers.append(o)
    offers[2][3, hc.C_PROBE_S] = 900.0  # one leaf still on an older question for class 3
    got = []
    for o in offers:
        head, _knots = t.encode_summary(Summary(energy=o), 1)
        got.append(t.decode_energy(head[t.head_len:]))
        np.testing.assert_array_equal(got[-1], o)  # float64 on the wire: bit for bit
    s = Summary.total([Summary(energy=g) for g in got])
    assert s.energy[0, hc.C_DNOW] == pytest.approx(sum(o[0, hc.C_DNOW] for o in offers), rel=1e-15)
    assert s.energy[3, hc.C_LOC] == min(o[3, hc.C_LOC] for o in offers)
    assert s.energy[2, hc.C_LEAVES] == 0.0 and s.energy[1, hc.C_LEAVES] == 3.0
    assert s.energy[1, hc.C_ABSENT] == sum(o[1, hc.C_ABSENT] for o in offers)  # missing children, every level
    for col in (hc.C_POOL, hc.C_PNEED, hc.C_PSLACK, hc.C_DELIV, hc.C_PROBE_WH, hc.C_PROBE_W, hc.C_REL, hc.C_YLD, hc.C_STR,
                hc.C_YLS):
        assert s.energy[1, col] == pytest.approx(sum(o[1, col] for o in offers), rel=1e-15)
    # the power probe: an answer where every leaf probed at the same m, none where one did not
    assert s.energy[1, hc.C_PROBE_S] == 1200.0 and np.isnan(s.energy[3, hc.C_PROBE_S])
    assert np.isnan(s.energy[2, hc.C_TARGET])  # a class no child has stays absent
    assert [r["priority"] for r in hc.rows(s.energy)] == [0, 1, 3]


def test_an_offer_of_another_format_or_with_a_probe_that_cannot_be_one_is_refused():
    """The parent reads a child's tree model only in its own layout (model length, Format, classes, knots),
    and refuses an energy offer whose power probe is not one, naming the class and what is expected (the
    link makes that the child's fault: its sums leave the tree's, as a child that does not answer)."""
    from vbatt.hierarchy.wire import FORMAT, TREE_ID

    t = TreeLayout(8, 64)
    o = hc.empty(8)
    o[2, [hc.C_PROBE_S, hc.C_PROBE_WH, hc.C_PROBE_W]] = (1200.0, 5e3, -3e3)
    head, _ = t.encode_summary(Summary(energy=o), 7)
    assert t.decode_head(head[:t.head_len])["seq"] == 7
    np.testing.assert_array_equal(t.decode_energy(head[t.head_len:]), o)
    t.check_length(TREE_ID, t.length)
    with pytest.raises(ValueError, match=r"tree model of \d+ registers, expected \d+ for 8 classes, 64 knots and "
                                         rf"format {FORMAT}"):
        t.check_length(TREE_ID, t.length - 4 * 4 * 8 - 4 * 3 * 8 - 1)  # format 1: no probe, no Format
    with pytest.raises(ValueError, match="no tree model 64252"):
        t.check_length(1, t.length)
    old = list(head)
    old[2] = FORMAT - 1
    with pytest.raises(ValueError, match=rf"tree model format {FORMAT - 1}, expected {FORMAT}"):
        t.decode_head(old[:t.head_len])
    for col, bad in ((hc.C_PROBE_S, -1.0), (hc.C_PROBE_S, np.inf), (hc.C_PROBE_WH, np.nan), (hc.C_PROBE_WH, -2.0),
                     (hc.C_PROBE_W, np.inf)):
        b = o.copy()
        b[2, col] = bad
        words, _ = t.encode_summary(Summary(energy=b), 8)
        with pytest.raises(ValueError, match="class 2: probe_s .* expected probe_s NaN \\(none\\) or a finite m"):
            t.decode_energy(words[t.head_len:])
    for col in (hc.C_REL, hc.C_YLD, hc.C_STR, hc.C_YLS):  # the powers the top sums for the class rules
        b = o.copy()
        b[2, col] = -1.0
        words, _ = t.encode_summary(Summary(energy=b), 8)
        with pytest.raises(ValueError, match=f"class 2: {hc.COLS[col]} -1.0: expected a finite power >= 0 W"):
            t.decode_energy(words[t.head_len:])


@pytest.mark.parametrize("links", [False, True], ids=["links-unbounded", "links-real"])
def test_tree_class_rows_equal_the_flat_controllers_when_the_class_states_agree(links):
    """No leaf short of main supply (the flat's case with main to spare): the summed offers are the flat
    controller's class sums, so demand, reserve and runtime per class are its own to rounding."""
    f = demo_fleet(links=links)
    r = tree_vs_flat(f, 1.2 * float(f.demand_w.sum()), share=False, decide="own", cycles=3)
    tree, flat = r.tree, r.flat
    assert [r["priority"] for r in tree] == [r["priority"] for r in flat] == [0, 1, 2, 3]
    for t, r in zip(tree, flat):
        assert t["demand_w"] == pytest.approx(r["demand_w"], abs=1e-6)
        assert t["reserve_wh"] == pytest.approx(r["reserve_wh"], abs=1e-6)
        if not links:  # every node pools its energy: the runtimes are the flat's
            assert t["runtime_s"] == pytest.approx(r["runtime_s"], abs=1e-6)
            assert t["reachable"] == r["reachable"]
    if links:
        # a node whose load exceeds its link locks its own energy for as long as its *controller's*
        # class runtime of the last cycle: a leaf's differs from the flat's, so the pooled energy of
        # such classes does (docs/hierarchy.md): measured, not hidden
        d = max(abs(t["runtime_s"] - r["runtime_s"]) for t, r in zip(tree, flat) if r["runtime_s"])
        assert 0.0 < d < 0.05 * max(r["runtime_s"] for r in flat if r["runtime_s"])


def test_leaves_on_their_share_of_the_feed_decide_classes_the_flat_controller_keeps():
    """The energy decisions are local today: a leaf whose share of the feed is 0 (its batteries cover
    its nodes) counts as riding through, runs its class clocks and sheds classes for energy that the
    flat controller, with main supply to spare, keeps (docs/hierarchy.md: what does not compose)."""
    f = demo_fleet(links=False)
    r = tree_vs_flat(f, 1.2 * float(f.demand_w.sum()), share=True, decide="own", cycles=3)
    t = {x["priority"]: x for x in r.tree}
    assert all(x["runtime_s"] > 0 for x in r.flat if x["priority"] < 3)
    assert any(t[p]["runtime_s"] == 0.0 for p in (1, 2)), r.tree


# With the links unbounded and main at 1.2 x demand the demo's batteries cannot carry classes 2-3 from the
# start (their discharge, 31.5 kW, is below the 58.5 kW of demand): their power runtime is 0, on the flat
# controller and at the top alike, checked every sweep just above 0 (rules.PROBE_FLOOR_S). Before, a probe
# at 0 read "none" and the flat estimate went back to the horizon every other sweep, where the tree's
# landed at 1e-255 and stayed: the two parted, and these cases ran with the power runtime off.


@pytest.mark.parametrize("links,main", [(False, 1.2), (True, 0.35)], ids=["links-unbounded", "demo-links-short"])
def test_with_the_tops_decisions_runtime_served_and_battery_per_class_are_the_flat_controllers(links, main):
    """The leaves on their share of the feed (rows 3-4 of the table in docs/hierarchy.md), but deciding by
    the top's class rules on the tree's summed offer: every cycle the top's runtime per class is the flat
    controller's, and from the first lease on (the first cycle decides on its own, before the top has
    decided) the tree's served load and battery power per class and per node are the flat's. A leaf
    takes the decisions one round late; the class shares here do not move after the first cycle (a
    share that moves would differ for that one cycle). 400 s of 20 s cycles: in the short case the
    clocks of classes 2 and 3 run (class 3 is capped in part)."""
    f = demo_fleet(links=links)
    r = tree_vs_flat(f, main * float(f.demand_w.sum()), share=True, decide="tree", cycles=20, dt_s=20.0)
    assert [x["priority"] for x in r.tree] == [x["priority"] for x in r.flat] == [0, 1, 2, 3]
    assert max(r.runtime_diff_s) < 1e-6, r.runtime_diff_s
    for t, x in zip(r.tree, r.flat):
        assert t["reserve_wh"] == pytest.approx(x["reserve_wh"], abs=1e-6)
        assert t["reachable"] == x["reachable"]
    # the rules did something here (not a case where any decision would do): the short case runs clocks
    if main < 1:
        assert r.tree[2]["clock_s"] == 400.0 and r.tree[3]["clock_s"] == 400.0 and r.tree[0]["clock_s"] == 0.0
        assert any(x["runtime_s"] and 0 < x["runtime_s"] < 7200 for x in r.flat)
    assert r.node_diff_w[0] > 1.0  # the first cycle, before any lease: the leaves' own decisions (today's tree)
    for k in range(1, len(r.served)):
        assert r.node_diff_w[k] < 1e-6, (k, r.node_diff_w)
        np.testing.assert_allclose(r.served[k][0], r.served[k][1], atol=1e-6, rtol=0)
        np.testing.assert_allclose(r.battery[k][0], r.battery[k][1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("lag", [0, 2])
def test_the_power_runtime_composes_across_levels(lag):
    """The power runtime (docs/energy.md: a class ends where the batteries' power, not their energy, can no
    longer carry it) on a plant where it binds: class 0's energy would last ~2,322 s, its power ~1,745 s.
    The top asks its estimate m with its decisions, every leaf probes its nodes there with the flat
    kernel's own probe, the sums come up, and the top takes the flat controller's Newton step on them.
    Leaves taking the decisions in the next cycle (lag 0, as the flat's next sweep): runtime, reserve
    and the power runtime per class are the flat's to rounding (1e-6 s; measured 2.2e-12 s) at every
    cycle, and the served load and battery power at every node from the first lease on. Two cycles later
    (lag 2: an answer every third round, the question held until then) the estimate trails the flat's
    moving one: within 0.1 % of the runtime (measured 0.46 s of 1,745 s on 20 s cycles)."""
    f = power_bound_fleet()
    r = tree_vs_flat(f, 0.3 * float(f.demand_w.sum()), share=True, decide="tree", cycles=20, dt_s=20.0, lag=lag)
    assert [x["priority"] for x in r.tree] == [x["priority"] for x in r.flat] == [0, 1, 2, 3]
    # the power runtime binds: class 0 ends where its power does, far before its target and its energy
    assert 1500.0 < r.flat_power_s[0] < 2000.0 and r.flat[0]["runtime_s"] == pytest.approx(r.flat_power_s[0], abs=25)
    assert not r.flat[0]["reachable"] and r.flat[1]["runtime_s"] > 0.0
    # The shortage is there from the start: the rules cut nothing until the power runtime settles (rules.settle,
    # the same sweep on the flat controller and at the top), then the shares move once; the leaves take them
    # 1 + lag rounds later, and only those rounds differ.
    flat_frac = [fl for _, fl in r.fracs]
    moved = [k for k in range(1, len(flat_frac)) if not np.array_equal(flat_frac[k], flat_frac[k - 1])]
    assert len(moved) == 1 and 1 <= moved[0] <= 10, moved
    late = set(range(moved[0], moved[0] + 1 + lag))
    tol = 1e-6 if lag == 0 else 1e-3 * r.flat[0]["runtime_s"]
    assert max(d for k, d in enumerate(r.runtime_diff_s) if k not in late) < tol, r.runtime_diff_s
    for t, x in zip(r.tree, r.flat):
        assert t["reserve_wh"] == pytest.approx(x["reserve_wh"], abs=1e-6 if lag == 0 else 1e-3 * x["reserve_wh"])
        assert t["reachable"] == x["reachable"]
    if lag == 0:
        np.testing.assert_allclose(r.top_power_s, r.flat_power_s, rtol=1e-12, atol=1e-6)
        for k in range(1, len(r.served)):
            assert k in late or r.node_diff_w[k] < 1e-6, (k, r.node_diff_w)


@pytest.mark.parametrize("seed,index,cycles,dt", [(11, 0, 20, 60.0), (42, 13, 90, 10.0)], ids=["seed11-0", "seed42-13"])
def test_a_class_power_shortfall_composes_across_levels(seed, index, cycles, dt):
    """A class on the batteries alone whose importers ask more of the bus than the exporters give lifts its
    own nodes' own-need locks (docs/energy.md, kernel._release; the two fleets of test_energy's
    SHORTFALL_FLEETS, main supply 0, split in two leaves). The top decides it on the tree's sums (the power
    need before any lock is lifted and the power the locks could add, both offered) and sends the share
    down: it is the flat controller's at every cycle (measured 2.2e-16), and so are the runtimes (3.4e-13 s).
    Each leaf deciding its own from its own sums (before) is not: the runtimes part by 3.1 s and 21.4 s."""
    f, targets = lp_gap_fleets(seed, (1.0, 3.0, 0.5, 2.0), index + 1)[index]
    assert len(f) % 2 == 0
    kw = dict(share=True, decide="tree", cycles=cycles, dt_s=dt, racks=2, rows=1, targets=targets)
    r = tree_vs_flat(f, 0.0, **kw)
    flat_q = np.array([a for a, _ in r.release])
    top_q = np.array([b for _, b in r.release])
    assert flat_q.max() > 0.05, flat_q.max(axis=0)  # the rule binds
    np.testing.assert_allclose(top_q, flat_q, rtol=0, atol=1e-9)
    # what the locks hold beyond their classes' targets, given to a class short of power: the flat's too
    flat_y, top_y = np.array([a for a, _ in r.yields]), np.array([b for _, b in r.yields])
    np.testing.assert_allclose(top_y, flat_y, rtol=0, atol=1e-9)
    assert seed != 42 or flat_y.max() > 0.05, flat_y.max(axis=0)  # it binds there (640 s: classes 1 and 2 take it)
    assert max(r.runtime_diff_s) < 1e-6, r.runtime_diff_s
    own = tree_vs_flat(f, 0.0, **kw, release=False)
    assert max(own.runtime_diff_s) > 1.0, own.runtime_diff_s


def test_without_the_power_runtime_at_the_top_the_tree_is_not_the_flat_controller():
    """The same plant with the power runtime off at the top and the leaves (the tree before it composed it)
    against the flat controller with it on: the tree counts class 0's energy, not its power."""
    f = power_bound_fleet()
    on = tree_vs_flat(f, 0.3 * float(f.demand_w.sum()), share=True, decide="tree", cycles=3, dt_s=20.0)
    off = tree_vs_flat(f, 0.3 * float(f.demand_w.sum()), share=True, decide="tree", cycles=3, dt_s=20.0, power=False)
    assert off.tree[0]["runtime_s"] > on.flat[0]["runtime_s"] + 500.0, (off.tree[0], on.flat[0])


def _moving_profiles(f, racks: int = 9, period_s: float = 1600.0) -> list[dict]:
    """Every node's demand a sine of 15 % of it over period_s, each rack at its own phase: a rack's class
    demand rises while another's falls, and the tree's class demand moves (the forecast is not the
    demand now)."""
    per = len(f) // racks
    return [{"kind": "sine", "amplitude_w": 0.15 * float(d), "period_s": period_s,
             "phase_s": -period_s * (i // per) / racks} for i, d in enumerate(f.demand_w)]


@pytest.mark.parametrize("links,main", [(False, 1.2), (True, 0.35)], ids=["links-unbounded", "demo-links-short"])
def test_with_the_class_forecast_the_tops_reserve_and_runtime_are_the_flat_controllers(links, main):
    """The energy program's default, the class demand forecast, on everywhere while the demand moves (each
    rack at its own phase). The top forecasts the tree's summed class demand now, at the round's wall time,
    with the same functions a flat controller runs on its own sum: its reserve's demand, reserve, runtime
    and share per class are the flat's every cycle, to the rounding of the sums' order (1e-6: measured
    6e-12 s and 8e-16). Served load and battery power per class: the flat's to 1e-6 W where no share
    moves (main to spare); in the short case the shares follow the moving demand and a leaf applies them
    one round late (docs/hierarchy.md), so within 0.1 % of the class demand (measured 7.1e-4, 8.2 W).
    The leaves' own forecasts summed (what the top used before) are not the flat's: a forecast is not
    additive (its floor, never below the demand now, taken per leaf)."""
    f = demo_fleet(links=links)
    r = tree_vs_flat(f, main * float(f.demand_w.sum()), share=True, decide="tree", cycles=20, dt_s=20.0,
                     forecast=True, profiles=_moving_profiles(f))
    assert [x["priority"] for x in r.tree] == [x["priority"] for x in r.flat] == [0, 1, 2, 3]
    assert max(r.runtime_diff_s) < 1e-6, r.runtime_diff_s
    for t, x in zip(r.tree, r.flat):
        assert t["demand_horizon_w"] == pytest.approx(x["demand_horizon_w"], abs=1e-6)
        assert t["reserve_wh"] == pytest.approx(x["reserve_wh"], abs=1e-6)
        assert t["reachable"] == x["reachable"]
    for top, fl in r.fracs:
        np.testing.assert_allclose(top, fl, atol=1e-9, rtol=0)
    for k in range(1, len(r.served)):
        tol = 1e-6 if main > 1 else 1e-3 * np.array([x["demand_w"] for x in r.flat])
        if main > 1:
            assert r.node_diff_w[k] < 1e-6, (k, r.node_diff_w)
        assert (np.abs(r.served[k][0] - r.served[k][1]) <= tol).all(), (k, r.served[k])
        assert (np.abs(r.battery[k][0] - r.battery[k][1]) <= tol).all(), (k, r.battery[k])
    # the forecast mattered: the reserve's demand is not the demand now, and the leaves' forecasts summed
    # (the top's input before) would have been another reserve
    assert max(abs(x["demand_horizon_w"] - d) for x, d in zip(r.flat, r.flat_dres)) > 10.0, r.flat
    assert max(abs(x["demand_horizon_w"] - d) for x, d in zip(r.flat, r.leaves_dhz)) > 10.0, r.leaves_dhz


def test_the_decisions_travel_with_the_levels_bit_for_bit():
    """The parent writes the decisions block, then the levels with Decided = 1; a child decodes both from its
    uplink's registers. Levels without decisions (a parent without energy offers) say Decided = 0."""
    t = TreeLayout(8, 64)
    dec = np.full((8, D_N), np.nan)
    dec[[0, 1, 3]] = [[1.0, 0.0, 7200.0, 7200.0, 1.0, 7200.0, 3600.0, 0.0, 0.0, 7200.0],
                      [0.25, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1800.0],
                      [0.6355, 0.0, 0.0, np.inf, 1.0, 0.0, 1234.5, 0.375, 0.125, 0.0]]
    lv = Levels({0: -np.inf, 1: 0.5, 3: np.inf}, 1.5e-6, True, dec)
    regs = np.zeros(t.levels_len + t.dec_len, int)
    regs[:t.levels_len] = t.encode_levels(lv, 9, 1000)
    regs[t.dec_at - t.levels_at:] = t.encode_decisions(dec)
    seq, lease, got = t.decode_levels(regs.tolist())
    assert (seq, lease, got.lam, got.dis) == (9, 1000, lv.lam, True)
    assert [got.mu(c) for c in range(8)] == [lv.mu(c) for c in range(8)]
    np.testing.assert_array_equal(got.energy, dec)  # NaN rows included
    seq, _, bare = t.decode_levels(t.encode_levels(Levels(lv.shed, lv.lam, True), 10, 1000) + [0] * t.dec_len)
    assert bare.energy is None


def _one_of_three_rows() -> tuple[np.ndarray, np.ndarray, float]:
    """The offer of one of three equal rows of the demo (one leaf each), the whole tree's, and the top's
    main supply (0.35 x demand: class 1 peak-shaved, the clocks of classes 2 and 3 run)."""
    one = hc.empty(8)
    for p, (d, e, t, pn) in enumerate([(14049.5, 8972.0, 7200.0, 14000.0), (15882.1, 11005.0, 1800.0, 15800.0),
                                       (10674.8, 6783.0, 600.0, 10600.0), (18033.6, 13390.0, 0.0, 18000.0)]):
        one[p] = (d, 0.96 * d, e, np.inf if p != 1 else 0.0, t, t, 0.0, 0.96 * d, pn, 7500.0, 5.0 * e, 1.0, 1.0, 0.0,
                  np.nan, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    one /= 3.0
    one[:, [hc.C_LOC, hc.C_LEFT, hc.C_TARGET, hc.C_LATCHED, hc.C_LEAVES, hc.C_ON_TREE]] *= 3.0
    full = hc.total([one, one, one], 8)
    return one, full, 0.35 * float(full[:4, hc.C_DNOW].sum())


def test_a_child_coming_online_is_not_a_rise_of_the_reserve():
    """The summed reserve jumps when a child's sums join the total; the energy program's margin for the
    reserve's rise (its surprises fade over an hour) must not take that for demand (the demo: while its
    rows came online one by one, the top held back a peak-shaved class and the classes beyond their
    targets: served 32 kW of the flat's 52 kW)."""
    one, full, main_w = _one_of_three_rows()
    steady, late = TreeDecider(8), TreeDecider(8)
    late.step(one, main_w, 0.2)  # only the first row online yet
    for _ in range(5):
        want = steady.step(full, main_w, 0.2)
        got = late.step(full, main_w, 0.2)
    np.testing.assert_allclose(got[:4, D_FRAC], want[:4, D_FRAC], rtol=0, atol=1e-9)
    assert want[1, D_FRAC] == pytest.approx(1.0) and 0.0 < want[3, D_FRAC] < 1.0  # main, then the batteries


def test_a_leaf_has_every_class_of_the_tree_also_after_a_parameter_reload():
    """The top checks the deliverable energy within every class's remaining target: a leaf sums it for
    the tree's classes it has no node of too (demand 0), and keeps them when its program is built
    again without the configuration (a parameter reload binds it to the same memory)."""
    from vbatt.programs.energy import Energy

    f = demo_fleet(links=True)
    sub = np.flatnonzero(f.priority != 3)[:12]  # a leaf without class 3
    p = EnergyPlant(leaf_yaml(subset(f, sub), 1e4, {0: 7200.0, 1: 1800.0, 2: 600.0}, 1.0, True))
    try:
        p.cycle()
        assert p.mem["energy.priority"][:9].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, -1]
        e = next(x for x in p.eng.programs if x.id == "energy")
        Energy(e.params, e.n).bind(p.img, p.eng.ctx)  # built again, not configured
        assert p.mem["energy.priority"][:9].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, -1]
        o = hc.offer_of(p.img.read_published()[0], 8)
        assert np.isnan(o[3, hc.C_TARGET]) and o[3, hc.C_LEAVES] == 1.0  # no node of class 3 here
    finally:
        p.close()


def test_the_top_decides_only_on_the_whole_tree_at_its_decisions():
    """In real processes the top latched class 2, which the flat controller keeps, on the first round whose
    leaves all said "on the tree's decisions" while one leaf's sums still came from a sweep at its own class
    state (docs/hierarchy.md "Energy across levels"). Before the first whole round (every configured child
    present, every leaf's sums the tree's) the top sends neutral decisions and starts no clock; its first
    whole round is the flat controller's first cycle; after it, a round that is not whole holds the last
    decisions and its time goes on the clocks at the next step; a late round runs the rules at the link's
    pace."""
    one, full, main_w = _one_of_three_rows()
    part = hc.total([one, one], 8)
    part[:, hc.C_ABSENT] = 1.0  # a row still joining (its parent counts it missing)
    own = full.copy()
    own[:, hc.C_ON_TREE] -= 1.0  # one leaf's sums swept at its own class state
    top, flat = TreeDecider(8, pace_s=0.1), TreeDecider(8, pace_s=0.1)
    for o in (part, own, part):
        dec = top.round(o, main_w, 0.1)
        assert top.mode == "waiting" and top.clean_rounds == 0
        assert (dec[:4, D_FRAC] == 1.0).all() and not dec[:4, D_LATCHED].any() and np.isnan(dec[4:, D_FRAC]).all()
        np.testing.assert_array_equal(dec[:4, D_LEFT], [7200.0, 1800.0, 600.0, 0.0])  # every target whole
    assert not top.clock_s.any()
    want = flat.step(full, main_w, 0.1)
    got = top.round(full, main_w, 0.1)
    assert top.mode == "deciding" and top.clean_rounds == 1
    np.testing.assert_array_equal(got, want)
    assert 0.0 < want[3, D_FRAC] < 1.0 and top.clock_s[2] == pytest.approx(0.1)  # the rules did something
    held = top.round(own, main_w, 0.4)  # a leaf back from a fallback: its sums are its own for a sweep
    assert top.mode == "held" and top.clean_rounds == 0
    np.testing.assert_array_equal(held, got)
    flat.step(full, main_w, 0.1)
    got = top.round(full, main_w, 2.6)  # late on a loaded machine: 2.6 s since the last round
    want = flat.step(full, main_w, 0.2)  # the rules at twice the link's pace at most ...
    np.testing.assert_allclose(got[:4, D_FRAC], want[:4, D_FRAC], rtol=0, atol=1e-12)
    assert top.clock_s[2] == pytest.approx(0.1 + 0.4 + 2.6)  # ... the clocks by all the time, held included
    # a child gone for good: after wait_s the rules run on the rest
    gone = TreeDecider(8, pace_s=0.1, wait_s=1.0)
    gone.round(full, main_w, 0.1)
    for _ in range(3):
        gone.round(part, main_w, 0.4)
    assert gone.mode == "partial"


def test_a_leafs_sums_are_the_trees_only_when_swept_wholly_under_the_lease():
    """A leaf sweeps its nodes over several cycles and a node's part of the sums depends on its class state
    (the latch, the own-need lock): the sums of a sweep begun before the lease are the leaf's own, so
    the program says "on the tree" (energy.tree[T_USED]) only after a whole sweep under the lease, and
    no longer as soon as the lease lapses."""
    import yaml

    from vbatt.programs.energy.rules import ST_POS
    from vbatt.programs.energy.tree import D_REACHABLE, D_RUNTIME, T_AT, T_USED

    f = demo_fleet(links=True)
    d = yaml.safe_load(leaf_yaml(subset(f, np.arange(12)), 1e4, {0: 7200.0, 1: 1800.0, 2: 600.0, 3: 0.0}, 1.0, True))
    d["programs"][0]["energy"]["sweep_s"] = 3.0  # a sweep of 3 cycles
    p = EnergyPlant(yaml.safe_dump(d, sort_keys=False))
    try:
        t, pos = p.mem["energy.tree"], lambda: int(p.mem["energy.state"][ST_POS])
        p.cycle()
        while pos() != 4:  # one cycle into a sweep
            p.cycle()
        for prio, target in enumerate((7200.0, 1800.0, 600.0, 0.0)):  # neutral decisions, leased
            j = T_AT + D_N * prio
            t[j:j + D_N] = (1.0, 0.0, target, target, 1.0, target, 0.0, 0.0, 0.0, target)
            assert D_RUNTIME == 3 and D_REACHABLE == 4
        t[0] = np.inf
        seen = []
        for _ in range(7):
            p.cycle()
            seen.append((pos(), float(t[T_USED])))
        # the sweep under way ends at the leaf's own sums; the next one, wholly under the lease, is the tree's
        assert seen == [(8, 0.0), (0, 0.0), (4, 0.0), (8, 0.0), (0, 1.0), (4, 1.0), (8, 1.0)], seen
        t[0] = 0.0  # the lease lapses
        p.cycle()
        assert t[T_USED] == 0.0
    finally:
        p.close()


@pytest.mark.parametrize("tree_target_s", [7200.0, 0.0], ids=["tree-with-a-target", "tree-without-targets"])
def test_a_leaf_without_targets_of_its_own_takes_the_trees_caps(tree_target_s):
    """A leaf whose own classes all have target 0 (a rack of class 3 only) is under the tree's class rules
    when the tree has a target somewhere (class 0's on another rack), as the flat controller over the same
    nodes is: the top latched class 3 at share 0, so its nodes serve nothing. Before, the leaf counted only
    its own targets, found none and served class 3 whole (in real processes a rack of class 3 served 50 W
    a node while the top had class 3 latched). Where the tree has no target at all, its caps are not
    applied, as a flat controller without targets (today's allocation)."""
    from vbatt.programs.energy.tree import D_TARGET, T_AT

    f = demo_fleet(links=True)
    idx = np.flatnonzero(f.priority == 3)[:6]
    p = EnergyPlant(leaf_yaml(subset(f, idx), 1e4, {3: 0.0}, 1.0, True))
    try:
        t = p.mem["energy.tree"]
        p.cycle()
        assert (p.n["served_w"] > 0.0).all()  # on its own: served whole
        row = np.full(D_N, 0.0)
        row[[D_FRAC, D_LATCHED]] = 1.0, 0.0
        for prio, target in ((0, tree_target_s), (3, 0.0)):
            row[D_LEFT] = row[D_TARGET] = target
            t[T_AT + D_N * prio:T_AT + D_N * (prio + 1)] = row
        t[T_AT + D_N * 3 + D_FRAC], t[T_AT + D_N * 3 + D_LATCHED] = 0.0, 1.0  # the top shed class 3
        t[0] = np.inf
        for _ in range(3):
            p.cycle()
        if tree_target_s > 0.0:
            assert (p.n["served_w"] == 0.0).all(), p.n["served_w"]
        else:
            np.testing.assert_allclose(p.n["served_w"], p.n["demand_w"], rtol=1e-9)
    finally:
        p.close()
