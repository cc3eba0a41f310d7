"""Reference shed energy for peak shaving with the whole outage reserve kept (examples/scenarios/peak.yaml).

    .venv/bin/python benchmarks/peak_shed_reference.py [SCENARIO]

From the run without the energy layer (`vbatt-instant`, which sheds nothing and breaches the
reserve), per day, with ideal batteries (peak.yaml has no physics: a watt-hour of load shed is a
watt-hour left in the batteries), and the whole reserve R(t) = sum_c demand_c(t) * target_c:

- partial: the least shed energy that keeps the usable energy above R(t), shedding any share of
  any load just in time: the day's deepest breach (a lower bound for any policy);
- whole class: the least critical class shed whole and kept shed until the main supply covers the
  demand again (the energy layer's and tests/energy_reference.py's notion of shedding), from the
  latest start that keeps the reserve.

Prints both against what `vbatt` (with the energy layer) shed each day. docs/simulate.md has the figures.

    .venv/bin/python benchmarks/peak_shed_reference.py --lp [SCENARIO]

The linear programme of tests/energy_reference.py (`peak_shed_lp`, HiGHS) per day on a 60 s grid:
the least shed energy per class that holds the whole reserve, knowing the whole day ahead (the run's
own demand, minute means), any share of any class in any step, against `vbatt` as configured and
with `demand_forecast: false`. The nodes of a class are pooled into one (their energy, room and power
summed, no link limits: a relaxation, so its shed is a lower bound; peak.yaml's limits do not bind),
starting from the run's usable energy per class at the day's first step. Three reserves
R(t) = sum_c D_c(t) T_c (docs/energy.md "Exactness of peak shaving"):

- `now`: D_c the minute's demand (the reference of the tests);
- `program`: the program's definition with a perfect forecast: D_c = max(the class demand now as the
  program smooths it (its class forecast's level, horizon.py, replayed on the run's class demand),
  the mean demand that came over the next T_c): the like-with-like reference;
- `came`: the mean demand that came over the next T_c, no floor (runtime/scenario/reserve.py's
  measure): the bound for a policy that knows the evening's fall and releases reserve on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from vbatt.scenario import load_scenario_text, simulate
from vbatt.scenario.metrics import series

DAY_S = 86400.0


def _per_step(loaded, policy: str):
    """The run's series with one point per step."""
    s = series(simulate(loaded, policy, points=loaded.steps))
    return np.asarray(s["t_s"]), s


def _reserve_demands(loaded, d_step, dt: float) -> dict:
    """Per reserve (see the module's docstring), D_c at each step of the run, classes x steps."""
    from energy_reference import reserve_demand_w

    from vbatt.programs.energy import EnergyParams
    from vbatt.programs.energy.horizon import horizon_replay

    p = next((e.params for e in loaded.cfg.programs if e.id == "energy"), EnergyParams())
    targets = loaded.cfg.plant.ride_through_s
    level = horizon_replay(d_step, dt, 0.0, p.demand_level_tau_s, p.demand_trend_tau_s, p.demand_damping_s,
                           p.demand_season_s, p.demand_season_bins, p.demand_season_tau_s,
                           t0_s=loaded.scenario.start_unix_s)
    level = np.where(np.isnan(level), d_step, level)
    return {"now": None, "program": reserve_demand_w(d_step, dt, targets, level),
            "came": reserve_demand_w(d_step, dt, targets)}


