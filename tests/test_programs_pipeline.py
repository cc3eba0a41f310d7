"""The program pipeline in the real scan engine and through the real `vbatt` command.

In-process tests build the image and ScanEngine from a YAML text, feed node data the way
the simulated driver does (SimFleet.fill), and step cycles with an explicit time: no sleeping.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from vbatt.kernel.clock import FakeClock
from vbatt.config.plant import ConfigError, load_config_text
from vbatt.drivers.sim.driver import SimFleet
from vbatt.kernel.image import Ctl, Mode, Op, ProcessImage
from vbatt.config.plan import build_programs, image_spec
from vbatt.programs.codes import Alarm
from vbatt.kernel.scan import ScanEngine

from conftest import REPO, read_json, run_vbatt

PERIOD_NS = 10_000_000


class Plant:
    def __init__(self, text: str):
        self.cfg, fleet = load_config_text(text)
        progs = build_programs(self.cfg, len(fleet))
        spec = image_spec(self.cfg, fleet, progs, [(0, len(fleet), "sim")])
        self.img = ProcessImage.create(spec)
        self.img.node["priority"][:] = fleet.values["priority"]
        self.img.agg["main_limit_w"][0] = self.cfg.plant.main_limit_w
        self.img.ctl[Ctl.MODE] = Mode.RUN
        self.eng = ScanEngine(self.img, progs, self.cfg, FakeClock())
        self.sim = SimFleet(fleet, 0, len(fleet))
        self.now = 1_000_000_000
        self.n = self.img.node

    def cycle(self, k: int = 1, physics: bool = False):
        for _ in range(k):
            if physics:
                self.sim.step(self.now * 1e-9, PERIOD_NS * 1e-9, self.n["battery_w"])
            st = {f: self.n[f] for f in ("voltage_v", "current_a", "temperature_c", "soc", "capacity_wh",
                                         "demand_w", "max_discharge_w", "max_charge_w", "link_max_w",
                                         "updated_ns", "fault")}
            self.sim.fill(st, self.now)
            self.eng.cycle(self.now)
            self.eng.last_release_ns = self.now
            self.now += PERIOD_NS

    def close(self):
        self.img.close()


@pytest.fixture
def plant():
    made = []

    def make(text):
        p = Plant(text)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.mark.parametrize("example, expect", [
    ("seed.yaml", {"A": (100.0, 100.0, 0.0), "B": (150.0, -100.0, 0.0)}),
    ("shortage.yaml", {"critical": (100.0, 100.0, 0.0), "low": (50.0, -50.0, 200.0)}),
    ("balancing.yaml", {"a": (250.0, 350.0, 0.0), "b": (500.0, -350.0, 0.0), "c": (500.0, 0.0, 0.0)}),
])
def test_examples_through_the_vbatt_command(tmp_path, example, expect):
    out = tmp_path / "out.json"
    r = run_vbatt("run", str(REPO / "examples" / example), "--cycles", "1", "--snapshot", str(out), "-q")
    assert r.returncode == 0, r.stderr
    snap = read_json(out)
    nodes = {n["id"]: n for n in snap["nodes"]}
    for nid, (battery, bus, shed) in expect.items():
        n = nodes[nid]
        assert n["battery_w"] == pytest.approx(battery, abs=1e-9)
        assert n["bus_w"] == pytest.approx(bus, abs=1e-9)
        assert n["shed_w"] == pytest.approx(shed, abs=1e-9)
        assert n["served_w"] == pytest.approx(n["battery_w"] + n["bus_w"], abs=1e-12)
    if example == "seed.yaml":  # exactly, not approximately
        assert (nodes["A"]["battery_w"], nodes["A"]["bus_w"]) == (100.0, 100.0)
        assert (nodes["B"]["battery_w"], nodes["B"]["bus_w"]) == (150.0, -100.0)
    agg = snap["aggregate"]
    assert agg["main_w"] == pytest.approx(sum(n["bus_w"] for n in snap["nodes"]), abs=1e-9)


def test_user_program_example_through_the_vbatt_command(tmp_path):
    out = tmp_path / "out.json"
    r = run_vbatt("run", "examples/user_program.yaml", "--cycles", "3", "--snapshot", str(out), "-q")
    assert r.returncode == 0, r.stderr
    nodes = {n["id"]: n for n in read_json(out)["nodes"]}
    assert nodes["hot"]["hi_w"] == 0.0 and nodes["hot"]["battery_w"] == 0.0
    assert nodes["cool"]["battery_w"] == pytest.approx(200.0)
    assert nodes["hot"]["shed_w"] == 0.0


SEED = (REPO / "examples" / "seed.yaml").read_text()
TWO = """
plant: {main_limit_w: 0}
nodes:
  - {id: A, priority: 0, demand_w: 200, max_discharge_w: 300, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
  - {id: B, priority: 1, demand_w: 100, max_discharge_w: 300, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
"""


def test_ramp_limits_setpoint_changes_after_the_first_cycle(plant):
    p = plant(TWO + "programs: [{allocation: {ramp_w_per_s: 1000}}]")
    p.cycle()
    assert p.n["battery_w"].tolist() == [150.0, 150.0]  # first cycle: no ramp from zero
    p.img.agg["main_limit_w"][0] = 1000.0  # main supply arrives: batteries would jump to -100 W each
    for k in range(1, 26):
        p.cycle()
        # 1000 W/s * 10 ms: each battery moves 10 W per cycle, the main supply takes the rest
        assert p.n["battery_w"] == pytest.approx([150.0 - 10 * k] * 2)
        assert p.img.agg["main_w"][0] == pytest.approx(300.0 - p.n["battery_w"].sum())
    p.cycle(5)
    assert p.n["battery_w"] == pytest.approx([-100.0, -100.0])  # settled: the spare 200 W charges


def test_ramp_gives_way_when_load_would_be_shed(plant):
    p = plant(TWO + "programs: [{allocation: {ramp_w_per_s: 1000}}]")
    p.cycle()
    p.sim.demand_w[:] = [600.0, 0.0]  # a step the ramp cannot follow without shedding
    p.cycle()
    assert p.n["shed_w"].tolist() == [0.0, 0.0]
    assert p.n["battery_w"].sum() == pytest.approx(600.0)


def test_restore_hysteresis_holds_the_shed_for_the_hold_time(plant):
    p = plant(TWO.replace("max_discharge_w: 300, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}\n  - {id: B",
                          "max_discharge_w: 150, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}\n  - {id: B")
              .replace("demand_w: 100, max_discharge_w: 300", "demand_w: 100, max_discharge_w: 100")
              + "programs: [{allocation: {restore_hold_s: 0.5, restore_margin: 0.05}}]")
    p.cycle()
    assert p.n["shed_w"].tolist() == [0.0, 50.0]  # 250 W of battery for 300 W: B (priority 1) is cut
    p.img.agg["main_limit_w"][0] = 1000.0  # supply is back
    p.cycle(49)
    assert p.n["shed_w"][1] == 50.0  # held for the hold time
    p.cycle()
    assert p.n["shed_w"][1] == 0.0
    p.img.agg["main_limit_w"][0] = 0.0  # shedding again is immediate
    p.cycle()
    assert p.n["shed_w"][1] == 50.0


def test_the_hold_keeps_the_allocations_own_shed_and_a_programs_cap_ends_when_the_program_lifts_it(plant):
    """The hold is for the allocator's own shed (for power): a program's cap (serve_max_w, e.g. the energy
    program's peak-shaving cut) ends when the program lifts it; the program keeps its own cut calm. Held too,
    a lifted cut stayed shed for the hold while the program counted on the load served (peak.yaml: 1 kW for
    300 s past the evening's peak, +34 Wh a day over the reference)."""
    p = plant(TWO.replace("max_discharge_w: 300, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}\n  - {id: B",
                          "max_discharge_w: 150, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}\n  - {id: B")
              .replace("demand_w: 100, max_discharge_w: 300", "demand_w: 100, max_discharge_w: 100")
              + "programs: [{allocation: {restore_hold_s: 0.5, restore_margin: 0.05}}]")
    p.img.agg["main_limit_w"][0] = 1000.0
    p.cycle()
    assert p.n["shed_w"].tolist() == [0.0, 0.0]
    p.n["serve_max_w"][1] = 20.0  # a program cuts B
    p.cycle()
    assert p.n["shed_w"][1] == pytest.approx(80.0)
    p.n["serve_max_w"][1] = math.inf  # ... and lifts its cut: served at once
    p.cycle()
    assert p.n["shed_w"].tolist() == [0.0, 0.0]
    p.img.agg["main_limit_w"][0] = 0.0  # a shed for power (B: 50 W) ...
    p.cycle()
    assert p.n["shed_w"][1] == 50.0
    p.img.agg["main_limit_w"][0] = 1000.0  # ... is held after the supply is back, under a program's cut too
    p.n["serve_max_w"][1] = 20.0
    p.cycle()
    assert p.n["shed_w"][1] == pytest.approx(80.0)
    p.n["serve_max_w"][1] = math.inf
    p.cycle(48)
    assert p.n["shed_w"][1] == 50.0  # the cut lifted, the allocator's own shed held for the hold time (50 cycles)
    p.cycle()
    assert p.n["shed_w"][1] == 0.0


def test_trip_in_the_pipeline_and_operator_reset(plant):
    p = plant(SEED.replace("  - protection\n", "  - protection: {oc_instantaneous_a: 100}\n"))
    p.cycle()
    p.sim.current_a[0] = 150.0  # what node A reports next
    p.cycle()
    assert p.n["trip"][0] and p.n["battery_w"][0] == 0.0 and p.n["bus_w"][0] == 0.0
    assert p.img.agg["nodes_tripped"][0] == 1.0
    p.sim.current_a[0] = 0.0
    p.cycle(5)
    assert p.n["trip"][0]  # latched
    p.img.commands.push(0, Op.RESET_TRIP, node=0)
    p.cycle()
    assert p.n["trip"][0] == 0 and p.n["battery_w"].tolist() == [100.0, 150.0]


def test_conservation_over_a_simulated_run_of_the_default_fleet(plant):
    from vbatt.config.plant import default_config_path

    p = plant(default_config_path().read_text())
    p.cycle(300, physics=True)
    n = p.n
    assert np.all(np.isfinite(n["battery_w"])) and np.all(np.isfinite(n["forecast_w"]))
    assert np.allclose(n["served_w"], n["battery_w"] + n["bus_w"], atol=1e-9)
    assert n["bus_w"].sum() == pytest.approx(p.img.agg["main_w"][0], abs=1e-6)
    assert p.img.agg["main_w"][0] <= p.img.agg["main_limit_w"][0] + 1e-6
    assert np.all(n["battery_w"] <= n["hi_w"] + 1e-9) and np.all(n["battery_w"] >= n["lo_w"] - 1e-9)
    assert p.img.agg["forecast_w"][0] == pytest.approx(n["forecast_w"].sum())
    assert p.img.agg["deficit_w"][0] == pytest.approx(n["forecast_w"].sum() - p.img.agg["main_limit_w"][0])


def test_health_derate_moves_load_away_from_a_hot_node(plant):
    text = (TWO.replace("soc: 0.8, link_max_w: 1000}\n  - {id: B", "soc: 0.8, temperature_c: 50, link_max_w: 1000}\n  - {id: B")
            + "programs: [protection: {derate_start_c: 60, derate_zero_c: 70, trip_temperature_c: 80},"
              " {health: {temperature_high_c: 45, derate: {TEMPERATURE_HIGH: 0.2}}}, allocation]")
    p = plant(text)
    p.cycle()  # health runs before allocation: the derate narrows the limits in the same cycle
    assert p.n["alarm"][0] & Alarm.TEMPERATURE_HIGH
    assert p.n["derate"][0] == pytest.approx(0.2) and p.n["derate"][1] == 1.0
    assert p.n["hi_w"][0] == pytest.approx(0.2 * 300)
    assert p.n["battery_w"][0] == pytest.approx(0.2 * 300) and p.n["battery_w"].sum() == pytest.approx(300.0)


def test_a_program_that_narrows_the_limits_after_the_allocation_is_a_config_error():
    text = TWO + "programs:\n  - allocation\n  - health: {derate: {TEMPERATURE_HIGH: 0.2}}\n"
    with pytest.raises(ConfigError) as exc:
        load_config_text(text, "plant.yaml")
    assert "plant.yaml:8" in str(exc.value.problems) and "before 'allocation'" in str(exc.value.problems)
    load_config_text(TWO + "programs:\n  - allocation\n  - health\n", "plant.yaml")  # no derate: no narrowing


def test_alarm_acknowledge_and_clear(plant):
    p = plant(TWO + "programs: [allocation, {health: {soc_low: 0.9}}]")
    p.cycle()
    assert np.all(p.n["alarm"] & Alarm.SOC_LOW)
    acked = p.img.mem["health.acked"]
    p.img.commands.push(0, Op.ACK_ALARM, node=0, arg=int(Alarm.SOC_LOW))
    p.cycle()
    assert acked[0] & Alarm.SOC_LOW and not acked[1] & Alarm.SOC_LOW
    p.sim.soc[:] = 0.95  # condition clears (beyond the deadband): the acknowledgement goes with it
    p.cycle()
    assert not p.n["alarm"][0] & Alarm.SOC_LOW and acked[0] == 0


def test_bad_program_parameters_are_config_errors_with_a_line():
    with pytest.raises(ConfigError) as exc:
        load_config_text(TWO + "programs:\n  - allocation: {ramp_w_per_s: -5}\n", "plant.yaml")
    assert "plant.yaml:7" in str(exc.value.problems) and "ramp_w_per_s" in str(exc.value.problems)
    with pytest.raises(ConfigError) as exc:
        load_config_text(TWO + "programs:\n  - health: {derate: {TEMP_HI: 0.5}}\n", "plant.yaml")
    assert "TEMP_HI" in str(exc.value.problems) and "TEMPERATURE_HIGH" in str(exc.value.problems)


USER_FN = """
from numba import njit

@njit
def narrow(soc, {out}, cool_s, dt_s, soc_floor):
    for i in range(soc.shape[0]):
        cool_s[i] += dt_s[0]
        if soc[i] <= soc_floor:
            {out}[i] = 0.0
"""


def _user(tmp_path, out="hi_w", extra="", step_keys="params: {soc_floor: 0.3}\n          memory: {cool_s: f8}\n          writes: [hi_w]"):
    f = tmp_path / f"fn_{out}.py"
    f.write_text(USER_FN.format(out=out))
    return TWO + f"""programs:
  - user:
      steps:
        - function: {f}:narrow
          {step_keys}{extra}
  - allocation
"""


def test_user_program_binds_by_name_in_any_order(plant, tmp_path):
    """params by name (not YAML order); the narrowing counts because the limits are reset and narrowed."""
    p = plant(_user(tmp_path).replace("params: {soc_floor: 0.3}", "params: {soc_floor: 0.9}"))
    p.cycle()
    assert np.all(p.n["hi_w"] == 0.0) and np.all(p.n["battery_w"] <= 1e-9)  # soc 0.8 <= 0.9: no discharge
    assert p.img.mem["user.0.cool_s"][0] == pytest.approx(PERIOD_NS * 1e-9)


def test_user_program_errors_name_the_problem(tmp_path):
    def problems(text):
        with pytest.raises(ConfigError) as exc:
            load_config_text(text, "plant.yaml")
        return str(exc.value.problems)

    got = problems(_user(tmp_path, out="hi_watts", step_keys="params: {soc_floor: 0.3}\n          memory: {cool_s: f8}"))
    assert "plant.yaml:9" in got and "'hi_watts' names nothing" in got  # a misspelt field
    got = problems(_user(tmp_path).replace("soc_floor: 0.3", "soc_floor: 0.3, hot_c: 1"))
    assert "['hot_c'] are not parameters" in got
    got = problems(_user(tmp_path).replace("params: {soc_floor: 0.3}", "params: {}"))
    assert "'soc_floor' names nothing" in got  # a parameter nothing binds
    got = problems(_user(tmp_path).replace("writes: [hi_w]", "writes: [hi_w, cool_s]"))
    assert "writes 'cool_s', which is not a field" in got
    got = problems(_user(tmp_path).replace("memory: {cool_s: f8}", "memory: {cool_s: f8, soc: f8}"))
    assert "'soc' is ambiguous: it names a memory and a node field" in got
    got = problems(_user(tmp_path).replace("narrow", "nope", 1))
    assert "has no 'nope'" in got or "nope" in got
    got = problems(_user(tmp_path).replace("  - allocation\n", "").replace("programs:\n", "programs:\n  - allocation\n"))
    assert "before 'allocation'" in got  # it narrows hi_w after the allocation used it


def test_an_undeclared_write_does_not_compile(plant, tmp_path, caplog):
    """hi_w not in `writes`: the kernel receives it read-only, numba refuses the store, and the scan
    holds the safe allocation (a program fault) instead of running a program that writes what it
    did not declare."""
    from vbatt.kernel.image import Ctl

    p = plant(_user(tmp_path).replace("\n          writes: [hi_w]", ""))
    with caplog.at_level("ERROR"):
        p.cycle()
    assert p.img.ctl[Ctl.PROGRAM_FAULTS] == 1
    assert "readonly array" in caplog.text and "hi_w[i] = 0.0" in caplog.text
    assert np.all(p.n["bus_w"] == 0.0)  # the safe allocation: every node on its own battery
