"""Runtime per class of a tree of controllers against the flat controller, in process (docs/hierarchy.md
"Energy across levels"): 180 nodes of the demo fleet (runtime/hierarchy/demo.py, seed 1, real
capacities) in 9 leaves of 20, each running the energy program over its own nodes; their energy offers
summed (3 rows, then the top: programs/hierarchy/classes.py) and the class rows of the sum against the
flat controller's own. The tree's allocation is the flat one node by node (tests/test_hierarchy_exact.py),
so the leaves' batteries are moved as the flat's; each leaf's main_limit_w is either its share of the feed
(what the link sets today) or so large that no leaf is short (the class states of the flat with spare
main supply).

    .venv/bin/python benchmarks/hierarchy_energy.py [cycles] [dt_s]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from energy_plant import EnergyPlant, FleetSpec, fleet_yaml  # noqa: E402

from vbatt.programs.hierarchy import classes as hc  # noqa: E402

TARGETS = {0: 7200.0, 1: 1800.0, 2: 600.0, 3: 0.0}
PROGRAMS = [{"energy": {"demand_forecast": False, "sweep_s": 0}}, "allocation"]


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


def subset(f: FleetSpec, idx) -> FleetSpec:
    return FleetSpec(f.priority[idx], f.demand_w[idx], f.capacity_wh[idx], f.soc[idx], f.max_discharge_w[idx],
                     f.link_max_w[idx], f.max_charge_w[idx])


def tree_vs_flat(f: FleetSpec, main_w: float, *, leaf_main_w: float | None, cycles: int = 5, dt_s: float = 1.0,
                 racks: int = 9, rows: int = 3, targets=TARGETS) -> tuple[list[dict], list[dict]]:
    """(the tree's class rows, the flat controller's class rows) after `cycles`."""
    flat = EnergyPlant(fleet_yaml(f, main_limit_w=main_w, ride_through_s=targets, programs=PROGRAMS, period_s=dt_s))
    per = len(f) // racks
    idxs = [np.arange(r * per, (r + 1) * per) for r in range(racks)]
    leaves = [EnergyPlant(fleet_yaml(subset(f, i), main_limit_w=main_w / racks, ride_through_s=targets,
                                     programs=PROGRAMS, period_s=dt_s)) for i in idxs]
    try:
        for _ in range(cycles):
            for p, i in zip(leaves, idxs):
                p.n["battery_w"][:] = flat.n["battery_w"][i]  # the tree's allocation is the flat one
                p.main_limit_w = max(0.0, float(flat.n["bus_w"][i].sum())) if leaf_main_w is None else leaf_main_w
            flat.cycle()
            for p in leaves:
                p.cycle()
        offers = [hc.offer_of(p.img.read_published()[0], 8) for p in leaves]
        per_row = racks // rows
        top = hc.total([hc.total(offers[r * per_row:(r + 1) * per_row], 8) for r in range(rows)], 8)
        return hc.rows(top), flat.class_rows()
    finally:
        flat.close()
        for p in leaves:
            p.close()


def main(argv: list[str]) -> None:
    cycles = int(argv[0]) if argv else 5
    dt_s = float(argv[1]) if len(argv) > 1 else 1.0
    for links in (False, True):
        f = demo_fleet(links=links)
        for share, leaf in ((1.2, 1e9), (1.2, None), (0.35, None)):
            tree, flat = tree_vs_flat(f, share * float(f.demand_w.sum()), leaf_main_w=leaf, cycles=cycles, dt_s=dt_s)
            print(f"links {'real' if links else 'unbounded'}, main supply {share} x demand, leaves on "
                  f"{'no shortage' if leaf else 'their share of the feed'} ({cycles} cycles of {dt_s} s):")
            t = {r["priority"]: r for r in tree}
            for r in flat:
                p = r["priority"]
                print(f"  class {p}: runtime tree {t[p]['runtime_s']!s:>22} flat {r['runtime_s']!s:>22}   "
                      f"reserve tree {t[p]['reserve_wh']:12.6f} flat {r['reserve_wh']:12.6f} Wh   "
                      f"reachable {t[p]['reachable']}/{r['reachable']}")


if __name__ == "__main__":
    main(sys.argv[1:])
