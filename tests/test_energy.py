"""The energy program (docs/design.md §2b): ride-through targets per class, the outage reserve, runtimes.

Outages and peaks run the real ScanEngine with simulated node physics over simulated hours at coarse
cycles (tests/energy_plant.py). Exactness: against the linear programme of tests/energy_reference.py
(HiGHS) on small random instances, and against the closed form (pooled usable energy over class
demand) on hundreds of random fleets through the kernel itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vbatt.config.plant import ConfigError, load_config_text
from vbatt.programs.codes import Alarm
from vbatt.programs.energy.horizon import HZ_N
from vbatt.programs.energy.kernel import HP_N, NX_N, NX_YQ, energy_step
from vbatt.programs.energy.rules import ST_E_WH, ST_N

from conftest import read_json, run_vbatt
from energy_plant import (PEAK_TARGETS, EnergyPlant, FleetSpec, fleet_yaml, lp_gap_fleets, peak_instance,
                          random_fleet)
from energy_reference import peak_shed_lp, reserve_demand_w, ride_through_lp

TARGETS = {0: 14400.0, 1: 1800.0, 2: 600.0, 3: 0.0}


@pytest.fixture
def plants():
    made = []

    def make(*args, **kw):
        p = EnergyPlant(*args, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# -- configuration ------------------------------------------------------------------------------

TWO = """
plant:
  main_limit_w: 0
  ride_through_s: {0: 600, %s: 60}
nodes:
  - {id: a, priority: 0, demand_w: 100, capacity_wh: 100, soc: 0.5, max_discharge_w: 500, link_max_w: 500}
  - {id: b, priority: 1, demand_w: 100, capacity_wh: 100, soc: 0.5, max_discharge_w: 500, link_max_w: 500}
