"""A test helper: the real ScanEngine with simulated node physics over minutes to hours of simulated
time at coarse cycles (1 s or more), with a FakeClock: outages and peaks without sleeping.

Every cycle steps the node physics under the last battery commands, latches the node data, runs the
configured programs and records per priority class the fraction of its demand that was served.
"""

from __future__ import annotations

import numpy as np
import yaml

from vbatt.kernel.clock import FakeClock
from vbatt.config.plant import load_config_text
from vbatt.drivers.sim.driver import SimFleet
from vbatt.kernel.image import Ctl, Mode, ProcessImage
from vbatt.config.plan import build_programs, image_spec
from vbatt.programs.energy import class_rows, unreachable_texts
from vbatt.kernel.scan import ScanEngine

__all__ = ["FleetSpec", "EnergyPlant", "random_fleet", "fleet_yaml", "lp_gap_fleets"]

_INPUTS = ("voltage_v", "current_a", "temperature_c", "soc", "capacity_wh", "demand_w", "max_discharge_w",
           "max_charge_w", "link_max_w", "updated_ns", "fault")


class FleetSpec:
    """Per-node arrays of a fleet: priority, demand_w, capacity_wh, soc, max_discharge_w, link_max_w."""

    def __init__(self, priority, demand_w, capacity_wh, soc, max_discharge_w, link_max_w, max_charge_w=None):
        self.priority = np.asarray(priority, np.int64)
        self.demand_w = np.asarray(demand_w, float)
        self.capacity_wh = np.asarray(capacity_wh, float)
        self.soc = np.asarray(soc, float)
        self.max_discharge_w = np.asarray(max_discharge_w, float)
        self.link_max_w = np.asarray(link_max_w, float)
        self.max_charge_w = (np.asarray(max_charge_w, float) if max_charge_w is not None
                             else self.max_discharge_w.copy())

    def __len__(self) -> int:
        return self.priority.size

    def usable_wh(self, soc_min: float = 0.1) -> np.ndarray:
        return self.capacity_wh * np.maximum(0.0, self.soc - soc_min)

    def class_demand_w(self) -> dict[int, float]:
        return {int(p): float(self.demand_w[self.priority == p].sum()) for p in np.unique(self.priority)}


def random_fleet(rng: np.random.Generator, n: int, classes: int = 4, *, limits: bool = False,
                 lim: tuple = (1.0, 3.0, 0.5, 2.0)) -> FleetSpec:
    """A heterogeneous fleet; with `limits`, discharge and link limits (lim: ranges as multiples of the
    demand: discharge lo, hi, link lo, hi) that bind for some nodes."""
    prio = np.concatenate([np.arange(classes), rng.integers(0, classes, n - classes)])
    demand = rng.uniform(50, 500, n)
    cap = rng.uniform(100, 2000, n)
    soc = rng.uniform(0.3, 1.0, n)
    if limits:
        dis = rng.uniform(lim[0], lim[1], n) * demand
        link = rng.uniform(lim[2], lim[3], n) * demand
    else:
        dis = np.full(n, 1e6)
        link = np.full(n, 1e6)
    return FleetSpec(prio, demand, cap, soc, dis, link)


