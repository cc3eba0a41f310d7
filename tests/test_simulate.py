"""`vbatt simulate` and `vbatt size`: the real scan engine, real files, the real command.

Scenarios are small (seconds of wall time); the examples are run scaled down by
replacing their `scenario:` section's duration.
"""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest

from vbatt.scenario import load_scenario_text, simulate
from vbatt.scenario.metrics import policy_metrics
from vbatt.config.yamlsrc import ConfigError

from conftest import REPO, read_json, run_vbatt

SCENARIOS = REPO / "examples" / "scenarios"


def shorter(text: str, duration_s: float, step_s: float | None = None) -> str:
    text = re.sub(r"(?m)^  duration_s: .*$", f"  duration_s: {duration_s}", text)
    if step_s is not None:
        text = re.sub(r"(?m)^  step_s: .*$", f"  step_s: {step_s}", text)
    return text


# -- the seed example: one step of simulate is one cycle of `vbatt run` ---------------------------------
def test_seed_first_step_is_the_first_cycle_of_vbatt_run(tmp_path):
    out = tmp_path / "snap.json"
    r = run_vbatt("run", "examples/seed.yaml", "--cycles", "1", "--snapshot", str(out), "-q")
    assert r.returncode == 0, r.stderr
    snap = {n["id"]: n for n in read_json(out)["nodes"]}
    loaded = load_scenario_text(shorter((SCENARIOS / "seed.yaml").read_text(), 1), "seed.yaml")
    res = simulate(loaded, "vbatt")
    assert res.steps == 1
    for i, nid in enumerate(loaded.fleet.ids):
        for f in ("battery_w", "bus_w", "served_w", "shed_w", "lo_w", "hi_w", "forecast_w"):
            assert res.final[f][i] == snap[nid][f], (nid, f)
    assert (res.final["battery_w"].tolist(), res.final["bus_w"].tolist()) == ([100.0, 150.0], [100.0, -100.0])
    assert read_json(out)["aggregate"]["main_w"] == res.final["agg.main_w"]


# -- ride-through per policy, by hand ---------------------------------------------------------------------
# Ideal batteries (no losses), no main supply, soc_min 0.1, 5 s steps, 30,000 s:
#   A (class 0): 150 W, 1000 Wh at soc 0.6 -> 500 Wh usable.   B (class 1): 50 W, 1000 Wh at soc 1.0 -> 900 Wh,
#   B may discharge at most 150 W.
# isolated: A on its own: 500 Wh / 150 W = 12,000 s; B: 900 Wh / 50 W = 18 h > 30,000 s: never shed.
# vbatt: batteries share the 200 W by usable energy and empty together: 1,400 Wh / 200 W = 25,200 s, both.
#   (B gives 200 * 900/1400 = 128.6 W <= 150 W throughout: the split is constant.)
# proportional: shares by SoC with equal capacities keep soc_A / soc_B = 0.6 while the total falls
#   0.2 per hour: A reaches 0.1 when soc_B = 1/6, after (1.6 - 0.1 - 1/6) / 0.2 h = 24,000 s. Then B alone
#   gives 150 W < 200 W: class 1 (B's own load) is shed at 24,000 s, class 0 is carried over the bus by B's
#   (1/6 - 0.1) * 1000 Wh = 66.7 Wh for 66.7 / 150 h = 1,600 s more: 25,600 s.
TWO_NODES = """
cycle: {cycle_ms: 1000}
plant: {main_limit_w: 0}
nodes:
  - {id: A, priority: 0, demand_w: 150, max_discharge_w: 1000, max_charge_w: 500, capacity_wh: 1000, soc: 0.6, link_max_w: 1000}
  - {id: B, priority: 1, demand_w: 50, max_discharge_w: 150, max_charge_w: 500, capacity_wh: 1000, soc: 1.0, link_max_w: 1000}
programs:
  - allocation: {soc_min: 0.1}
scenario:
  duration_s: 30000
  step_s: 5
"""


