"""Program benchmarks: pipeline compute per cycle, allocator vs HiGHS, warm-cache startup, forecast MAE.

    make bench ARGS="-k programs"      (or: .venv/bin/python -m pytest benchmarks/bench_programs.py --benchmark-enable)

Sizes N = 100, 1,000, 10,000, 100,000. The pipeline is forecast -> protection ->
allocation -> health -> aggregates, bound to a real process image, as the scan
calls it. The allocator-vs-HiGHS ratio compares, on the same instance in the same
run, our complete allocation against HiGHS solving only the first of its stages
(the LP that finds the most load the plant can serve).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vbatt.kernel.clock import FakeClock
from vbatt.config.plant import load_config_text
from vbatt.kernel.image import Ctl, Mode, ProcessImage
from vbatt.config.plan import build_programs, image_spec
from vbatt.kernel.aggregates import bind_aggregates
from vbatt.programs.allocation import solver
from vbatt.programs.forecast import ForecastParams, forecast_mae
from vbatt.kernel.scan import ScanEngine, device_limits

SIZES = [100, 1_000, 10_000, 100_000]
REPO = Path(__file__).resolve().parents[1]

FLEET = """
plant: {{main_limit_w: {main}}}
nodes:
  - template:
      count: {n}
      id: "n{{i}}"
      priority: [0, 3]
      demand_w: [200, 450]
      max_discharge_w: [400, 800]
      max_charge_w: [200, 400]
      capacity_wh: [300, 900]
      soc: [0.2, 1.0]
      temperature_c: [24, 50]
      link_max_w: [100, 1000]
"""
PIPELINE = (REPO / "runtime" / "default.yaml").read_text().split("\nprograms:", 1)[1]


ENERGY_PIPELINE = PIPELINE.replace("\n  - allocation:", "\n  - energy\n  - allocation:")
RIDE_THROUGH = "plant: {{main_limit_w: {main}, ride_through_s: {{0: 14400, 1: 1800, 2: 600, 3: 0}}}}"


def _image(n: int, energy: bool = False):
    fleet_text = FLEET.format(n=n, main=150.0 * n)
    if energy:
        fleet_text = fleet_text.replace("plant: {main_limit_w: %s}" % (150.0 * n), RIDE_THROUGH.format(main=150.0 * n))
    cfg, fleet = load_config_text(fleet_text + "programs:" + (ENERGY_PIPELINE if energy else PIPELINE))
    progs = build_programs(cfg, n)
    img = ProcessImage.create(image_spec(cfg, fleet, progs, [(0, n, "sim")]))
    nd = img.node
    for k, v in fleet.values.items():
        nd[k][:] = v
    rng = np.random.default_rng(n)
    nd["voltage_v"][:] = rng.uniform(46, 53, n)
    nd["current_a"][:] = rng.uniform(-10, 30, n)
    nd["online"][:] = 1
    img.agg["main_limit_w"][0] = cfg.plant.main_limit_w
    img.ctl[Ctl.MODE] = Mode.RUN
    eng = ScanEngine(img, progs, cfg, FakeClock())
    eng.ctx[1] = 0.01
    # as the scan's cycle: the limits start from the device limits (after the latch), then the programs
    lim = (nd["max_charge_w"], nd["max_discharge_w"], nd["lo_w"], nd["hi_w"])
    steps = [lambda: device_limits(*lim)] + [s for _, s in eng.steps] + [bind_aggregates(img)]
    img.program_steps = dict(eng.steps)  # by program id: the list above starts with the device limits
    return img, steps


@pytest.mark.parametrize("n", SIZES)
def test_pipeline_cycle(benchmark, n):
    img, steps = _image(n)
    try:
        rng = np.random.default_rng(0)
        demand = img.node["demand_w"]
        base = demand.copy()

        def cycle():
            demand[:] = base  # same work every round; noise below keeps the allocator honest
            for s in steps:
                s()

        demand[:] = base + rng.normal(0, 5, n).clip(-base, None)
        for _ in range(3):
            cycle()
        benchmark.extra_info["n"] = n
        benchmark(cycle)
        assert np.all(np.isfinite(img.node["battery_w"]))
    finally:
        img.close()


@pytest.mark.parametrize("n", [1_000, 10_000])
def test_energy_share_of_the_pipeline(benchmark, n):
    """The pipeline with the energy program (targets set, main supply short of demand: the caps are
    in use), and the energy step's own share, timed as the median of repeated cycles."""
    img, steps = _image(n, energy=True)
    try:
        assert "energy.state" in img.mem and img.mem["energy.target_s"][0] == 14400.0
        # By name: an index into `steps` once timed the health program (the list is not the program order).
        energy_step = img.program_steps["energy"]

        def cycle():
            for s in steps:
                s()

        for _ in range(5):
            cycle()
        times = []
        for _ in range(200):
            t0 = time.perf_counter_ns()
            energy_step()
            times.append(time.perf_counter_ns() - t0)
        benchmark.extra_info["n"] = n
        benchmark.extra_info["energy_step_us_median"] = float(np.median(times)) / 1e3
        benchmark(cycle)
        benchmark.extra_info["energy_share"] = (benchmark.extra_info["energy_step_us_median"]
                                                / (benchmark.stats.stats.median * 1e6))
        assert (img.node["shed_w"] > 0).any()  # the shortage is real: classes are capped
    finally:
        img.close()


