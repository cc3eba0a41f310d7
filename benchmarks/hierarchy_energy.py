"""Runtime, served load and battery power per class of a tree of controllers against the flat controller,
in process (docs/hierarchy.md "Energy across levels").

180 nodes of the demo fleet (runtime/hierarchy/demo.py, seed 1, real capacities) in 9 leaves of 20, each
a real ScanEngine running the energy program and the allocation over its own nodes; their energy offers
summed (3 rows, then the top: programs/hierarchy/classes.py), and the tree's allocation composed from the
leaves' limits by curves and levels (programs/hierarchy/curves.py, as tests/test_hierarchy_exact.py),
against a flat controller over the same nodes. The leaves' batteries are moved as the flat controller's
(the tree's allocation is the flat one when the energy decisions agree; this keeps the two on the same
physics so that every cycle compares like with like).

Each leaf's main_limit_w is either its share of the feed (its import under the tree's levels: what the
link sets) or so large that no leaf is short ("no shortage": the flat's class state with main to spare).
Its energy program decides either on its own (`own`: today's tree before the decisions were carried) or
takes the top's decisions (`tree`: programs/hierarchy/decisions.py, leased to every leaf as the link
does, energy memory `tree`; the top runs the class rules on the tree's summed offer with its main limit).

The top decides on the leaves' sums of cycle k, which were taken at the decisions of cycle k-1: its
decisions are the flat controller's of the same cycle. A leaf applies them in its next cycle (as through
the link: one round later), so its caps lag the flat's by one cycle while a class's share moves.

    .venv/bin/python benchmarks/hierarchy_energy.py [cycles] [dt_s]
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from energy_plant import EnergyPlant, FleetSpec, fleet_yaml  # noqa: E402

from vbatt.kernel.program import Ctx  # noqa: E402
from vbatt.programs.codes import Alarm  # noqa: E402
from vbatt.programs.energy import EnergyParams  # noqa: E402
from vbatt.programs.energy.kernel import NX_RQ, NX_YQ, horizon_params  # noqa: E402
from vbatt.programs.energy.tree import D_RELEASE, D_YIELD, T_AT  # noqa: E402
from vbatt.programs.hierarchy import classes as hc  # noqa: E402
from vbatt.programs.hierarchy.curves import (Summary, apply_levels, battery_summary, node_limits,  # noqa: E402
                                             served, solve_levels, summarize)
from vbatt.programs.hierarchy.decisions import TreeDecider  # noqa: E402

TARGETS = {0: 7200.0, 1: 1800.0, 2: 600.0, 3: 0.0}
# forecast=True: the class demand forecast on (its default); power=True: the power runtime on (its default; the
# top asks the leaves' probe of A(m) at its estimate: programs/hierarchy/decisions.py).
ENERGY = {"demand_forecast": False, "sweep_s": 0, "power_runtime": True}
PROGRAMS = [{"energy": ENERGY}, "allocation"]
K = 8  # hierarchy.classes
_SAFE = int(Alarm.SAFE_ALLOCATION)


def demo_fleet(seed: int = 1, n: int = 180, links: bool = True) -> FleetSpec:
    """The demo's node draws (runtime/hierarchy/demo.py _nodes, rest=False), in its order."""
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("prio", "dem", "dis", "chg", "cap", "soc", "link")}
    for _ in range(n):
        cols["cap"].append(float(rng.uniform(300, 900)))
        cols["prio"].append(int(rng.integers(0, 4)))
        cols["dem"].append(float(rng.uniform(200, 450)))
        cols["dis"].append(float(rng.uniform(50, 300)))
        cols["chg"].append(float(rng.uniform(100, 300)))
        cols["soc"].append(float(rng.uniform(0.3, 0.95)))
        cols["link"].append(float(rng.choice([300.0, 800.0, 1500.0])) if links else 1e6)
    return FleetSpec(cols["prio"], cols["dem"], cols["cap"], cols["soc"], cols["dis"], cols["link"], cols["chg"])