def _lp_days(loaded, s_runs: dict) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from energy_reference import peak_shed_lp

    t, s = _per_step(loaded, "vbatt")
    dt = loaded.step_s
    per = max(1, int(round(60.0 / dt)))
    v = loaded.fleet.values
    prio = np.asarray(v["priority"])
    classes = np.unique(prio)
    agg = {k: np.array([np.asarray(v[k], float)[prio == c].sum() for c in classes])
           for k in ("capacity_wh", "max_discharge_w", "max_charge_w")}
    soc_min, soc_max = 0.1, 1.0
    targets = loaded.cfg.plant.ride_through_s
    d_step = np.asarray(s["c"]["demand_w"])[:, classes]
    reserves = _reserve_demands(loaded, d_step, dt)
    for day in range(int(np.ceil(t[-1] / DAY_S - 1e-9))):
        idx = np.where((t >= day * DAY_S) & (t < (day + 1) * DAY_S))[0]
        m = idx.size // per
        idx = idx[: m * per]
        d = s["c"]["demand_w"][idx][:, classes].reshape(m, per, classes.size).mean(axis=1).T
        main = s["f"]["main_limit_w"][idx].reshape(m, per).mean(axis=1)
        usable = s["c"]["usable_wh"][idx[0], classes]
        shed = {name: r["c"]["shed_w"][idx].sum(axis=0) * dt / 3600.0 for name, r in s_runs.items()}
        refs = []
        for name, rw in reserves.items():
            if rw is not None:  # D_c at the end of each step: the step after it (the run's last step at the end)
                rw = rw[:, np.minimum(idx[0] + per * np.arange(m + 1), len(t) - 1)]
            ref = peak_shed_lp(classes, d, usable, agg["capacity_wh"] * (soc_max - soc_min), agg["max_discharge_w"],
                               agg["max_charge_w"], np.full(classes.size, 1e9), main, targets, per * dt, reserve_w=rw)
            refs.append(f"{name} " + ", ".join(f"{c}: {ref['shed_wh'][int(c)]:,.0f}" for c in classes)
                        + f" (least breach {ref['breach_wh']:.1f} Wh)")
        print(f"day {day}: reference (LP, {m} steps of {per * dt:.0f} s) shed, reserve " + "; ".join(refs) + " Wh")
        print(f"       " + "; ".join(f"{name} " + ", ".join(f"{c}: {sh[c]:,.0f}" for c in classes) + " Wh"
                               for name, sh in shed.items()))


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--lp":
        path = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "examples" / "scenarios" / "peak.yaml"
        loaded = load_scenario_text(path.read_text(), str(path))
        text = path.read_text()
        assert text.count("\n  - energy\n") == 1, "expected a bare '  - energy' entry"
        off = load_scenario_text(text.replace("\n  - energy\n", "\n  - energy: {demand_forecast: false}\n"),
                                 str(path))
        runs = {"vbatt": _per_step(loaded, "vbatt")[1], "vbatt (reserve at the demand now)": _per_step(off, "vbatt")[1]}
        for name, r in runs.items():
            print(f"{name}: reserve margin min (program) ", end="")
            res = simulate(loaded if name == "vbatt" else off, "vbatt", points=2)
            print(f"{res.margin[0]:,.1f} Wh, at the demand that came {res.margin[1]:,.1f} Wh")
        _lp_days(loaded, runs)
        return 0
    path = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "examples" / "scenarios" / "peak.yaml"
    loaded = load_scenario_text(path.read_text(), str(path))
    dt = loaded.step_s
    targets = loaded.cfg.plant.ride_through_s
    t, s = _per_step(loaded, "vbatt-instant")
    d = s["c"]["demand_w"]
    tg = np.array([targets.get(c, 0.0) for c in range(d.shape[1])])
    margin = s["c"]["usable_wh"].sum(axis=1) - (d * tg).sum(axis=1) / 3600.0
    least = max(c for c in range(d.shape[1]) if d[:, c].any())
    shed_wh = d[:, least] * dt / 3600.0
    short = d.sum(axis=1) > s["f"]["main_limit_w"]
    _, sv = _per_step(loaded, "vbatt")
    vb_shed = sv["c"]["shed_w"].sum(axis=1) * dt / 3600.0
    for day in range(int(np.ceil(t[-1] / DAY_S - 1e-9))):
        idx = np.where((t >= day * DAY_S) & (t < (day + 1) * DAY_S))[0]
        if idx.size == 0:
            continue
        worst = idx[np.argmin(margin[idx])]
        partial = max(0.0, -margin[idx].min())
        whole = None
        for ks in range(worst, idx[0] - 1, -1):  # the latest start that keeps the reserve
            ke = ks
            while ke < idx[-1] and short[ke]:
                ke += 1
            saved = np.cumsum(shed_wh[ks:ke]) if ke > ks else np.zeros(1)
            during = margin[ks:ke] + saved[: ke - ks]
            after = margin[ke: idx[-1] + 1] + saved[-1]
            if (during.size == 0 or during.min() >= 0.0) and (after.size == 0 or after.min() >= 0.0):
                whole = (t[ks] - day * DAY_S, t[ke] - day * DAY_S, float(saved[-1]))
                break
        w = "none keeps it" if whole is None else (f"{least} from {whole[0] / 3600:.2f} h to "
                                                  f"{whole[1] / 3600:.2f} h: {whole[2]:,.0f} Wh")
        print(f"day {day}: deepest breach without the energy layer {margin[idx].min():,.0f} Wh; reference shed: "
              f"partial {partial:,.0f} Wh, whole class {w}; vbatt shed {vb_shed[idx].sum():,.0f} Wh")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