programs: [energy, allocation]
"""


def test_ride_through_keys_are_classes_that_exist_and_seconds_are_not_negative():
    cfg, _ = load_config_text(TWO % 1, "x.yaml")
    assert cfg.plant.ride_through_s == {0: 600.0, 1: 60.0}
    with pytest.raises(ConfigError) as e:
        load_config_text(TWO % 7, "x.yaml")
    assert "x.yaml:4: plant.ride_through_s.7: no node has priority 7 (classes present: [0, 1])" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config_text(TWO.replace("%s: 60", "1: -5"), "x.yaml")
    assert "x.yaml:4: plant.ride_through_s.1" in str(e.value) and "greater than or equal to 0" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config_text(TWO.replace("%s: 60", "one: 5"), "x.yaml")
    assert "plant.ride_through_s" in str(e.value)


def test_more_than_64_classes_are_refused_with_the_energy_program():
    nodes = "\n".join(f"  - {{id: n{i}, priority: {i}}}" for i in range(65))
    with pytest.raises(ConfigError) as e:
        load_config_text(f"nodes:\n{nodes}\nprograms: [energy, allocation]\n", "x.yaml")
    assert "65 distinct priorities; the energy program takes at most 64 classes" in str(e.value)
    load_config_text(f"nodes:\n{nodes}\nprograms: [allocation]\n", "x.yaml")  # without it: fine


# -- today's behaviour without targets ------------------------------------------------------------

def test_without_targets_the_pipeline_does_what_it_did(plants):
    f = random_fleet(np.random.default_rng(3), 16, 4, limits=True)
    f.capacity_wh *= 0.2
    runs = [plants(fleet_yaml(f, main_limit_w=0, ride_through_s=None, programs=prog, period_s=5.0))
            for prog in (["allocation"], ["energy", "allocation"])]
    for _ in range(300):
        for p in runs:
            p.cycle()
        a, b = runs[0].n, runs[1].n
        for k in ("battery_w", "served_w", "bus_w", "shed_w"):
            assert np.allclose(a[k], b[k], atol=1e-6), k
    assert runs[0].first_shed_s()[0] < 1500  # the run reached the end of the energy


# -- the must-show outage --------------------------------------------------------------------------

def _hetero(seed=7, n=20, scale=1.0) -> FleetSpec:
    """A heterogeneous fleet of four classes with plenty of power and link (energy is the limit)."""
    rng = np.random.default_rng(seed)
    f = random_fleet(rng, n, 4)
    f.capacity_wh *= scale
    return f


def _today(plants, f, hours):
    p = plants(fleet_yaml(f, main_limit_w=0, ride_through_s=None, programs=["allocation"], period_s=5.0))
    p.run(hours * 3600)
    return p.first_shed_s()


@pytest.mark.parametrize("n", [20, 150])
def test_outage_meets_every_reachable_target_sheds_lazily_and_outlasts_today(plants, n):
    f = _hetero(n=n)
    dem = f.class_demand_w()
    reserve_all = sum(dem[c] * TARGETS[c] for c in dem) / 3600
    f.capacity_wh *= 1.7 * reserve_all / f.usable_wh().sum()  # every target reachable on the pooled energy
    e_wh = f.usable_wh().sum()
    p = plants(fleet_yaml(f, main_limit_w=0, ride_through_s=TARGETS, programs=["forecast", "energy", "allocation"],
               period_s=5.0))
    trace = []
    p.hooks.append(lambda q: trace.append((q.t_s, q.mem["energy.state"][ST_E_WH], q.mem["energy.reserve_wh"][:4].copy())))
    p.cycle()
    rows = p.class_rows()
    assert [r["priority"] for r in rows] == [0, 1, 2, 3] and all(r["reachable"] for r in rows)
    assert rows[0]["runtime_s"] >= TARGETS[0] - 5.0  # the first cycle is 5 s into the outage
    p.run(6 * 3600)
    shed = p.first_shed_s()
    for c, t in TARGETS.items():
        assert t - 5.0 <= shed[c] < 6 * 3600, (c, shed)  # every target met (to one 5 s cycle)
    # Lazy: a class is shed only when the energy left has come down to the reserve of the more
    # critical classes' remaining targets (its threshold), to one cycle's draw.
    t = np.array([x[0] for x in trace])
    e = np.array([x[1] for x in trace])
    res = np.array([x[2] for x in trace])
    draw_wh = sum(dem.values()) * 5.0 / 3600
    for c in (1, 2, 3):
        k = int(np.searchsorted(t, shed[c])) - 1
        thr = res[k, c - 1] if t[k] < TARGETS[c] else res[k, 3]
        assert e[k] - thr <= 2 * draw_wh, (c, e[k], thr)
    lp = None
    if n <= 20:  # the same ride-through as the lexicographic LP (to one grid step of 300 s)
        lp = ride_through_lp(f.priority, f.demand_w, f.usable_wh(), f.max_discharge_w, f.link_max_w, TARGETS, 72,
                             300.0)
        for c in TARGETS:
            assert abs(min(shed[c], 72 * 300.0) - lp[c]) <= 300.0, (c, shed, lp)
    today = _today(plants, f, 6)
    assert shed[0] > 2.0 * today[0]
    print(f"\noutage, {n} nodes, {e_wh:.0f} Wh, {sum(dem.values()):.0f} W: shed at {shed} s with targets, "
          f"{today} s today; LP {lp}")


def test_an_unreachable_critical_target_gets_the_pooled_bound_and_an_alarm(plants):
    f = _hetero(seed=11)
    bound_s = f.usable_wh().sum() * 3600 / f.class_demand_w()[0]
    targets = {0: 1e6, 1: 1800.0, 2: 600.0, 3: 0.0}
    p = plants(fleet_yaml(f, main_limit_w=0, ride_through_s=targets, programs=["energy", "allocation"],
               period_s=5.0))
    p.cycle()
    assert p.class_rows()[0]["runtime_s"] == pytest.approx(bound_s, rel=1e-9)
    (line,) = [s for s in p.unreachable() if s.startswith("class 0:")]
    assert line == f"class 0: {bound_s:,.0f} s of 1,000,000 s"
    assert np.all(p.n["alarm"][f.priority == 0] & Alarm.RIDE_THROUGH_SHORT)
    p.run(bound_s * 1.05)
    shed = p.first_shed_s()
    assert shed[0] >= 0.98 * bound_s, (shed[0], bound_s)
    assert all(shed[c] <= 5.0 for c in (1, 2, 3))  # each would shorten class 0: shed at once
    print(f"\ncritical class alone: {shed[0]:.0f} s of the pooled bound {bound_s:.0f} s")


def test_a_30_second_outage_sheds_nothing(plants):
    f = _hetero(scale=4.0)
    text = fleet_yaml(f, main_limit_w=1e6, ride_through_s=TARGETS, programs=["forecast", "energy", "allocation"])
    p = plants(text)
    p.run(60)
    p.main_limit_w = 0.0
    p.run(30)
    assert p.mem["energy.clock_s"][0] == pytest.approx(30.0)
    p.main_limit_w = 1e6
    p.run(120)
    assert np.array(p.served_frac).min() == pytest.approx(1.0)
    assert p.mem["energy.clock_s"][0] == 0.0  # reset after the hold time


# -- peak shaving ---------------------------------------------------------------------------------

def test_peak_shaving_never_breaches_the_reserve(plants):
    rng = np.random.default_rng(5)
    f = random_fleet(rng, 20, 4)
    f.soc[:] = 0.9
    targets = {0: 900.0, 1: 300.0, 2: 120.0, 3: 0.0}
    period, dt = 7200.0, 5.0
    profiles = [{"kind": "sine", "amplitude_w": 0.4 * float(d), "period_s": period} for d in f.demand_w]
    peak = float((f.demand_w * 1.4).sum())
    main = 0.8 * peak
    t = np.arange(0.0, period, dt)
    deficit_wh = np.maximum(0.0, f.demand_w.sum() * (1 + 0.4 * np.sin(2 * np.pi * t / period)) - main).sum() * dt / 3600
    dem = f.class_demand_w()
    reserve_wh = sum(dem[c] * targets[c] for c in dem) / 3600  # on the mean demand of each class
    # Energy for the reserve at the peak demand and half the peak: shaving all of it breaches the reserve.
    f.capacity_wh *= (1.4 * reserve_wh + 0.5 * deficit_wh) / f.usable_wh().sum()
    results = {}
    for prog in (["allocation"], ["energy", "allocation"]):
        # targets need the energy program (a config error without it): today's run has none
        p = plants(fleet_yaml(f, main_limit_w=main, ride_through_s=targets if "energy" in prog else None,
                              programs=prog, profiles=profiles,
                              period_s=dt))
        margins, shaved = [], []

        def watch(q):
            e = (q.sim.capacity_wh * np.maximum(0.0, q.sim.soc - 0.1)).sum()
            margins.append(e - reserve_wh)  # the whole reserve: main may fail at any moment
            shaved.append(q.n["battery_w"].sum())

        p.hooks.append(watch)
        p.run(period)
        results[prog[0]] = (min(margins), max(shaved), p.first_shed_s())
    m_energy, shave_energy, shed_energy = results["energy"]
    m_today, _, shed_today = results["allocation"]
    draw_wh = peak * dt / 3600
    assert m_today < -draw_wh and shed_today[3] == math.inf  # today: the peak eats into the outage reserve
    assert m_energy >= 0.0, m_energy  # with the program: never
    assert shave_energy > 0.0  # it did shave while the energy allowed
    assert shed_energy[3] < period and shed_energy[0] == math.inf  # the least critical class shed instead
    print(f"\npeak: reserve {reserve_wh:.0f} Wh, margin min {m_energy:.1f} Wh with the energy program, "
          f"{m_today:.1f} Wh today; first shed {shed_energy}")


# Every seed of 0-23 where the reference sheds and can hold the reserve (benchmarks/energy_lp_gap.py --peak).
# Seed 12 failed (1.06 steps, program margin -0.1 Wh) before the margin looked ahead over the reserve's rise.
PEAK_SEEDS = (1, 3, 4, 5, 7, 8, 9, 10, 12, 13, 15, 16, 19, 20, 22)


@pytest.mark.parametrize("seed", PEAK_SEEDS)
def test_peak_shaving_sheds_no_more_than_the_reference(seed):
    """Against peak_shed_lp (HiGHS), which knows the whole demand ahead and may shed any share of any
    class in any step: the same instance and reserve (every target whole at the demand of the step),
    the demand as the plant saw it. The program decides step by step without knowing the next
    demand: it may shed more, by at most one grid step of the shed class's peak demand."""
    dt = 60.0
    f, main, demand, shed, prog_margin, whole_margin = peak_instance(seed, dt_s=dt)
    ref = peak_shed_lp(f.priority, demand, f.usable_wh(), f.capacity_wh * 0.9, f.max_discharge_w,
                       f.max_charge_w, f.link_max_w, main, PEAK_TARGETS, dt)
    assert ref["breach_wh"] <= 1e-6 and ref["shed_wh"][3] > 0.0  # the reserve can be held, by shedding
    assert prog_margin >= 0.0 and whole_margin >= 0.0, (prog_margin, whole_margin)  # held, by both measures
    for c, ref_wh in ref["shed_wh"].items():
        step_wh = demand[f.priority == c].sum(axis=0).max() * dt / 3600
        assert shed[c] <= ref_wh + step_wh, (c, shed[c], ref_wh, step_wh)
    assert shed[0] == shed[1] == shed[2] == 0.0  # the least critical class only, as the reference
    print(f"\npeak seed {seed}: shed {shed[3]:.1f} Wh, reference {ref['shed_wh'][3]:.1f} Wh, "
          f"margin min {prog_margin:.1f} / {whole_margin:.1f} Wh")