def _instance(n: int):
    rng = np.random.default_rng(7)
    d = rng.uniform(200, 450, n)
    return dict(demand_w=d, max_discharge_w=rng.uniform(400, 800, n), max_charge_w=rng.uniform(200, 400, n),
                link_max_w=rng.uniform(100, 1000, n), soc=rng.uniform(0.2, 1.0, n),
                capacity_wh=rng.uniform(300, 900, n), priority=np.zeros(n, np.int64), main_limit_w=0.3 * d.sum())


def _highs_max_served(inst) -> tuple[float, str]:
    """HiGHS: the LP max sum r s.t. r = b + u, boxes, links, sum u <= main_limit (x = [r, b, u])."""
    import highspy
    import scipy.sparse as sp

    n = len(inst["demand_w"])
    eye = sp.identity(n, format="csr")
    a = sp.vstack([sp.hstack([eye, -eye, -eye]),
                   sp.hstack([sp.csr_matrix((1, 2 * n)), sp.csr_matrix(np.ones((1, n)))])]).tocsc()
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = 3 * n, n + 1
    lp.col_cost_ = np.concatenate([np.ones(n), np.zeros(2 * n)])
    lp.col_lower_ = np.concatenate([np.zeros(n), -inst["max_charge_w"], -inst["link_max_w"]])
    lp.col_upper_ = np.concatenate([inst["demand_w"], inst["max_discharge_w"], inst["link_max_w"]])
    lp.row_lower_ = np.concatenate([np.zeros(n), [0.0]])
    lp.row_upper_ = np.concatenate([np.zeros(n), [inst["main_limit_w"]]])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = a.indptr, a.indices, a.data
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = 3 * n, n + 1
    lp.sense_ = highspy.ObjSense.kMaximize
    h.passModel(lp)
    h.run()
    return float(h.getInfo().objective_function_value), h.modelStatusToString(h.getModelStatus())


HIGHS_MEMORY_BYTES = 8 << 30  # HiGHS at 100,000 nodes has exhausted 24 GiB: cap it in a child process
HIGHS_TIME_LIMIT_S = 120.0


def _highs_child(inst, conn) -> None:
    import resource

    import highspy

    resource.setrlimit(resource.RLIMIT_AS, (HIGHS_MEMORY_BYTES, HIGHS_MEMORY_BYTES))
    orig = highspy.Highs.run

    def run(self):
        self.setOptionValue("time_limit", HIGHS_TIME_LIMIT_S)
        return orig(self)

    highspy.Highs.run = run
    try:
        t = time.perf_counter()
        served, status = _highs_max_served(inst)
        conn.send((served, status, time.perf_counter() - t))
    except BaseException as exc:  # MemoryError, bad_alloc surfacing as RuntimeError, ...
        conn.send((float("nan"), f"failed: {type(exc).__name__}", time.perf_counter() - t))