@pytest.mark.parametrize("policy, expect", [
    ("isolated", {"0": 12000.0, "1": None}),
    ("vbatt", {"0": 25200.0, "1": 25200.0}),
    ("proportional", {"0": 25600.0, "1": 24000.0}),
])
def test_ride_through_per_policy_agrees_with_the_hand_calculation(policy, expect):
    loaded = load_scenario_text(TWO_NODES, "two.yaml")
    m = policy_metrics(simulate(loaded, policy))
    for c, t in expect.items():
        got = m["classes"][c]
        if t is None:
            assert got["first_shed_s"] is None and got["ride_through_s"] == 30000.0 and got["never_shed_after_drop"]
        else:
            assert abs(got["ride_through_s"] - t) <= 5.0, (c, got)
            assert got["first_shed_s"] == got["ride_through_s"]  # no main supply drop: counted from 0
    # energy balance: what was served came from the batteries (no main supply)
    assert sum(x["served_wh"] for x in m["classes"].values()) == pytest.approx(m["fleet"]["battery_wh"], rel=1e-9)


def test_outage_drop_starts_the_ride_through_clock():
    # 1,000 W of main supply until the outage at 1,000 s: isolated serves both loads from it and charges A
    # (B is full) at its 500 W limit: +138.9 Wh, soc 0.7389. On its own after that: 638.9 Wh / 150 W = 15,333 s.
    text = TWO_NODES.replace("main_limit_w: 0}", "main_limit_w: 1000}").replace(
        "  step_s: 5\n", "  step_s: 5\n  events: [{at_s: 1000, until_s: 29000, main_limit_w: 0}]\n")
    m = policy_metrics(simulate(load_scenario_text(text, "two.yaml"), "isolated"))
    assert m["fleet"]["main_drop_s"] == 1000.0
    # 700 W before the outage (loads + A's charge); after it both batteries recharge at the 1,000 W limit
    assert m["fleet"]["peak_main_w"] == pytest.approx(1000.0)
    ride = m["classes"]["0"]["ride_through_s"]
    assert abs(ride - (0.6 + 500 * 1000 / 3600 / 1000 - 0.1) * 1000 / 150 * 3600) <= 5.0
    assert m["classes"]["0"]["first_shed_s"] == 1000.0 + ride


# The independent reserve margin counts the demand that came: one node, 100 W stepping to 300 W at 1,800 s,
# a 1 h target, main supply carrying it all (the battery stays full: 900 Wh usable above soc_min 0.1). At
# t = 0 the next hour draws 50 + 150 = 200 Wh; from 1,800 s on 300 Wh (the window past the end of the run
# counts the mean of its part, 300 W): the least margin is 900 - 300 = 600 Wh. The demand of the step
# times the target would say 800 Wh at t = 0 and 600 Wh only from 1,800 s; a 3 h target (past the run)
# needs 300 W for 3 h at 1,800 s: 0 Wh.
STEP_UP = """
cycle: {cycle_ms: 60000}
plant: {main_limit_w: 5000, ride_through_s: {0: %s}}
nodes:
  - {id: A, priority: 0, demand_w: 100, demand_profile: {kind: step, at_s: 1800, to_w: 300},
     max_discharge_w: 1000, max_charge_w: 500, capacity_wh: 1000, soc: 1.0, link_max_w: 1000}
programs: [energy, allocation]
scenario: {duration_s: 3600, step_s: 60}
"""


@pytest.mark.parametrize("target_s, margin_wh", [(3600, 600.0), (10800, 0.0), (1800, 750.0)])
def test_the_independent_reserve_margin_counts_the_demand_that_came(target_s, margin_wh):
    m = policy_metrics(simulate(load_scenario_text(STEP_UP % target_s, "step.yaml"), "vbatt"))
    assert m["fleet"]["shed_wh"] == 0.0 and m["fleet"]["battery_wh"] == 0.0
    assert m["reserve"]["whole_margin_min_wh"] == pytest.approx(margin_wh, abs=1e-6)