def test_peak_yaml_first_day_sheds_no_more_than_the_reference_and_calmly():
    """examples/scenarios/peak.yaml's first day (the class forecast cold: no daily profile yet) with the
    energy program as configured, against peak_shed_lp holding the program's own reserve with a perfect
    forecast (D_c = max(the class demand now as the program smooths it, the mean demand that came over
    T_c)) on a 60 s grid, the classes pooled: class 3 sheds no more than the reference (measured: 7,222 Wh
    against 7,246 Wh; 7,280 Wh while the allocation's restore hold kept the program's lifted cuts, 7,341 Wh
    before the reserve's floor was the class forecast's level), nothing else is shed, the reserve holds by
    the program's measure and by the demand that came (runtime/scenario/reserve.py), and the cut is calm:
    class 3's shed falls within one step by more than 5 % of its demand at most twice (measured: once; 34
    times with the hold, 59 with the cut just in time and no hold)."""
    from pathlib import Path

    from vbatt.programs.energy import EnergyParams
    from vbatt.programs.energy.horizon import horizon_replay
    from vbatt.scenario import load_scenario_text, simulate
    from vbatt.scenario.metrics import series

    path = Path(__file__).resolve().parents[1] / "examples" / "scenarios" / "peak.yaml"
    loaded = load_scenario_text(path.read_text(), str(path))
    day_s, dt = 86400.0, loaded.step_s
    steps = int(day_s / dt)
    r = simulate(loaded, "vbatt", points=steps, duration_s=day_s)
    assert r.margin[0] >= 0.0 and r.margin[1] >= 0.0, r.margin
    s = series(r)
    d_step = np.asarray(s["c"]["demand_w"])[:, :4]
    p = EnergyParams()
    level = horizon_replay(d_step, dt, 0.0, p.demand_level_tau_s, p.demand_trend_tau_s, p.demand_damping_s,
                           p.demand_season_s, p.demand_season_bins, p.demand_season_tau_s,
                           t0_s=loaded.scenario.start_unix_s)
    targets = loaded.cfg.plant.ride_through_s
    rw = reserve_demand_w(d_step, dt, targets, np.where(np.isnan(level), d_step, level))
    # The reference over the afternoon only (14:00-21:00, from the run's usable energy at 14:00): the
    # program sheds nothing outside it (asserted), and a shorter programme keeps the test short.
    per = int(round(60.0 / dt))
    k0, k1 = int(14 * 3600 / dt), int(21 * 3600 / dt)
    m = (k1 - k0) // per
    d = d_step[k0:k1].reshape(m, per, 4).mean(axis=1).T
    v = loaded.fleet.values
    prio = np.asarray(v["priority"])
    agg = {k: np.array([np.asarray(v[k], float)[prio == c].sum() for c in range(4)])
           for k in ("capacity_wh", "max_discharge_w", "max_charge_w")}
    ref = peak_shed_lp(np.arange(4), d, np.asarray(s["c"]["usable_wh"])[k0, :4], agg["capacity_wh"] * 0.9,
                       agg["max_discharge_w"], agg["max_charge_w"], np.full(4, 1e9), loaded.cfg.plant.main_limit_w,
                       targets, 60.0, reserve_w=rw[:, k0 + per * np.arange(m + 1)])
    shed_w = np.asarray(s["c"]["shed_w"])[:, :4]
    assert shed_w[:k0].sum() == 0.0 and shed_w[k1:].sum() == 0.0
    shed = shed_w.sum(axis=0) * dt / 3600
    step_wh = d[3].max() * 60.0 / 3600
    assert ref["breach_wh"] <= 1e-6 and ref["shed_wh"][3] > 0.0
    assert shed[3] <= ref["shed_wh"][3], (shed[3], ref["shed_wh"][3], step_wh)
    assert shed[:3].sum() == 0.0
    d3 = np.asarray(s["c"]["demand_w"])[:, 3]
    bursts = int(np.sum(-np.diff(shed_w[:, 3]) > 0.05 * d3[1:]))
    assert bursts <= 2, bursts
    print(f"\npeak.yaml day 1: class 3 shed {shed[3]:,.0f} Wh, reference {ref['shed_wh'][3]:,.0f} Wh "
          f"(a step: {step_wh:.0f} Wh); margins {r.margin[0]:.1f} / {r.margin[1]:.1f} Wh; restores > 5 %: {bursts}")


# -- exactness: the LP and the closed form -----------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_ride_through_agrees_with_the_lp_to_one_grid_step(plants, seed):
    rng = np.random.default_rng(100 + seed)
    f = random_fleet(rng, int(rng.integers(4, 21)), int(rng.integers(1, 5)))
    f.capacity_wh *= 0.1
    targets = {int(c): float(rng.choice([0, 300, 600, 1200, 1800])) for c in np.unique(f.priority)}
    steps, dt = 60, 60.0
    lp = ride_through_lp(f.priority, f.demand_w, f.usable_wh(), f.max_discharge_w, f.link_max_w, targets, steps, dt)
    p = plants(fleet_yaml(f, main_limit_w=0, ride_through_s=targets, programs=["energy", "allocation"], period_s=5.0))
    p.run(steps * dt)
    sim = p.first_shed_s()
    for c in lp:
        assert abs(min(sim[c], steps * dt) - lp[c]) <= dt, (c, sim, lp, targets)