def power_bound_fleet(seed: int = 1) -> FleetSpec:
    """The demo's nodes (demands, classes, states of charge; links unbounded) with the energy where the power
    is not: every fifth node holds 3,000 Wh behind a 50 W discharge limit, the others 100 Wh behind 1,000 W.
    The batteries can carry every class at first (155 kW of discharge for 58 kW of demand), but class 0
    (target 7,200 s) only for ~1,745 s, long before its pooled energy runs out (~2,322 s with main at
    0.3 x demand): the power runtime binds (rules.power_runtime), and class 1's reserve ends there too."""
    f = demo_fleet(seed, links=False)
    big = np.arange(len(f)) % 5 == 0
    return FleetSpec(f.priority, f.demand_w, np.where(big, 3000.0, 100.0), f.soc, np.where(big, 50.0, 1000.0),
                     f.link_max_w, f.max_charge_w)


def subset(f: FleetSpec, idx) -> FleetSpec:
    return FleetSpec(f.priority[idx], f.demand_w[idx], f.capacity_wh[idx], f.soc[idx], f.max_discharge_w[idx],
                     f.link_max_w[idx], f.max_charge_w[idx])


def leaf_yaml(f: FleetSpec, main_w: float, targets: dict, dt_s: float, tree: bool, programs: list = PROGRAMS,
              profiles: list | None = None) -> str:
    here = set(int(p) for p in f.priority)  # a config names present classes only
    text = fleet_yaml(f, main_limit_w=main_w, ride_through_s={p: t for p, t in targets.items() if p in here},
                      programs=programs + (["tree"] if tree else []), period_s=dt_s, profiles=profiles)
    if not tree:
        return text
    d = yaml.safe_load(text)  # a leaf of a tree (its link is not started here: the harness is the link)
    d["hierarchy"] = {"uplink": {"port": 0, "plaintext": True}, "classes": K}
    return yaml.safe_dump(d, sort_keys=False)


@dataclass
class Result:
    tree: list[dict]  # the tree's class rows (the top's decisions, or the summed offer's view)
    flat: list[dict]  # the flat controller's
    # per cycle, per class (priority order of the flat): served and battery power, tree and flat
    served: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    battery: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    node_diff_w: list[float] = field(default_factory=list)  # largest node difference of served or battery
    runtime_diff_s: list[float] = field(default_factory=list)  # largest class runtime difference (top vs flat)
    fracs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # per cycle: the top's, the flat's
    # at the last cycle, per class of the flat: its reserve's demand now (before the class forecast), and
    # the leaves' own reserve demands (their forecasts) summed
    flat_dres: list[float] = field(default_factory=list)
    leaves_dhz: list[float] = field(default_factory=list)
    # at the last cycle, per class of the flat: its power runtime (s from now; inf: none binds), the top's
    flat_power_s: list[float] = field(default_factory=list)
    top_power_s: list[float] = field(default_factory=list)
    # per cycle, per class of the flat: the share of its own-need locks' power released (kernel._release),
    # the flat's and the top's
    release: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    yields: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # as release, the shares yielded


def _tree_allocation(leaves, main_w: float):
    """The tree's allocation composed from the leaves' limits (curves up, levels down; two rounds: the shed
    levels, then the battery level at their served load), per leaf node: served_w and battery_w."""
    nls, base, uses = [], [], []
    for p in leaves:
        n = p.n
        use = (n["online"] != 0) & (n["trip"] == 0) & ((n["alarm"].astype(np.int64) & _SAFE) == 0)
        a = p.cfg.programs[[e.id for e in p.cfg.programs].index("allocation")].params
        nl = node_limits(n["priority"][use], n["demand_w"][use], n["lo_w"][use], n["hi_w"][use],
                         n["link_max_w"][use], n["soc"][use], n["capacity_wh"][use], n["serve_max_w"][use],
                         soc_min=a.soc_min, soc_max=a.soc_max)
        nls.append(nl)
        base.append(summarize(nl))
        uses.append(use)
    lv0, _ = solve_levels(Summary.total(base), main_w)
    full = [battery_summary(nl, b, served(nl, lv0)) for nl, b in zip(nls, base)]
    lv1, _ = solve_levels(Summary.total(full), main_w, lv0)
    out = []
    for p, nl, use in zip(leaves, nls, uses):
        o = apply_levels(nl, lv1)
        s, b = p.n["served_w"].copy(), p.n["battery_w"].copy()
        s[use], b[use] = o["served_w"], o["battery_w"]
        out.append((s, b))
    return out