# -- determinism ------------------------------------------------------------------------------------------
def _stable(m: dict) -> dict:
    return {"classes": m["classes"], "fleet": m["fleet"]}


def test_same_seed_same_metrics_and_another_seed_differs():
    text = shorter((SCENARIOS / "outage.yaml").read_text(), 900, 5)
    a = policy_metrics(simulate(load_scenario_text(text, "o.yaml"), "vbatt"))
    b = policy_metrics(simulate(load_scenario_text(text, "o.yaml"), "vbatt"))
    assert _stable(a) == _stable(b)
    c = policy_metrics(simulate(load_scenario_text(text.replace("  seed: 7", "  seed: 8"), "o.yaml"), "vbatt"))
    assert c["classes"]["0"]["demand_wh"] != a["classes"]["0"]["demand_wh"]  # the noise follows the seed


# -- events -------------------------------------------------------------------------------------------------
EVENTS = TWO_NODES.replace("duration_s: 30000", "duration_s: 100").replace("plant: {main_limit_w: 0}",
                                                                          "plant: {main_limit_w: 10000}")


def test_events_act_through_the_engine():
    text = EVENTS + """  events:
    - {at_s: 10, until_s: 20, fail: true, nodes: [B]}
    - {at_s: 30, priority: 5, nodes: [A]}
    - {at_s: 40, trip: OVER_TEMPERATURE, nodes: [A]}
    - {at_s: 50, reset_trip: true, nodes: [A]}
    - {at_s: 60, capacity_scale: 0.5, nodes: [B]}
    - {at_s: 70, ambient_c: 40, nodes: ["*"]}
"""
    loaded = load_scenario_text(text, "ev.yaml")
    assert [len(x) for x in loaded.event_nodes] == [1, 1, 1, 1, 1, 2]
    r = simulate(loaded, "vbatt")
    assert r.classes == [0, 1, 5]
    m = policy_metrics(r)
    # A tripped at 40 s (its whole load shed) until the reset at 50 s; it was class 5 by then
    assert m["classes"]["5"]["first_shed_s"] == 40.0
    assert m["classes"]["5"]["shed_wh"] == pytest.approx(150 * 10 / 3600)
    assert m["classes"]["0"]["first_shed_s"] is None
    assert r.final["trip"].tolist() == [0, 0]
    assert r.final["capacity_wh"].tolist() == [1000.0, 500.0]  # B faded to half
    assert r.final["temperature_c"].tolist() == [40.0, 40.0]  # no thermal model: the batteries sit at ambient


def test_failed_node_runs_on_its_own_battery():
    text = EVENTS.replace("plant: {main_limit_w: 10000}", "plant: {main_limit_w: 0}") + \
        "  events: [{at_s: 0, fail: true, nodes: [B]}]\n"
    r = simulate(load_scenario_text(text, "f.yaml"), "vbatt")
    m = policy_metrics(r)
    assert m["classes"]["1"]["shed_wh"] == 0.0  # B serves its own 50 W from its battery
    assert m["classes"]["0"]["first_shed_s"] is None  # A on its own battery: 150 W of 1000 W allowed
    assert m["fleet"]["battery_wh"] == pytest.approx(200 * 100 / 3600)
    assert r.final["bus_w"].tolist() == [0.0, 0.0]  # B is offline for the controller: no transfer