# Power and link limits that bind (discharge 1-3x, link 0.5-2x a node's demand): the simulation against
# the whole-step reference (a class served in part counts as shed, as first_shed_s counts it; the LP
# relaxation would count it in part). Of seeds 0-23, these agree on every class; the others do not yet
# (docs/energy.md "Exactness with binding power and link limits", benchmarks/energy_lp_gap.py). Before the
# own-need surplus was exportable within a sweep, seeds 2, 3, 8 and 12 failed here (by 100-220 s). Seeds
# 10 and 21 agree since a class whose node runs out of its own energy is cut whole, the reserve counts a
# target only as far as the class's own energy lasts, and a shed class's nodes no longer count their own
# load as deliverable. Seeds 0, 4, 5, 13, 14, 16, 17 and 18 are new this round and all fail with the
# kernel of before it (by 70-1,980 s): a node's own need is locked for its class's runtime, not a target
# the class cannot reach; a class draws only while the more critical classes' reserve is deliverable
# without its own nodes' load; beyond its target a class yields to a more critical one that is shed; a
# class riding through that the batteries' export cannot carry whole is shed and latched.
# Seeds 1, 7, 9 and 23 agree with the same reference on a 15 s grid (within 15 s on every class): their
# 60 s miss is the grid's (docs/energy.md; seed 7: 15 s reference {0: 465, 1: 450} s, the simulation 470 /
# 455 s). Seed 35 agrees since a class short of export power draws on its own nodes' locked energy (kernel
# _release; on cb4929c class 0 ran 1,085 s against the reference's 660 s), seed 39 since the power runtime
# as well (a class's runtime, reserve and own-need locks end where the batteries' power can no longer carry
# it; on cb4929c class 0 470 s against 660 s: a node's own need locked for 570 s held the export class 0's
# importers lacked). Seed 37 does not: class 0 beyond its target rides on a trickle that seconds of classes
# 1 and 2 move by minutes (the simulation 1,195 / 365 / 360 s; the reference 1,260 / 360 / 300 s on 60 s,
# 1,230 / 360 / 330 s on 30 s, 1,410 / 345 / 345 s on 15 s, 1,250 / 355 / 355 s on 5 s: the grid's, and the simulated
# batteries' last 5 s cycle below soc_min; docs/energy.md "The trickle cases are the grid's").
BINDING_SEEDS = (0, 2, 3, 4, 5, 6, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 35, 39)


@pytest.mark.parametrize("seed", BINDING_SEEDS)
def test_ride_through_with_binding_limits_agrees_with_the_whole_step_reference(plants, seed):
    rng = np.random.default_rng(seed)
    f = random_fleet(rng, int(rng.integers(4, 13)), int(rng.integers(1, 4)), limits=True, lim=(1.0, 3.0, 0.5, 2.0))
    f.capacity_wh *= 0.1
    targets = {int(c): float(rng.choice([0, 300, 600, 1200])) for c in np.unique(f.priority)}
    # Binding for real: some node's discharge or link limit is below what its share of the load asks.
    assert ((f.max_discharge_w < f.demand_w * 1.5) | (f.link_max_w < f.demand_w)).any()
    _agrees_with_the_whole_step_lp(plants, f, targets, 40, 60.0)


def _agrees_with_the_whole_step_lp(plants, f: FleetSpec, targets: dict, steps: int, dt: float) -> None:
    """Every class's first shed in the simulation within one step of the whole-step reference LP."""
    lp = ride_through_lp(f.priority, f.demand_w, f.usable_wh(), f.max_discharge_w * (f.soc > 0.1), f.link_max_w,
                         targets, steps, dt, whole=True)
    p = plants(fleet_yaml(f, main_limit_w=0, ride_through_s=targets, programs=["energy", "allocation"], period_s=5.0))
    p.run(steps * dt)
    sim = p.first_shed_s()
    for c in lp:
        assert abs(min(sim[c], steps * dt) - lp[c]) <= dt, (c, sim, lp, targets)


# The fleets of benchmarks/energy_lp_gap.py (limits `1 3 0.5 2`, 60 steps of 60 s), as (seed, index), that
# agree on every class now and did not before. Seed 42 fleet 0 (targets {0: 600, 1: 600, 2: 0, 3: 600} s,
# failed on 7bafe69): class 2, beyond its target, was shed at 385 s against the reference's 420 s, and class 1
# ran on that energy to 790 s against 720 s: this cycle's draws came off its deliverable margin once per
# remaining target. Seed 7 fleet 12 and seed 11 fleet 0 (failed on cb4929c: class 0 1,130 s of its 1,200 s
# target against 1,200 s; one class cut for power at 395 s against 540 s): own-need locks held for a
# runtime the batteries' power could not give, now the power runtime (docs/energy.md).
LP_GAP_FLEETS = ((42, 0), (7, 12), (11, 0))


@pytest.mark.parametrize("seed, index", LP_GAP_FLEETS)
def test_ride_through_with_binding_limits_agrees_on_the_lp_gap_fleets(plants, seed, index):
    f, targets = lp_gap_fleets(seed, (1.0, 3.0, 0.5, 2.0), index + 1)[index]
    _agrees_with_the_whole_step_lp(plants, f, targets, 60, 60.0)


# A class's power shortfall is its own need (programs/energy/kernel.py _release): when the batteries' export
# cannot carry a class's loads, the own-need locks of its nodes give what is missing, up to their limits. Both
# fail on cb4929c. `--seed 11` fleet 0 (one class, target 1,200 s): cut for power at 395 s, when its fastest node
# ran empty, while a node with a load beyond its link kept 239 Wh for that load; the reference 540 s, now 550 s.
# `--seed 42` fleet 13 (targets {0: 600, 1: 0, 2: 0} s) on a 10 s grid (on 60 s the grid's own miss is larger
# than the drain order's, docs/energy.md): after classes 1 and 2 are shed at 640 s the export of the nodes
# left falls 53 W short of class 0's imports while its own node 6 keeps its energy for its own need: class 0
# served at 96 % from 650 s; the reference 720 s, now 725 s.
SHORTFALL_FLEETS = ((11, 0, 60, 60.0), (42, 13, 90, 10.0))


@pytest.mark.parametrize("seed, index, steps, dt", SHORTFALL_FLEETS)
def test_a_class_short_of_export_power_draws_on_its_own_locked_nodes(plants, seed, index, steps, dt):
    f, targets = lp_gap_fleets(seed, (1.0, 3.0, 0.5, 2.0), index + 1)[index]
    _agrees_with_the_whole_step_lp(plants, f, targets, steps, dt)


# A class inside its target while the reference carries it: `0.5 2 0.5 2` fleet 17 (targets {0: 300, 1: 600,
# 2: 1,200} s; the reference {0: 300, 1: 600, 2: 120} s). On 254ecc5 class 1 was shed at 270 s, 330 s short of
# its target, and class 0 rode on to 490 s, beyond its own. Two causes (programs/energy/kernel.py): the
# deliverable energy within class 0's horizon counted the energy class 1's own node 12 (a load 90 W beyond its
# link) needs for its own load after that horizon, so class 2 (an unreachable target) drew until 140 s where
# the batteries' power could carry classes 0 and 1 through their targets only if it stopped by ~130 s
# (_horizons); and class 0's node 3 locked its energy for class 0's own load beyond class 0's target while
# class 1, inside its target, was 150 W short of export power (_release: the locks beyond a class's remaining
# target give first). Now {0: 300, 1: 580, 2: 115} s.
def test_a_class_inside_its_target_is_not_shed_for_another_beyond_its_own(plants):
    f, targets = lp_gap_fleets(42, (0.5, 2.0, 0.5, 2.0), 18)[17]
    _agrees_with_the_whole_step_lp(plants, f, targets, 60, 60.0)