def tree_vs_flat(f: FleetSpec, main_w: float, *, share: bool, decide: str, cycles: int = 5, dt_s: float = 1.0,
                 racks: int = 9, rows: int = 3, targets=TARGETS, lag: int = 0,
                 own_physics: bool = False, forecast: bool = False, profiles: list | None = None,
                 power: bool = True, release: bool = True) -> Result:
    """share: the leaves' main_limit_w is their share of the feed (else no leaf is short); decide: "own" or
    "tree" (module doc); lag: the leaves take the top's decisions this many cycles later than the next;
    forecast: every energy program (flat, leaves, the top's) forecasts the class demand (its default);
    profiles: per node, its demand profile (the same in the tree and the flat controller); power: every energy
    program (and the top) runs the power runtime; release: the leaves take the top's power shortfall (the share
    of their own-need locks lifted per class) with its decisions (else each decides its own)."""
    en = {**ENERGY, "demand_forecast": forecast, "power_runtime": power}
    progs = [{"energy": en}, "allocation"]
    flat = EnergyPlant(fleet_yaml(f, main_limit_w=main_w, ride_through_s=targets, programs=progs, period_s=dt_s,
                                  profiles=profiles))
    per = len(f) // racks
    idxs = [np.arange(r * per, (r + 1) * per) for r in range(racks)]
    first = main_w / racks if share else 1e9
    leaves = [EnergyPlant(leaf_yaml(subset(f, i), first, targets, dt_s, decide == "tree", progs,
                                    None if profiles is None else [profiles[j] for j in i])) for i in idxs]
    ep = EnergyParams(**en)
    # its rounds are the cycles here, at the flat controller's wall time (the class forecast's clock)
    top = TreeDecider(K, pace_s=dt_s, hp=horizon_params(ep), bins=ep.demand_season_bins if ep.demand_season_s else 0,
                      horizon_s=ep.horizon_s, power_on=ep.power_runtime)
    prios = np.unique(f.priority)
    res = Result([], [])
    sent = []
    try:
        for _ in range(cycles):
            for p, i in zip(leaves, idxs):
                if not own_physics:
                    p.n["battery_w"][:] = flat.n["battery_w"][i]  # the same physics as the flat controller
                if share:
                    p.main_limit_w = max(0.0, float(flat.n["bus_w"][i].sum()))  # its share of the feed
            flat.cycle()
            for p in leaves:
                p.cycle()
            offers = [hc.offer_of(p.img.read_published()[0], K) for p in leaves]
            per_row = racks // rows
            offer = hc.total([hc.total(offers[r * per_row:(r + 1) * per_row], K) for r in range(rows)], K)
            if decide == "tree":
                sent.append(top.step(offer, main_w, dt_s, float(flat.eng.ctx[Ctx.WALL_S])))
                res.fracs.append((np.array([x["frac"] for x in top.rows]), flat.mem["energy.frac"][:len(top.rows)].copy()))
                dec = sent[max(0, len(sent) - 1 - lag)]
                if not release:  # each leaf lifts its own nodes' locks from its own sums (before the tree did)
                    dec = dec.copy()
                    dec[:, [D_RELEASE, D_YIELD]] = np.nan
                for p in leaves:  # as the leaf's link: the values, then the lease
                    t = p.mem["energy.tree"]
                    t[T_AT:T_AT + dec.size] = dec.reshape(-1)
                    t[0] = math.inf
                res.tree = top.rows
            else:
                res.tree = hc.rows(offer)
            res.flat = flat.class_rows()
            res.flat_dres = [float(flat.mem["energy.reserve_demand_w"][c]) for c in range(len(res.flat))]
            res.flat_power_s = [float(flat.mem["energy.power_s"][c]) for c in range(len(res.flat))]
            res.top_power_s = [float(top.power_s[x["priority"]]) for x in res.flat]
            if decide == "tree":
                n_ = len(res.flat)
                res.release.append((flat.mem["energy.sweep"][:n_, NX_RQ].copy(),
                                    np.nan_to_num(sent[-1][[x["priority"] for x in res.flat], D_RELEASE])))
                res.yields.append((flat.mem["energy.sweep"][:n_, NX_YQ].copy(),
                                   np.nan_to_num(sent[-1][[x["priority"] for x in res.flat], D_YIELD])))
            res.leaves_dhz = [sum(float(p.mem["energy.demand_horizon_w"][x["priority"]]) for p in leaves)
                              for x in res.flat]  # a leaf has every class 0..K-1 of the tree: index = priority
            alloc = _tree_allocation(leaves, main_w)
            s_t, b_t = np.zeros(len(f)), np.zeros(len(f))
            for (s, b), i, p in zip(alloc, idxs, leaves):
                s_t[i], b_t[i] = s, b
                if own_physics:  # the leaves' batteries move as the tree's levels say
                    p.n["battery_w"][:] = b
            cls = lambda x: np.array([x[f.priority == p].sum() for p in prios])  # noqa: E731
            res.served.append((cls(s_t), cls(flat.n["served_w"])))
            res.battery.append((cls(b_t), cls(flat.n["battery_w"])))
            res.node_diff_w.append(float(max(np.abs(s_t - flat.n["served_w"]).max(),
                                             np.abs(b_t - flat.n["battery_w"]).max())))
            t = {r["priority"]: r for r in res.tree}
            res.runtime_diff_s.append(max(_rt_diff(t.get(r["priority"], {}).get("runtime_s", math.nan),
                                                   r["runtime_s"]) for r in res.flat))
        return res
    finally:
        flat.close()
        for p in leaves:
            p.close()