# -- bad scenarios: config errors with file:line, exit 2 -------------------------------------------------------
BAD = [
    ("  events: [{at_s: -5, main_limit_w: 0}]\n", r"bad\.yaml:12: scenario\.events\[0\]\.at_s: -5 s is before the start"),
    ("  events: [{at_s: 200, main_limit_w: 0}]\n", r"bad\.yaml:12: scenario\.events\[0\]\.at_s: 200 s is after the end"),
    ("  events: [{at_s: 5, fail: true, nodes: [C]}]\n", r"bad\.yaml:12: scenario\.events\[0\]\.nodes: unknown node 'C'"),
    ("  policies: [vbatt, greedy]\n", r"bad\.yaml:12: scenario\.policies\[1\]: .*unknown policy 'greedy'"),
    ("  events: [{at_s: 5, fail: true, priority: 2}]\n", r"bad\.yaml:12: scenario\.events\[0\]: .*exactly one thing"),
]


@pytest.mark.parametrize("tail, message", BAD, ids=["before-0", "after-end", "unknown-node", "unknown-policy",
                                                   "two-actions"])
def test_bad_scenarios_name_file_and_line_and_exit_2(write_config, tail, message):
    path = write_config(EVENTS + tail, "bad.yaml")
    r = run_vbatt("simulate", str(path), "-q")
    assert r.returncode == 2, r.stdout + r.stderr
    assert re.search(message, " ".join(r.stderr.split())), r.stderr


def test_step_longer_than_the_duration_and_unknown_cli_policy(write_config):
    path = write_config(EVENTS.replace("step_s: 5", "step_s: 500"), "bad.yaml")
    r = run_vbatt("simulate", str(path), "-q")
    assert r.returncode == 2
    assert re.search(r"bad\.yaml:11: scenario\.step_s: 500 s is longer than duration_s \(100 s\)", r.stderr), r.stderr
    r = run_vbatt("simulate", str(write_config(EVENTS, "ok.yaml")), "--policy", "greedy", "-q")
    assert r.returncode == 2 and "unknown policy 'greedy'" in r.stderr and "isolated" in r.stderr
    with pytest.raises(ConfigError) as exc:
        load_scenario_text(EVENTS.replace("scenario:\n", "scenario:\n  horizon_s: 5\n"), "x.yaml")
    assert "x.yaml:10: scenario.horizon_s: unknown key" in str(exc.value)


# -- the command: metrics JSON and the report ---------------------------------------------------------------
def test_simulate_writes_metrics_and_a_report_with_plots(tmp_path):
    scen = tmp_path / "outage.yaml"
    scen.write_text(shorter((SCENARIOS / "outage.yaml").read_text(), 1800, 5))
    rep, mj = tmp_path / "report", tmp_path / "m.json"
    r = run_vbatt("simulate", str(scen), "--report", str(rep), "--metrics-json", str(mj))
    assert r.returncode == 0, r.stderr
    m = read_json(mj)
    assert set(m["sim"]) >= {"duration_s", "step_s", "steps", "nodes", "wall_s"}
    assert m["sim"]["nodes"] == 200 and m["sim"]["steps"] == 360
    # the plant runs `energy`: vbatt-instant (the pipeline without it) runs too, by default
    assert list(m["policies"]) == ["isolated", "proportional", "vbatt", "vbatt-instant"]
    assert "energy" in m["policies"]["vbatt"]["pipeline"] and "energy" not in m["policies"]["vbatt-instant"]["pipeline"]
    for p in m["policies"].values():
        assert set(p["classes"]) == {"0", "1", "2", "3"}
        for c in p["classes"].values():
            assert set(c) >= {"first_shed_s", "ride_through_s", "served_wh", "demand_wh", "shed_wh"}
            assert c["served_wh"] + c["shed_wh"] == pytest.approx(c["demand_wh"], rel=1e-9)
        assert set(p["fleet"]) >= {"battery_wh", "peak_main_w", "soc_spread_max", "stranded_wh", "setpoint_reversals"}
    # the aged small batteries run out within the half hour on their own; pooled, nothing is shed yet
    assert 0 < m["policies"]["isolated"]["fleet"]["first_shed_s"] < 1800
    assert m["policies"]["vbatt"]["fleet"]["first_shed_s"] is None
    import matplotlib.image as mpimg

    for name in ("ride_through.png", "served.png", "soc.png", "shed.png"):
        png = rep / name
        assert png.stat().st_size > 5000
        img = mpimg.imread(png)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
        assert np.unique(img.reshape(-1, img.shape[2]), axis=0).shape[0] > 20  # drawn, not blank
    md = (rep / "report.md").read_text()
    assert "| class | first shed | ride-through |" in md and "![" in md and "x real time" in md
    assert (rep / "runtime.png").stat().st_size > 5000  # the energy layer's runtime per class