def lp_gap_fleets(seed: int, lim: tuple, count: int) -> list[tuple[FleetSpec, dict]]:
    """The fleets of benchmarks/energy_lp_gap.py, in its order: 4-20 nodes, 1-4 classes, limits `lim`
    (multiples of the demand), a tenth of the random capacity, targets 0-1,800 s per class."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        f = random_fleet(rng, int(rng.integers(4, 21)), int(rng.integers(1, 5)), limits=True, lim=lim)
        f.capacity_wh *= 0.1
        out.append((f, {int(c): float(rng.choice([0, 300, 600, 1200, 1800])) for c in np.unique(f.priority)}))
    return out


def fleet_yaml(f: FleetSpec, *, main_limit_w: float, ride_through_s: dict | None, programs: list,
               profiles: list | None = None, period_s: float = 1.0) -> str:
    nodes = []
    for i in range(len(f)):
        node = {"id": f"n{i:03d}", "priority": int(f.priority[i]), "demand_w": float(f.demand_w[i]),
                "capacity_wh": float(f.capacity_wh[i]), "soc": float(f.soc[i]),
                "max_discharge_w": float(f.max_discharge_w[i]), "max_charge_w": float(f.max_charge_w[i]),
                "link_max_w": float(f.link_max_w[i])}
        if profiles is not None and profiles[i] is not None:
            node["demand_profile"] = profiles[i]
        nodes.append(node)
    plant = {"main_limit_w": float(main_limit_w), "stale_ms": 1e9}
    if ride_through_s:
        plant["ride_through_s"] = {int(k): float(v) for k, v in ride_through_s.items()}
    return yaml.safe_dump({"cycle": {"cycle_ms": period_s * 1e3}, "plant": plant, "nodes": nodes,
                           "programs": programs}, sort_keys=False)


class EnergyPlant:
    """Image, programs and ScanEngine from a YAML text; `run(seconds)` steps physics and cycles at
    the configured cycle time (`cycle.cycle_ms`: the programs see the same period)."""

    def __init__(self, text: str):
        self.cfg, fleet = load_config_text(text)
        progs = build_programs(self.cfg, len(fleet))
        spec = image_spec(self.cfg, fleet, progs, [(0, len(fleet), "sim")])
        self.img = ProcessImage.create(spec)
        self.img.node["priority"][:] = fleet.values["priority"]
        self.img.agg["main_limit_w"][0] = self.cfg.plant.main_limit_w
        self.img.ctl[Ctl.MODE] = Mode.RUN
        self.period_ns = int(round(self.cfg.cycle.cycle_ms * 1e6))
        self.eng = ScanEngine(self.img, progs, self.cfg, FakeClock())
        self.sim = SimFleet(fleet, 0, len(fleet))
        self.n = self.img.node
        self.mem = self.img.mem
        self.prio = np.asarray(fleet.values["priority"])
        self.classes = np.unique(self.prio)
        self._cls = np.searchsorted(self.classes, self.prio)
        self.t_s = 0.0  # simulated time since the start
        self._now = 1_000_000_000
        self._staging = {f: self.n[f] for f in _INPUTS}
        self.served_frac: list[np.ndarray] = []  # per cycle, per class: served / demand
        self.times: list[float] = []
        self.hooks: list = []  # called after each cycle with the plant

    @property
    def main_limit_w(self) -> float:
        return float(self.img.agg["main_limit_w"][0])

    @main_limit_w.setter
    def main_limit_w(self, w: float) -> None:
        self.img.agg["main_limit_w"][0] = w

    def cycle(self) -> None:
        dt = self.period_ns * 1e-9
        if self.times:  # the physics of the last interval under the last commands
            self.sim.step(self.t_s, dt, self.n["battery_w"])
            self.t_s += dt
        else:
            self.sim.step(self.t_s, 0.0, self.n["battery_w"])
        self.sim.fill(self._staging, self._now)
        self.eng.cycle(self._now)
        self.eng.last_release_ns = self._now
        self._now += self.period_ns
        k = self._cls
        d = np.bincount(k, self.n["demand_w"], self.classes.size)
        s = np.bincount(k, self.n["served_w"], self.classes.size)
        frac = s / np.maximum(d, 1e-12)
        self.served_frac.append(frac)
        self.times.append(self.t_s)
        for h in self.hooks:
            h(self)

    def run(self, seconds: float) -> None:
        for _ in range(int(round(seconds * 1e9 / self.period_ns))):
            self.cycle()

    def first_shed_s(self, since_s: float = 0.0, tol: float = 1e-6) -> dict[int, float]:
        """Per class, the first time (s after `since_s`) its served fraction fell below 1; inf if never."""
        fr = np.array(self.served_frac)
        t = np.array(self.times)
        out = {}
        for k, p in enumerate(self.classes):
            hit = np.nonzero((t >= since_s) & (fr[:, k] < 1.0 - tol))[0]
            out[int(p)] = float(t[hit[0]] - since_s) if hit.size else np.inf
        return out

    def class_rows(self) -> list[dict]:
        return class_rows(self.mem)

    def unreachable(self) -> list[str]:
        return unreachable_texts(self.mem)

    def close(self) -> None:
        self.img.close()


PEAK_TARGETS = {0: 1800.0, 1: 600.0, 2: 300.0, 3: 0.0}


def peak_instance(seed: int, n: int = 12, steps: int = 60, dt_s: float = 60.0, *, forecast: bool = False):
    """A small peak-shaving instance (tests/energy_reference.py peak_shed_lp's): `n` nodes in four
    classes, each demand a sine over the run (amplitude 20-50 %, the peak in the middle), the main
    supply capped at 75-90 % of the peak but above classes 0-2 (only class 3 ever needs the batteries:
    no class's battery clock runs, every target stays whole), the batteries full of what the reserve
    at the mean demand needs plus 20-60 % of the peak's deficit. Runs the real ScanEngine at one cycle
    per step with `energy` (the reserve at the demand now unless `forecast`) and `allocation`.

    Returns (fleet, main_limit_w, demand nodes x steps as the plant saw it, shed Wh per class,
    the program's least margin E - R and the least usable energy above the whole reserve at each
    step's demand, both over every cycle)."""
    rng = np.random.default_rng(seed)
    f = random_fleet(rng, n, 4)
    f.soc[:] = rng.uniform(0.7, 0.95, n)
    period = steps * dt_s
    amp = rng.uniform(0.2, 0.5, n)
    profiles = [{"kind": "sine", "amplitude_w": float(a * d), "period_s": period, "phase_s": -period / 4}
                for a, d in zip(amp, f.demand_w)]
    t = np.arange(steps) * dt_s
    d = f.demand_w[:, None] * (1 + amp[:, None] * np.sin(2 * np.pi * (t - period / 4) / period))
    main = max(float(rng.uniform(0.75, 0.9)) * d.sum(0).max(), 1.02 * d[f.priority < 3].sum(0).max())
    deficit_wh = np.maximum(0.0, d.sum(0) - main).sum() * dt_s / 3600
    dem = f.class_demand_w()
    reserve_wh = sum(dem[c] * PEAK_TARGETS[c] for c in dem) / 3600
    f.capacity_wh *= (1.1 * reserve_wh + rng.uniform(0.2, 0.6) * deficit_wh) / f.usable_wh().sum()
    p = EnergyPlant(fleet_yaml(f, main_limit_w=main, ride_through_s=PEAK_TARGETS,
                               programs=[{"energy": {"demand_forecast": forecast}}, "allocation"],
                               profiles=profiles, period_s=dt_s))
    seen, served, margins = [], [], []

    def watch(q):
        seen.append(q.n["demand_w"].copy())
        served.append(q.n["served_w"].copy())
        st = q.mem["energy.state"]
        usable = (q.sim.capacity_wh * np.maximum(0.0, q.sim.soc - 0.1)).sum()
        dd = q.n["demand_w"]
        whole = sum(dd[f.priority == c].sum() * PEAK_TARGETS[c] for c in PEAK_TARGETS) / 3600
        margins.append((st[1] - st[2], usable - whole))  # ST_E_WH - ST_R_WH; independent

    p.hooks.append(watch)
    try:
        p.run(steps * dt_s)
    finally:
        p.close()
    seen, served = np.array(seen).T, np.array(served).T
    shed = {int(c): float((seen - served)[f.priority == c].sum() * dt_s / 3600) for c in np.unique(f.priority)}
    m = np.array(margins)
    return f, main, seen, shed, float(m[:, 0].min()), float(m[:, 1].min())