# A class beyond its target is not shed for power that other classes' own-need locks hold for their time beyond
# their own targets (programs/energy/kernel.py _release; docs/energy.md "A class beyond its target while the
# others' locks hold time beyond theirs"). `0.5 2 0.5 2` fleet 13 (targets {0: 600, 1: 0, 2: 0} s): at 235 s two
# fast nodes ran empty and the batteries' export fell 676 W short of the three classes, while class 0's node 6
# (96 W beyond its link) locked its energy for class 0's runtime (551 s; 365 s of target left) and class 1's node
# 4 (42 W) for class 1's (target 0). Class 2 was shed there, and class 0 rode on to 785 s on what it kept (the
# 60 s reference 660 s, every finer grid 600 s: class 2's time beyond its target comes first). Now class 2 takes
# those locks' part beyond the targets: {0: 610, 1: 545, 2: 265} s. The 60 s grid, and the 20 s one on classes 0
# and 2 ({0: 600, 1: 320, 2: 280} s; on main class 2 235 s, class 0 785 s). Class 1 is the grid's and the drain
# order's: 600 s on 60 s, 480 s on 30 s and 15 s, 320 s on 20 s, 330 s on 10 s, 335 s on 5 s, each with class 2 at
# 270-280 s (the reference rests two fast nodes to keep their power for class 2's last 15 s and pays with class
# 1's node 4: class 1's time beyond its target comes after class 2's).
def test_a_class_beyond_its_target_takes_what_locks_hold_beyond_the_other_targets(plants):
    f, targets = lp_gap_fleets(42, (0.5, 2.0, 0.5, 2.0), 14)[13]
    _agrees_with_the_whole_step_lp(plants, f, targets, 15, 60.0)
    lp = ride_through_lp(f.priority, f.demand_w, f.usable_wh(), f.max_discharge_w * (f.soc > 0.1), f.link_max_w,
                         targets, 36, 20.0, whole=True)
    p = plants(fleet_yaml(f, main_limit_w=0, ride_through_s=targets, programs=["energy", "allocation"], period_s=5.0))
    p.run(720.0)
    sim = p.first_shed_s()
    for c in (0, 2):
        assert abs(min(sim[c], 720.0) - lp[c]) <= 20.0, (c, sim, lp, targets)


# A node's local runtime counts what its battery gives its own class's power now, not what it yields to another
# class from above its lock for its class's remaining target (kernel._node_values): counted, the runtime shown fell
# as a yield came and rose as it went, and the lock (held for the class runtime) and the next yield followed it.
# LP-gap `0.5 2 0.5 2` fleet 13 from 245 s (two nodes empty, class 2 short of power takes the locks of classes 0
# and 1 beyond their targets): class 1's runtime was 403, 111, 368, 343, 94, 308 s in six 5 s cycles.
def test_the_runtime_shown_does_not_flicker_while_a_lock_yields(plants):
    f, targets = lp_gap_fleets(42, (0.5, 2.0, 0.5, 2.0), 14)[13]
    p = plants(fleet_yaml(f, main_limit_w=0, ride_through_s=targets, programs=["energy", "allocation"], period_s=5.0))
    k = len(np.unique(f.priority))
    seen = []
    p.hooks.append(lambda pl: seen.append((pl.t_s, [r["runtime_s"] for r in pl.class_rows()],
                                           float(pl.mem["energy.sweep"][:k, NX_YQ].max()))))
    p.run(400.0)
    assert max(y for t, _, y in seen if 200.0 <= t <= 300.0) > 0.0  # a lock yields in the window
    for c in (0, 1):  # both served throughout
        rt = np.array([r[c] for t, r, _ in seen if 200.0 <= t <= 400.0])
        assert np.isfinite(rt).all() and rt.min() > 0.0
        assert np.diff(rt).max() <= 5.0, (c, rt)


def lp_gap_case(plants, seed: int, lim: tuple, index: int, steps: int, period_s: float = 1.0):
    """Fleet `index` of the LP-gap benchmark's draw (energy_plant.lp_gap_fleets: the main supply gone from the
    start), its whole-step reference on `steps` steps of 60 s, and a plant of it at `period_s` cycles."""
    f, targets = lp_gap_fleets(seed, lim, index + 1)[index]
    lp = ride_through_lp(f.priority, f.demand_w, f.usable_wh(), f.max_discharge_w * (f.soc > 0.1), f.link_max_w,
                         targets, steps, 60.0, whole=True)
    p = plants(fleet_yaml(f, main_limit_w=0, ride_through_s=targets, programs=["energy", "allocation"],
                          period_s=period_s))
    return targets, lp, p


# What another class's locks hold beyond its target gives the bus, when that class is shed, only its batteries'
# export (kernel._release, NX_YLS): its load asks nothing then, so the part of the lock that served it is no gain.
# The LP-gap fleet 11 of `1 3 0.5 2` (13 nodes, targets {0: 600, 1: 1,200, 2: 600} s) at 1 s cycles: at 813 s
# three nodes empty; class 0 (beyond its target) took class 2's lock counted with class 2's load served (159 W
# where its battery's export gives 64 W), was served whole while class 2 was shed, and class 1, inside its
# target, got 90 % for one cycle: shed at 813 s of its 1,200 s (main). Now class 0 is shed there and class 1 rides
# its target, as the reference ({0: 840, 1: 1,200, 2: 780} s on 60 s steps), at 1 s cycles as at 5 s.
def test_a_shed_class_yields_only_its_batteries_export(plants):
    targets, lp, p = lp_gap_case(plants, 42, (1.0, 3.0, 0.5, 2.0), 11, 24)
    assert lp[1] == targets[1] == 1200.0
    p.run(1260.0)
    sim = p.first_shed_s()
    assert sim[1] >= targets[1] - 1.0, (sim, lp)
    for c in (0, 2):
        assert abs(sim[c] - lp[c]) <= 60.0, (c, sim, lp)
    # §2b rule 1 in every cycle: a class inside its target is never served in part while one beyond its own is whole
    fr, t = np.array(p.served_frac), np.array(p.times)
    inside = t < targets[1] - 1.0
    beyond_whole = (fr[:, 0] >= 1.0 - 1e-9) & (t >= targets[0])
    assert not (inside & beyond_whole & (fr[:, 1] < 1.0 - 1e-9)).any()