# -- memory stays flat ----------------------------------------------------------------------------------------
def test_memory_does_not_grow_with_the_duration():
    text = (SCENARIOS / "peak.yaml").read_text()

    def peak(duration_s):
        loaded = load_scenario_text(shorter(text, duration_s, 60), "peak.yaml")
        tracemalloc.start()
        simulate(loaded, "vbatt", points=200)
        used = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return used

    peak(600)  # compile and caches
    short, long = peak(6 * 3600), peak(3 * 86400)  # 360 and 4,320 steps
    assert long < short * 1.1 + 64 * 1024, (short, long)


# -- vbatt size ----------------------------------------------------------------------------------------------
# Ideal batteries, 100 W per node, soc 1.0, soc_min 0.1, targets 1 h for both classes, 10 s steps.
# isolated: B (100 Wh) must hold 100 Wh usable alone: 0.9 * 100 * s >= 100 -> s = 1.111, 1,222 Wh in all.
# vbatt: the pool must hold 200 Wh usable: 0.9 * 1100 * s >= 200 -> s = 0.202, 222 Wh in all.
SIZE = """
cycle: {cycle_ms: 1000}
plant: {main_limit_w: 5000}
nodes:
  - {id: A, priority: 0, demand_w: 100, max_discharge_w: 1000, max_charge_w: 500, capacity_wh: 1000, soc: 1.0, link_max_w: 1000}
  - {id: B, priority: 1, demand_w: 100, max_discharge_w: 1000, max_charge_w: 500, capacity_wh: 100, soc: 1.0, link_max_w: 1000}
programs:
  - allocation: {soc_min: 0.1}
scenario:
  duration_s: 7200
  step_s: 10
  targets_s: {0: 3600, 1: 3600}
"""


def test_size_pooled_against_isolated_by_hand(write_config, tmp_path):
    out = tmp_path / "size.json"
    r = run_vbatt("size", str(write_config(SIZE, "size.yaml")), "--json", str(out), "--tolerance", "0.005", "-q")
    assert r.returncode == 0, r.stderr
    doc = read_json(out)
    iso, pool = doc["policies"]["isolated"], doc["policies"]["vbatt"]
    assert iso["scale"] == pytest.approx(100 / 90, rel=0.01)
    assert pool["scale"] == pytest.approx(200 / 990, rel=0.01)
    assert doc["saving_wh"] == pytest.approx(iso["capacity_wh"] - pool["capacity_wh"])
    assert doc["saving_wh"] == pytest.approx(1100 * (100 / 90 - 200 / 990), rel=0.02)
    assert "saving" in r.stdout
    r = run_vbatt("size", str(write_config(SIZE, "size.yaml")), "--targets", "0=3600,x", "-q")
    assert r.returncode == 2 and "CLASS=SECONDS" in r.stderr


