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


def main(argv: list[str]) -> int:
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