# A class beyond its target that the batteries' power cannot carry whole, the main supply gone, is shed and latched
# (programs/energy/rules.py decide, the power pass): its ride-through ended at its first partial cycle, and served
# in part it spent the energy the classes still served needed later. The discharge-only LP-gap fleet 0 (targets
# {0: 600, 1: 600, 2: 0, 3: 600} s): from ~650 s the batteries cannot carry classes 0 and 1 (both beyond their
# targets) together; on main class 1 was served at 73 % until 760 s, when class 0 was shed (the reference: 840 s,
# class 1 660 s); now class 1 is latched at 645 s and class 0 rides 865 s.
def test_a_class_beyond_its_target_short_of_power_is_shed_whole(plants):
    f, targets = lp_gap_fleets(42, (1.0, 3.0, 1e5, 1e5), 1)[0]
    lp = ride_through_lp(f.priority, f.demand_w, f.usable_wh(), f.max_discharge_w * (f.soc > 0.1), f.link_max_w,
                         targets, 60, 60.0, whole=True)
    p = plants(fleet_yaml(f, main_limit_w=0, ride_through_s=targets, programs=["energy", "allocation"], period_s=5.0))
    p.run(3600.0)
    sim = p.first_shed_s()
    for c in lp:
        assert abs(min(sim[c], 3600.0) - lp[c]) <= 60.0, (c, sim, lp, targets)
    # Once shed beyond its target, class 1 stays dark (one cycle in part at most) while class 0 is still served.
    fr, t = np.array(p.served_frac), np.array(p.times)
    after = (t > sim[1] + 5.0) & (t < sim[0])
    assert sim[1] > targets[1] and after.any() and fr[after, 1].max() <= 1e-9, fr[after, 1].max()


# A class cut for energy while another class is still served is shed whole in its last cycle, not served in part
# (programs/energy/rules.py decide): that part adds nothing to its time and is taken from the classes still
# served. The discharge-only LP-gap fleet 1 (targets {0: 1,200, 1: 600, 2: 1,800} s) on a 10 s grid: after class 2
# is cut at 800 s, class 0 (485 W) runs on two nodes at their limits (481 W) and a 4 W trickle; class 2's last
# 5 s cycle in part (0.8 Wh) left the trickle 0.44 Wh, and class 0 ended at 1,205 s on main (the reference
# 1,340 s); now 1,345 s.
def test_a_class_cut_for_energy_is_not_served_in_part_on_a_trickle(plants):
    f, targets = lp_gap_fleets(42, (1.0, 3.0, 1e5, 1e5), 2)[1]
    _agrees_with_the_whole_step_lp(plants, f, targets, 140, 10.0)


def _kernel_runtimes(f: FleetSpec, targets: dict, soc_min=0.1):
    """One cycle of the real kernel on arrays, main supply 0: the runtime per class."""
    out = _kernel_cycles(f, targets, 1, soc_min)
    return out["runtime_s"], out["reachable"]


def _kernel_cycles(f: FleetSpec, targets: dict, cycles: int, soc_min=0.1, main_w=0.0, each=None) -> dict:
    """`cycles` cycles of 1 s of the real kernel on arrays (the whole fleet each sweep), main supply main_w,
    the batteries not drained (no physics): per class its runtime, reachable, reserve, remaining target.
    each(i, out): after cycle i, with this dict of the live class arrays (it may change f's arrays)."""
    n = len(f)
    classes = np.unique(f.priority)
    k = 64
    class_of = np.zeros(1001, np.int64)
    class_of[:] = np.searchsorted(classes, np.arange(1001), side="right") - 1
    class_of[class_of < 0] = 0
    tg = np.zeros(k)
    tg[:classes.size] = [targets.get(int(c), 0.0) for c in classes]
    z = lambda: np.zeros(k)  # noqa: E731
    rt, reach = z(), np.zeros(k, np.uint8)
    hi = np.full(n, np.nan)
    per_class = [z() for _ in range(9)]  # dfull, dnow, dres, energy, local, tau, reserve, frac, prev_frac
    power_s = z()
    args = (np.ones(n, np.uint8), np.zeros(n, np.uint32), f.priority, f.demand_w, f.demand_w, False, f.soc,
            f.capacity_wh, f.max_discharge_w, f.link_max_w, np.zeros(n), hi, False, float(main_w), 1.0,
            soc_min, 1.0, 3600.0, 60.0, n, 60.0, True, class_of, classes.size, tg, z(), np.zeros(k, np.uint8),
            np.zeros(ST_N),
            np.zeros((k, NX_N)), *per_class, rt, reach, z(), np.zeros(k, np.uint8),
            z(), z(), z(), np.zeros((k + 1, k)), np.zeros((k + 1, k)), z(), np.zeros((2, k)), power_s, z(),
            np.zeros(n, np.int64), *(np.zeros(n) for _ in range(11)), np.zeros(n),
            np.zeros(n), np.zeros(n), np.zeros(k), np.zeros(n), np.zeros(n), np.zeros(n, np.uint32),
            # the class demand forecast off: the rule on the demand now
            0.0, np.zeros(HP_N), np.zeros((k, HZ_N)), np.zeros((k, 0)), np.full(3, np.nan), np.zeros(0), z(),
            # not a leaf of a controller tree: no decisions leased from above; then v_yld, v_str, stranded_w, v_yls
            np.zeros(1), np.zeros(k, np.int64), z(), np.zeros(n), np.zeros(n), z(), np.zeros(n))
    kc = classes.size
    live = {"runtime_s": rt[:kc], "reachable": reach[:kc], "reserve_wh": per_class[6][:kc], "power_s": power_s[:kc]}
    for i in range(cycles):
        energy_step(*args)
        if each is not None:
            each(i, live)
    return {"runtime_s": rt[:kc], "reachable": reach[:kc], "reserve_wh": per_class[6][:kc].copy(),
            "tau_s": per_class[5][:kc].copy()}


def test_closed_form_on_hundreds_of_random_fleets():
    rng = np.random.default_rng(2026)
    for _ in range(300):
        n = int(rng.integers(1, 200))
        kc = int(rng.integers(1, 8))
        f = random_fleet(rng, max(n, kc), kc)
        e = f.usable_wh().sum()
        d = f.demand_w.sum()
        d0 = f.class_demand_w()[0]
        # A critical target longer than the energy can give: class 0 alone, pooled energy over its demand.
        rt, reach = _kernel_runtimes(f, {0: 1e9})
        assert rt[0] == pytest.approx(e * 3600 / d0, rel=1e-9) and not reach[0]
        assert np.all(rt[1:] == 0.0)
        # No targets: the power order, every class together until the pool is empty.
        rt, reach = _kernel_runtimes(f, {})
        assert rt == pytest.approx(np.full(kc, e * 3600 / d), rel=1e-9) and reach.all()