def test_runtime_series_is_plotted_when_a_program_keeps_one(tmp_path):
    from vbatt.scenario.metrics import machine, sim_metrics
    from vbatt.scenario.report import write_report
    from vbatt.scenario.record import CS

    text = TWO_NODES.replace("duration_s: 30000", "duration_s: 3600").replace(
        "programs:\n", "programs:\n  - user:\n      steps:\n        - function: tests/sim_runtime_program.py:own_runtime\n"
        "          params: {soc_min: 0.1}\n"
        "          writes: [runtime_s]\n")
    loaded = load_scenario_text(text, "rt.yaml")
    res = [simulate(loaded, p, points=60) for p in ("isolated", "vbatt")]
    rt = res[0].rec.rec_c[:, CS.RUNTIME_S, :]
    # isolated: A's own runtime falls from 500 Wh / 150 W = 12,000 s by one second per second
    # (sampled at the last step of each minute: t = 55 s, ..., 3,595 s)
    assert rt[0, 0] == pytest.approx(12000.0 - 55.0, abs=1e-6)
    assert rt[-1, 0] == pytest.approx(12000.0 - 3595.0, abs=1e-6)
    metrics = {"sim": sim_metrics(res), "policies": {r.policy: policy_metrics(r) for r in res}, "machine": machine()}
    files = write_report(tmp_path, loaded, res, metrics, "rt.yaml")
    assert tmp_path / "runtime.png" in files and (tmp_path / "runtime.png").stat().st_size > 5000
    assert "runtime.png" in (tmp_path / "report.md").read_text()


# -- the reference policies, one cycle at a time ----------------------------------------------------------------
def one_step(nodes: str, main_w: float, policy: str) -> dict:
    text = (f"cycle: {{cycle_ms: 1000}}\nplant: {{main_limit_w: {main_w}}}\nnodes:\n{nodes}"
            "programs: [allocation]\nscenario: {duration_s: 1, step_s: 1}\n")
    return simulate(load_scenario_text(text, "one.yaml"), policy).final


PAIR = """  - {id: A, priority: 0, demand_w: 200, max_discharge_w: 100, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
  - {id: B, priority: 1, demand_w: 100, max_discharge_w: 150, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
"""


@pytest.mark.parametrize("main_w, battery, bus, shed", [
    (0, [100, 100], [0, 0], [100, 0]),  # each on its own battery; A's missing 100 W is shed at A
    (150, [100, 50], [100, 50], [0, 0]),  # the main supply shared by the same fraction (1/2) of each demand
    (300, [0, 0], [200, 100], [0, 0]),  # all load from the main supply
    (1000, [-100, -100], [300, 200], [0, 0]),  # the spare charges both batteries at their limits
    (400, [-50, -50], [250, 150], [0, 0]),  # 100 W spare: the same fraction of each battery's room
])
def test_isolated_policy_table(main_w, battery, bus, shed):
    f = one_step(PAIR, main_w, "isolated")
    assert f["battery_w"].tolist() == pytest.approx(battery)
    assert f["bus_w"].tolist() == pytest.approx(bus)
    assert f["shed_w"].tolist() == pytest.approx(shed)
    assert f["served_w"] == pytest.approx(f["battery_w"] + f["bus_w"])
    assert f["agg.main_w"] == pytest.approx(sum(bus)) and min(bus) >= 0  # imports only: no node-to-node flow


def test_proportional_splits_by_soc_and_ignores_capacity():
    nodes = """  - {id: A, demand_w: 200, max_discharge_w: 500, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
  - {id: B, demand_w: 50, max_discharge_w: 500, max_charge_w: 100, capacity_wh: 4000, soc: 0.4, link_max_w: 1000}
"""
    p = one_step(nodes, 0, "proportional")
    assert p["battery_w"].tolist() == pytest.approx([250 * 0.8 / 1.2, 250 * 0.4 / 1.2])
    v = one_step(nodes, 0, "vbatt")  # usable energy: A 1000 * 0.7 = 700 Wh, B 4000 * 0.3 = 1200 Wh
    assert v["battery_w"].tolist() == pytest.approx([250 * 700 / 1900, 250 * 1200 / 1900])
    # priorities still order the shedding: 300 W of battery for 350 W of load cuts the less critical class
    cut = one_step(PAIR.replace("max_discharge_w: 150", "max_discharge_w: 200").replace("demand_w: 100", "demand_w: 150"),
                   0, "proportional")
    assert cut["shed_w"].tolist() == pytest.approx([0.0, 50.0])
