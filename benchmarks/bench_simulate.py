"""`vbatt simulate` speed: simulated seconds per wall second with the full default pipeline.

N nodes in four priority classes (forecast, protection, allocation, health with the
parameters of runtime/default.yaml), the main supply lost at t = 0, 1 s steps, the
`vbatt` policy; `..._with_energy`: the same with the energy layer (`energy` before
`allocation`, ride-through targets {0: 4 h, 1: 30 min, 2: 10 min, 3: 0}). Each round simulates
VBATT_BENCH_SIM_S seconds (default 1,800; 600 at 10,000 nodes) after a warm-up run that compiles. Target: >= 1,000x real time at
1,000 nodes. `extra_info["speed_x"]` is simulated s / wall s of the step loop.

The memory benchmark runs 1 simulated hour, then 3 simulated days (1 s steps, 100
nodes) and records the RSS growth after each (flat: the series have a fixed number
of points).
"""

from __future__ import annotations

import os

import pytest

from vbatt.scenario import load_scenario_text, simulate

SIM_S = float(os.environ.get("VBATT_BENCH_SIM_S", "1800"))

PIPELINE = """
programs:
  - forecast: {horizon_s: 1.0, level_tau_s: 0.5, trend_tau_s: 20}
  - protection: {soc_min: 0.1, soc_max: 1.0, oc_pickup_a: 40, oc_curve: very_inverse, oc_tms: 0.1,
                 oc_instantaneous_a: 120, derate_start_c: 45, derate_zero_c: 55, trip_temperature_c: 60,
                 over_voltage_v: 58, under_voltage_v: 40, voltage_delay_s: 1.0}
  - allocation: {soc_min: 0.1, soc_max: 1.0, ramp_w_per_s: 2000, restore_hold_s: 10, restore_margin: 0.05}
  - health: {voltage_high_v: 56, voltage_low_v: 43, current_high_a: 35, temperature_high_c: 45}
"""


ENERGY = "  - energy\n"
TARGETS = ", ride_through_s: {0: 14400, 1: 1800, 2: 600, 3: 0}"


def fleet_scenario(n: int, duration_s: float, step_s: float = 1.0, energy: bool = False) -> str:
    pipeline = PIPELINE.replace("  - allocation:", ENERGY + "  - allocation:") if energy else PIPELINE
    return f"""
cycle: {{cycle_ms: 1000}}
plant: {{main_limit_w: {n * 400}{TARGETS if energy else ""}}}
nodes:
  - template:
      count: {n}
      id: "n{{i:05d}}"
      priority: [0, 3]
      demand_w: [150, 400]
      demand_profile: {{kind: sine, amplitude_w: 40, period_s: 900, noise_w: 5}}
      max_discharge_w: [400, 900]
      max_charge_w: [200, 400]
      capacity_wh: [300, 2000]
      soc: [0.5, 1.0]
      temperature_c: [24, 32]
      link_max_w: [500, 1000]
      physics: {{ocv_empty_v: 44, ocv_full_v: 54, resistance_ohm: 0.03, charge_efficiency: 0.95,
                discharge_efficiency: 0.95, thermal_resistance_k_per_w: 0.8}}
{pipeline}
scenario:
  duration_s: {duration_s}
  step_s: {step_s}
  seed: 1
  events: [{{at_s: 0, main_limit_w: 0}}]
"""


@pytest.mark.parametrize("n", [100, 1_000, 10_000])
def test_simulated_seconds_per_wall_second(benchmark, n):
    _speed(benchmark, n, energy=False)


@pytest.mark.parametrize("n", [100, 1_000, 10_000])
def test_simulated_seconds_per_wall_second_with_energy(benchmark, n):
    _speed(benchmark, n, energy=True)


def _speed(benchmark, n: int, energy: bool) -> None:
    sim_s = SIM_S if n < 10_000 else min(SIM_S, 600.0)
    loaded = load_scenario_text(fleet_scenario(n, sim_s, energy=energy), f"bench-{n}.yaml")
    simulate(load_scenario_text(fleet_scenario(n, 5, energy=energy), "warm.yaml"), "vbatt")  # compile
    results = []

    def run():
        results.append(simulate(loaded, "vbatt", points=500))

    benchmark.pedantic(run, rounds=2, iterations=1)
    best = min(r.wall_s for r in results)
    benchmark.group = "simulate: 1 s steps, default pipeline" + (" with energy" if energy else "")
    benchmark.extra_info["energy"] = energy
    benchmark.extra_info["n"] = n
    benchmark.extra_info["simulated_s"] = sim_s
    benchmark.extra_info["speed_x"] = round(sim_s / best, 1)
    benchmark.extra_info["step_us"] = round(best / loaded.steps * 1e6, 2)


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_memory_flat_over_three_days(benchmark):
    """RSS before and after 3 simulated days (259,200 steps); tests/test_simulate.py holds the
    tracemalloc peak independent of the duration."""
    loaded = load_scenario_text(fleet_scenario(100, 3 * 86400.0), "bench-3d.yaml")
    short = load_scenario_text(fleet_scenario(100, 3600.0), "bench-1h.yaml")
    simulate(short, "vbatt", points=2000)  # compile, and the first image of this size
    out = {}

    def run():
        rss0 = _rss_kib()
        simulate(short, "vbatt", points=2000)
        out["rss_1h_kib"] = _rss_kib() - rss0
        r = simulate(loaded, "vbatt", points=2000)
        out["rss_3d_kib"] = _rss_kib() - rss0
        out["speed_x"] = r.steps * r.step_s / r.wall_s

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.group = "simulate: 3 days, 100 nodes"
    benchmark.extra_info["rss_growth_after_1h_kib"] = out["rss_1h_kib"]
    benchmark.extra_info["rss_growth_after_3d_kib"] = out["rss_3d_kib"]
    benchmark.extra_info["speed_x"] = round(out["speed_x"], 1)