def _highs_timed(inst) -> tuple[float, str, float]:
    """HiGHS on the instance in a capped child process: (objective, status, seconds)."""
    import multiprocessing as mp

    import highspy  # noqa: F401  imported here, so that the child times the solve only
    import scipy.sparse  # noqa: F401

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    t = time.perf_counter()
    p = ctx.Process(target=_highs_child, args=(inst, child))
    p.start()
    got = parent.recv() if parent.poll(HIGHS_TIME_LIMIT_S + 60) else None
    p.join(10)
    if p.is_alive():
        p.kill()
    if got is None:
        return float("nan"), f"no answer (exit {p.exitcode})", time.perf_counter() - t
    return got


RESULTS: dict[int, dict[str, float]] = {}


@pytest.mark.parametrize("n", SIZES)
def test_allocator_vs_highs(benchmark, n):
    inst = _instance(n)
    args = [inst[k] for k in ("demand_w", "max_discharge_w", "max_charge_w", "link_max_w", "soc", "capacity_wh",
                              "priority")]
    run = solver(*args, inst["main_limit_w"])  # arrays prepared once: the solve is timed, as HiGHS's is
    run()
    served, status, t_highs = _highs_timed(inst)  # not optimal: t_highs is a lower bound of its time
    out = benchmark(run)
    benchmark.extra_info["highs_status"] = status
    if status == "Optimal":
        assert out["served_w"].sum() == pytest.approx(served, rel=1e-9, abs=1e-6)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    ours = min(ts)
    RESULTS[n] = {"ours_s": ours, "highs_s": t_highs, "ratio": t_highs / ours}
    benchmark.extra_info.update(RESULTS[n])
    print(f"\nN={n}: allocator {ours * 1e3:.3f} ms, HiGHS LP {t_highs * 1e3:.1f} ms ({status}), "
          f"ratio {t_highs / ours:,.0f}x")


def test_warm_cache_startup(benchmark):
    """Import vbatt and compile-or-load every program kernel (warm numba cache), in a fresh process."""
    code = ("import time; t=time.perf_counter(); from vbatt.config.plant import load_config, default_config_path; "
            "from vbatt.supervise.processes import warm_up; cfg,_=load_config(default_config_path()); warm_up(cfg); "
            "print(time.perf_counter()-t)")
    run = lambda: float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                       check=True, cwd=REPO).stdout.strip().splitlines()[-1])
    run()  # fill the cache
    seconds = benchmark.pedantic(run, rounds=3, iterations=1)
    benchmark.extra_info["startup_s"] = seconds
    print(f"\nwarm-cache startup (import + load all kernels): {seconds:.3f} s")


def test_forecast_mae_vs_persistence(benchmark):
    """MAE at 1 s ahead on the default fleet's simulated profile (sine 60 W / 120 s + 15 W noise, 10 ms)."""
    from vbatt.drivers.sim.physics import demand_at

    np.random.seed(0)  # noqa: NPY002
    n, dt, steps = 100, 0.01, 24_000
    base = np.random.uniform(200, 450, n)
    kind = np.ones(n, np.int64)
    p1, p2, p3, p4 = np.full(n, 60.0), np.full(n, 120.0), np.full(n, 15.0), np.zeros(n)
    y = np.zeros((steps, n))
    for k in range(steps):
        demand_at(k * dt, kind, base, p1, p2, p3, p4, np.zeros(1), y[k])
    params = ForecastParams(horizon_s=1.0, level_tau_s=0.5, trend_tau_s=20.0)
    fc, pers = benchmark.pedantic(forecast_mae, args=(y, dt, params), rounds=1, iterations=1)
    agg_fc, agg_pers = forecast_mae(y.sum(axis=1, keepdims=True), dt, params)
    benchmark.extra_info.update(mae_forecast_w=fc, mae_persistence_w=pers, agg_mae_forecast_w=agg_fc,
                                agg_mae_persistence_w=agg_pers)
    print(f"\nforecast MAE per node {fc:.2f} W vs persistence {pers:.2f} W; "
          f"aggregate {agg_fc:.1f} W vs {agg_pers:.1f} W")
    assert fc < pers and math.isfinite(agg_fc)