def _power_bound_s(e_wh, g_w, d_w) -> float:
    """The longest time m a load d_w can be carried whole by batteries of energy e_wh and discharge limits
    g_w (links unlimited): in [0, m] a battery gives at most min(e_i, g_i m), and at a uniform pace
    (each at min(g_i, e_i / m)) exactly that, so m is the root of sum min(e_i, g_i m) = d m (concave)."""
    lo, hi = 0.0, 2.0 * e_wh.sum() * 3600.0 / d_w
    for _ in range(200):
        m = 0.5 * (lo + hi)
        if np.minimum(e_wh, g_w * m / 3600.0).sum() >= d_w * m / 3600.0:
            lo = m
        else:
            hi = m
    return lo


def test_power_runtime_is_the_closed_form_bound_where_power_strands_energy():
    """Batteries with energy their discharge limit cannot deliver in time (links unlimited): the class's
    runtime is the power bound, not pooled energy over demand; the target beyond it is unreachable and its
    reserve counts the target only as far as the power lasts (docs/energy.md "Stranded by power"). On main
    before this change: the runtime was the energy bound and the reserve the whole target."""
    rng = np.random.default_rng(12)
    checked = 0
    for _ in range(40):
        n = int(rng.integers(2, 30))
        d = rng.uniform(50, 500, n)
        g = rng.uniform(1.0, 3.0, n) * d
        f = FleetSpec(np.zeros(n, np.int64), d, rng.uniform(100, 2000, n), rng.uniform(0.3, 1.0, n), g,
                      np.full(n, 1e6))
        e = f.usable_wh()
        bound = _power_bound_s(e, g, d.sum())
        energy_s = e.sum() * 3600.0 / d.sum()
        if bound > 0.98 * energy_s:
            continue  # not stranded by power: the closed form of energy holds (test above)
        checked += 1
        target = bound + 600.0
        out = _kernel_cycles(f, {0: target}, 60)
        assert out["runtime_s"][0] == pytest.approx(bound, rel=1e-6), (bound, energy_s)
        assert not out["reachable"][0]
        assert out["reserve_wh"][0] == pytest.approx(d.sum() * bound / 3600.0, rel=1e-6)
        # A target within the power bound: reachable, its reserve the whole remaining target.
        out = _kernel_cycles(f, {0: 0.5 * bound + 60.0}, 60)
        assert out["reachable"][0] and out["reserve_wh"][0] == pytest.approx(d.sum() * 0.5 * bound / 3600.0)
    assert checked >= 10, checked


def test_a_class_the_batteries_cannot_carry_at_all_keeps_a_runtime_of_0_until_they_can():
    """Main to spare (nothing rides through: the runtimes are "if main failed now"), links unbounded, and
    the batteries' discharge (1,500 W: the charged half; the other half sits at soc_min) below class 1's
    demand (2,000 W; class 0, 500 W, has no target): from the start no schedule carries class 1 whole. Its
    power runtime is 0, an answer, checked every sweep by a probe just above 0 (rules.PROBE_FLOOR_S): its
    runtime and reserve stay put sweep after sweep. Before, the estimate fell by ~1e-15 a sweep (4.5e-13 s,
    2e-28 s, ...) until it reached 0 (sweep 22), which the next sweep read as "no probe": back to the
    horizon and down again, class 1's runtime at 2,160 s and its reserve at 1,000 Wh (0.56 Wh otherwise)
    once every 23 sweeps (on a fleet with a third class, every other sweep: docs/energy.md). Once the
    empty half recharges a little (90 Wh each, as main's spare would give them), the batteries carry
    class 1 until that energy is gone and the charged half's 1,500 W is left alone: its power runtime rises
    from 0 to that bound (sum min(e_i, g_i m) = 2,000 W m: 2,592 s) and settles there."""
    n = 8
    pr = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    d = np.where(pr == 0, 250.0, 2000.0 / 6)
    charged = np.arange(n) % 2 == 0
    g = np.where(charged, 375.0, 500.0)  # 1,500 W charged, 2,000 W behind the empty half
    f = FleetSpec(pr, d, np.full(n, 3000.0), np.where(charged, 0.9, 0.1), g, np.full(n, 1e6))
    assert g[charged].sum() < d[pr == 1].sum() < g.sum()
    seen = []

    def each(i, live):
        seen.append((live["runtime_s"].copy(), live["power_s"].copy(), live["reserve_wh"].copy()))
        if i == 39:
            f.soc[~charged] = 0.13  # the empty half recharged a little: 90 Wh each

    _kernel_cycles(f, {0: 0.0, 1: 1800.0}, 80, main_w=1.2 * d.sum(), each=each)
    rt = np.array([r for r, _, _ in seen])
    pw = np.array([p for _, p, _ in seen])
    res = np.array([x for _, _, x in seen])
    assert (pw[:, 0] == np.inf).all(), pw[:, 0]  # class 0 alone: the batteries carry it beyond the horizon
    # settled within 10 sweeps and then unchanged, sweep after sweep, while they cannot carry class 1
    assert (rt[10:40, 1] == 0.0).all() and (pw[10:40, 1] == 0.0).all(), (rt[:40, 1], pw[:40, 1])
    assert (res[10:40, 1] == res[10, 1]).all(), res[:40, 1]
    # recharged: from the probe at the floor the estimate rises to the closed-form bound and stays
    bound = _power_bound_s(f.usable_wh(), g, d[pr == 1].sum())
    assert bound == pytest.approx(2592.0, rel=1e-6)
    np.testing.assert_allclose(pw[60:, 1], bound, rtol=1e-6)
    np.testing.assert_allclose(rt[60:, 1], bound, rtol=1e-6)


def test_the_chunked_sweep_keeps_the_class_sums_within_one_sweep_of_the_truth(plants):
    f = _hetero(n=40)
    p = plants(fleet_yaml(f, main_limit_w=0, ride_through_s=TARGETS, programs=["energy", "allocation"],
                          period_s=0.01))  # sweep_s 0.1: 4 nodes a cycle, every node every 10 cycles
    # A node's sample is at most one sweep old when the sweep completes, and the sums are then used
    # for one more sweep: at most two sweeps of the fleet's draw.
    draw_wh = f.demand_w.sum() * 0.2 / 3600
    for _ in range(30):
        p.run(0.37)
        e_true = (p.sim.capacity_wh * np.maximum(0.0, p.sim.soc - 0.1)).sum()
        e_prog = p.mem["energy.state"][ST_E_WH]
        assert e_true - 1e-9 <= e_prog <= e_true + draw_wh
        assert p.mem["energy.demand_w"][:4] == pytest.approx([f.class_demand_w()[c] for c in range(4)])
    assert p.mem["energy.clock_s"][0] == pytest.approx(p.t_s + 0.01)