def _rt_diff(a, b) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return math.inf
    return abs(a - b)


def main(argv: list[str]) -> None:
    cycles = int(argv[0]) if argv else 5
    dt_s = float(argv[1]) if len(argv) > 1 else 1.0
    rows = [(False, 1.2, False), (True, 1.2, False), (False, 1.2, True), (True, 0.35, True)]  # docs' table
    for decide in ("own", "tree"):
        for links, main, share in rows:
            f = demo_fleet(links=links)
            report(tree_vs_flat(f, main * float(f.demand_w.sum()), share=share, decide=decide, cycles=cycles,
                                dt_s=dt_s),
                   f"links {'demo' if links else 'unbounded'}, main supply {main} x demand, leaves on "
                   f"{'their share of the feed' if share else 'no shortage'}, deciding {decide} "
                   f"({cycles} cycles of {dt_s} s):")


def report(r: Result, title: str) -> None:
    print(title)
    t = {x["priority"]: x for x in r.tree}
    for j, x in enumerate(r.flat):
        p = x["priority"]
        st, sf = r.served[-1][0][j], r.served[-1][1][j]
        bt, bf = r.battery[-1][0][j], r.battery[-1][1][j]
        print(f"  class {p}: runtime tree {t[p]['runtime_s']!s:>20} flat {x['runtime_s']!s:>20} s   "
              f"served tree {st:11.4f} flat {sf:11.4f} W   battery tree {bt:11.4f} flat {bf:11.4f} W   "
              f"reachable {t[p]['reachable']}/{x['reachable']}")
    print(f"  largest runtime difference per cycle (s): {['%.3g' % d for d in r.runtime_diff_s]}")
    print(f"  largest node difference per cycle (W): {['%.3g' % d for d in r.node_diff_w]}")


if __name__ == "__main__":
    main(sys.argv[1:])