def test_the_snapshot_lists_the_classes(tmp_path):
    cfg = tmp_path / "energy.yaml"
    cfg.write_text(TWO % 1)
    out = tmp_path / "out.json"
    r = run_vbatt("run", str(cfg), "--cycles", "3", "--snapshot", str(out), "-q")
    assert r.returncode == 0, r.stderr
    snap = read_json(out)
    rows = snap["classes"]
    assert [r["priority"] for r in rows] == [0, 1]
    assert set(rows[0]) == {"priority", "demand_w", "demand_horizon_w", "reserve_wh", "target_s", "runtime_s",
                            "reachable"}
    # 2 x 40 Wh usable, 100 W per class; the reserve of class 0 (16.7 Wh for 600 s) is never
    # reached: beyond the targets both ride together to the end of the energy, 80 Wh / 200 W.
    assert rows[0]["demand_w"] == 100.0 and rows[0]["target_s"] == 600.0 and rows[1]["target_s"] == 60.0
    assert rows[0]["reserve_wh"] == pytest.approx(100.0 * 600 / 3600, rel=1e-3)
    assert [r["runtime_s"] for r in rows] == pytest.approx([1440.0, 1440.0], rel=1e-3)
    assert all(r["reachable"] for r in rows)
    assert all(n["runtime_s"] > 0 for n in snap["nodes"])


def test_a_program_built_again_without_the_configuration_keeps_the_targets(plants):
    """A parameter reload builds the programs from their parameters alone and binds them to the same
    memory (ScanEngine._rebind): the targets and soc_min must survive it."""
    from vbatt.programs.energy import Energy, EnergyParams

    p = plants(TWO % 1 + "cycle: {cycle_ms: 1000}\n")
    p.run(3)
    assert p.mem["energy.target_s"][:2].tolist() == [600.0, 60.0]
    again = Energy(EnergyParams(reset_hold_s=30), len(p.prio))
    p.eng.steps = [(pid, again.bind(p.img, p.eng.ctx) if pid == "energy" else s) for pid, s in p.eng.steps]
    p.run(3)
    assert p.mem["energy.target_s"][:2].tolist() == [600.0, 60.0]
    assert p.mem["energy.soc_min"][0] == 0.1 and p.class_rows()[0]["runtime_s"] > 0


# Stranded energy serves its own node (docs/energy.md "Stranded energy serves its own load"): class 0 (two fast
# nodes, 280 Wh, target 7,200 s it cannot reach) rides on them and on the 50 W the other two export; class 2's
# node (a 40 W load inside its 50 W link) and class 3's (a 100 W load beyond it) hold 2 kWh each, far more than
# their links carry out within any horizon. Serving their own loads from it takes nothing from class 0: the
# reference serves all three until class 0 ends at 3,360 s. Before, classes 2 and 3 were shed at 0 s: their
# draw came off class 0's margin, which is 0 once its power runtime binds.
def test_a_class_on_its_own_stranded_energy_is_not_shed_for_a_more_critical_one(plants):
    f = FleetSpec([0, 0, 2, 3], [250.0, 150.0, 40.0, 100.0], [200.0, 150.0, 2500.0, 2500.0], [0.9] * 4,
                  [2000.0, 2000.0, 1000.0, 1000.0], [2000.0, 2000.0, 50.0, 50.0])
    _agrees_with_the_whole_step_lp(plants, f, {0: 7200.0, 2: 0.0, 3: 0.0}, 40, 120.0)


# A controller that starts in an outage decides on settled power runtimes (programs/energy/rules.py settle). At a
# cold start the estimates begin at "no bound" and reach their roots in a few sweeps; a class's reserve counted its
# whole remaining target meanwhile, and a class cut then stays shed. LP-gap `0.5 2 0.5 2 --seed 5` fleet 18
# (10 nodes, targets {0: 1,800, 1: 600, 2: 600, 3: 1,800} s): the reference sheds class 2 at once (its power cannot
# be carried) and serves class 3 720 s; before, class 3 was shed in the first cycle for class 2's reserve, and class
# 0 rode 3,549 s on it. (A class the batteries' power cannot carry now is still shed at once: the power pass.)
def test_a_start_in_an_outage_cuts_no_class_before_the_power_runtime_settles(plants):
    targets, lp, p = lp_gap_case(plants, 5, (0.5, 2.0, 0.5, 2.0), 18, 40)
    assert lp[2] == 0.0 and lp[3] >= 660.0, lp
    p.run(2400.0)
    sim = p.first_shed_s()
    for c in lp:
        assert abs(min(sim[c], 2400.0) - lp[c]) <= 60.0, (c, sim, lp)


# A class's draw on energy its nodes could not export in time is no one else's (kernel.py _strand_horizons): it is
# held against the horizons the class rules check it against (the more critical classes' while it rides through),
# not against the longest of all (an hour at least). LP-gap `1 3 0.5 2 --seed 5` fleet 12 (6 nodes, targets {0:
# 1,800, 1: 1,800, 2: 1,200} s, none of the first two reachable): class 2's two nodes hold 173 Wh behind 129 W of
# links, its load is 184 W; the reference serves it its 1,200 s while class 0 rides 540 s and class 1 60 s. Before,
# class 2 was shed at once, for a reserve of classes 0 and 1 its draw did not touch.
def test_a_class_on_its_own_link_bound_energy_rides_its_target(plants):
    targets, lp, p = lp_gap_case(plants, 5, (1.0, 3.0, 0.5, 2.0), 12, 22)
    assert lp[2] == targets[2] == 1200.0 and lp[0] < targets[0], lp
    p.run(1260.0)
    sim = p.first_shed_s()
    assert sim[2] >= targets[2] - 1.0, (sim, lp)
    for c in (0, 1):
        assert abs(sim[c] - lp[c]) <= 60.0, (c, sim, lp)


# A horizon that ends within two sweeps is left to the power pass (rules.decide): the deliverable-energy table is
# up to a sweep old, and the draws it takes off the margin per horizon outgrew the margin in the last seconds of a
# more critical class's target. LP-gap `0.5 2 0.5 2 --seed 11` fleet 7 (14 nodes, targets {0: 600, 1: 1,200, 2:
# 1,200} s; the reference {0: 600, 1: 1,200, 2: 900} s): class 2, inside its target, was latched at 598 s, 2 s
# before class 0's target ended, and class 0 rode beyond its own to 815 s on the energy (§2b rule 1 broken).
def test_a_class_inside_its_target_outlasts_the_end_of_a_more_critical_target(plants):
    targets, lp, p = lp_gap_case(plants, 11, (0.5, 2.0, 0.5, 2.0), 7, 20)
    assert lp[0] == targets[0] and lp[2] >= 840.0, lp
    p.run(1200.0)
    sim = p.first_shed_s()
    for c in lp:
        assert abs(min(sim[c], 1200.0) - lp[c]) <= 60.0, (c, sim, lp)
