"""The class demand forecast over a horizon (programs/energy/horizon.py) against persistence.

Replays class demand traces through the same functions the energy program runs, with its default
parameters, and prints the mean absolute error of the forecast mean demand over the next 5 min and
1 h, and of persistence (the demand now as that mean). Traces:

* every examples/scenarios/*.yaml: the per-class demand `vbatt simulate` records (policy vbatt,
  one point a minute), wall clock from the scenario's start_unix_s;
* the CSV trace examples/scenarios/office_trace.csv (one day, 5-minute samples, one column a
  class): cold (learnt online only), and seeded from a recorded history of the same day the day
  before (a real history file as the OPC UA server writes it, read by seed_from_history; the day
  repeats exactly, so what errs is the split of the recorded aggregate among the classes);
* a scenario of two days or more also judged after day 1 (the profile learnt online), and on its
  days after day 1 from a cold start, alone and seeded from day 1 recorded;
* with --seeded, one row per trace, each trace started cold three ways: learnt online only, seeded
  from the recorded aggregate (`demand_seed: always`, every class its share), and seeded from each
  class's own recorded demand (`class.<priority>.demand_w`, what `auto` now does): the record is the
  trace's first day (a shorter trace: all of it) written the day before by the OPC UA server's writer
  and read back by the program's readers (seed_from_history, seed.class_profiles); and, for
  robustness, a record that is not the day judged (an hour later or earlier, as a daylight-saving
  change moves a load that follows local time on the UTC bins, or 1.3 times the demand);
* the whole reserve R_K over peak.yaml's second day on the demand now, on the forecast and on the
  demand that came (targets of docs/energy.md's example).

Errors are judged from one hour into each trace (the warm-up; a quarter of a shorter one), per
class, then averaged over the classes with demand. A script, not a test: the figures go to docs/energy.md.
    .venv/bin/python benchmarks/forecast_horizon.py [--seeded] [scenario.yaml ...]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vbatt.programs.energy import EnergyParams
from vbatt.programs.energy.horizon import horizon_replay, window_means
from vbatt.scenario import load_scenario, simulate
from vbatt.scenario.record import CS

ROOT = Path(__file__).resolve().parents[1]
HORIZONS_S = (300.0, 3600.0)
WARMUP_S = 3600.0
DAY_S = 86400.0


def params(p: EnergyParams | None = None) -> dict:
    p = p or EnergyParams()
    return dict(level_tau_s=p.demand_level_tau_s, trend_tau_s=p.demand_trend_tau_s, damping_s=p.demand_damping_s,
                season_s=p.demand_season_s, bins=p.demand_season_bins, season_tau_s=p.demand_season_tau_s)


def mae(y: np.ndarray, dt_s: float, h_s: float, t0_s: float, start_s: float = WARMUP_S,
        **kw) -> tuple[float, float, int]:
    """(MAE forecast, MAE persistence, samples judged) of the mean over the next h_s, averaged over
    the classes with demand."""
    h = max(1, int(round(h_s / dt_s)))
    start = int(round(min(start_s, 0.25 * y.shape[0] * dt_s) / dt_s))
    if start >= y.shape[0] - h:
        return float("nan"), float("nan"), 0
    truth = window_means(y, h)
    pred = horizon_replay(y, dt_s, h_s, t0_s=t0_s, **params(), **kw)
    rows = slice(start, y.shape[0] - h)
    used = y[rows].mean(axis=0) > 0.0
    ef = np.nanmean(np.abs(pred[rows] - truth[rows])[:, used], axis=0)
    ep = np.nanmean(np.abs(y[rows] - truth[rows])[:, used], axis=0)
    return float(ef.mean()), float(ep.mean()), y.shape[0] - h - start


def scenario_trace(path: Path) -> tuple[np.ndarray, float, float]:
    """(class demand, points x classes; seconds a point; wall time of point 0) from a simulation."""
    loaded = load_scenario(path)
    steps = int(np.ceil(loaded.scenario.duration_s / loaded.step_s - 1e-9))
    points = max(1, int(steps * loaded.step_s / 60.0))
    res = simulate(loaded, "vbatt", points=points)
    rec = res.rec
    dt = rec.bucket * res.step_s
    y = rec.rec_c[:, CS.DEMAND_W, :][:, res.classes]
    return y, dt, loaded.scenario.start_unix_s + 0.5 * dt


def csv_trace() -> tuple[np.ndarray, float]:
    y = np.loadtxt(ROOT / "examples/scenarios/office_trace.csv", delimiter=",", skiprows=2)
    return y, 300.0


def seeded_prior(y: np.ndarray, dt_s: float, t0_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The prior the energy program takes at a cold start from the OPC UA server's history file, had
    it recorded this aggregate the day before (the real writer and the real reader)."""
    from vbatt.opcua_models.history import HISTORY_FILE, BatchHistory
    from vbatt.programs.forecast import ForecastParams, seed_from_history

    p = EnergyParams()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / HISTORY_FILE
        h = BatchHistory(path, {})
        h.open()
        agg = y.sum(axis=1)
        for i, v in enumerate(agg):
            h.append("demand_w", int((t0_s - DAY_S + i * dt_s) * 1e9), float(v))
        h.flush()
        h.close()
        prior, season = np.full(3, np.nan), np.zeros(p.demand_season_bins)
        line = seed_from_history(path, ForecastParams(season_s=p.demand_season_s, season_bins=p.demand_season_bins,
                                                      trend_tau_s=p.demand_trend_tau_s), t0_s, prior, season)
    print(f"    seed: {line}")
    return prior, season


def recorded_seeds(rec: np.ndarray, dt_s: float, t0_s: float,
                   rec_t0_s: float | None = None) -> tuple[np.ndarray, np.ndarray, list]:
    """(aggregate prior, its profile, each class's own profile) a cold start at t0_s reads from a history
    file in which the OPC UA server's writer recorded `rec` (time x classes) from rec_t0_s (default: the
    day before): the aggregate as `demand_w`, each class as `class.<k>.demand_w` (k: the column)."""
    from vbatt.opcua_models.history import HISTORY_FILE, BatchHistory
    from vbatt.programs.energy.seed import class_profiles
    from vbatt.programs.forecast import ForecastParams, seed_from_history
    from vbatt.programs.recorded import class_series

    p = EnergyParams()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / HISTORY_FILE
        h = BatchHistory(path, {})
        h.open()
        for i, row_w in enumerate(rec):
            t_ns = int(((t0_s - DAY_S if rec_t0_s is None else rec_t0_s) + i * dt_s) * 1e9)
            h.append("demand_w", t_ns, float(row_w.sum()))
            for k, v in enumerate(row_w):
                h.append(class_series(k, "demand_w"), t_ns, float(v))
        h.flush()
        h.close()
        prior, season = np.full(3, np.nan), np.zeros(p.demand_season_bins)
        line = seed_from_history(path, ForecastParams(season_s=p.demand_season_s, season_bins=p.demand_season_bins,
                                                      trend_tau_s=p.demand_trend_tau_s), t0_s, prior, season)
        own, lines = class_profiles(path, t0_s, p.demand_season_s, p.demand_season_bins, p.demand_season_tau_s)
    print(f"    seed: aggregate: {line}; " + "; ".join(lines), file=sys.stderr)
    return prior, season, [own.get(k) for k in range(rec.shape[1])]


def seeded_row(name: str, y: np.ndarray, dt: float, t0: float, rec: np.ndarray,
               rec_t0: float | None = None) -> None:
    """MAE of persistence, then of the forecast cold / aggregate-seeded / own-seeded, and the ratios."""
    prior, season, own = recorded_seeds(rec, dt, t0, rec_t0)
    cells = []
    for h in HORIZONS_S:
        runs = [mae(y, dt, h, t0), mae(y, dt, h, t0, prior=prior, prior_season=season),
                mae(y, dt, h, t0, own=own)]
        if runs[0][2] == 0:
            cells.append("too short | | | | ")
            continue
        pers = runs[0][1]
        fc = " / ".join(f"{r[0]:.1f}" for r in runs)
        ratio = " / ".join(f"{r[0] / pers:.2f}" if pers > 0 else "-" for r in runs)
        cells.append(f"{pers:.1f} | {fc} | {ratio}")
    print(f"| {name} | {y.shape[0]} x {dt:.0f} s | {y.shape[1]} | " + " | ".join(cells) + " |")


def seeded_table(files: list[Path]) -> None:
    print("MAE (W per class) of the mean class demand over the next H; forecast cold / aggregate-seeded "
          "(always) / own-seeded (per class), and its ratio to persistence")
    print("| trace | samples | classes | 5 min: persistence | forecast c / a / o | ratio c / a / o "
          "| 1 h: persistence | forecast c / a / o | ratio c / a / o |")
    print("|---|---|---|---|---|---|---|---|---|")
    today0 = np.floor(time.time() / DAY_S) * DAY_S
    for f in files:
        y, dt, t0 = scenario_trace(f)
        today = today0 + (t0 % DAY_S)  # the history file keeps 30 days: the wall clock moved to today
        d1 = min(y.shape[0], int(round(DAY_S / dt)))
        seeded_row(f.name + (", day 1 recorded" if d1 < y.shape[0] else ", all recorded"), y, dt, today, y[:d1])
        if y.shape[0] * dt >= 2 * DAY_S:
            seeded_row(f.name + ", days 2+, day 1 recorded", y[d1:], dt, today, y[:d1])
    y, dt = csv_trace()
    seeded_row("office_trace.csv, all recorded", y, dt, today0, y)
    # a record that is not the day judged: the same day an hour later, or at 1.3 times the demand
    seeded_row("office_trace.csv, recorded 1 h later", y, dt, today0, np.roll(y, int(3600 / dt), axis=0))
    seeded_row("office_trace.csv, recorded 1 h earlier", y, dt, today0, np.roll(y, -int(3600 / dt), axis=0))
    seeded_row("office_trace.csv, recorded at 1.3 x", y, dt, today0, 1.3 * y)
    if ROOT / "examples/scenarios/peak.yaml" in [f.resolve() for f in files]:
        y, dt, t0 = scenario_trace(ROOT / "examples/scenarios/peak.yaml")
        d1 = int(round(DAY_S / dt))
        today = today0 + (t0 % DAY_S)
        seeded_row("peak.yaml, days 2+, day 1 recorded 1 h later", y[d1:], dt, today,
                   np.roll(y[:d1], int(3600 / dt), axis=0))
        seeded_row("peak.yaml, days 2+, day 1 recorded 1 h earlier", y[d1:], dt, today,
                   np.roll(y[:d1], -int(3600 / dt), axis=0))
        seeded_row("peak.yaml, days 2+, day 1 recorded at 1.3 x", y[d1:], dt, today, 1.3 * y[:d1])
        # a restart 6 h into the first day: the record is those 6 h (a quarter of the bins)
        q = int(round(6 * 3600 / dt))
        seeded_row("peak.yaml, restarted at 06:00 of day 1, 00-06 h recorded", y[q:], dt, today + q * dt, y[:q],
                   today)


def row(name: str, y: np.ndarray, dt: float, t0: float, **kw) -> None:
    cells = []
    for h in HORIZONS_S:
        f, p, n = mae(y, dt, h, t0, **kw)
        ratio = f"{f / p:5.2f}" if p > 0 else "-"
        cells.append("n/a | n/a | (too short)" if n == 0 else f"{f:7.1f} | {p:7.1f} | {ratio}")
    mean = y.sum(axis=1).mean()
    print(f"| {name} | {y.shape[0]} x {dt:.0f} s | {y.shape[1]} | {mean:,.0f} | " + " | ".join(cells) + " |")


TARGETS_S = (14400.0, 1800.0, 600.0, 0.0)  # docs/energy.md's example, classes in priority order


def reserve_day(path: Path, day: int = 1) -> None:
    """The whole reserve R_K = sum_k D_k tau_k over a day of a scenario's class demand, with D_k the
    demand now (before), the energy program's D_k (the forecast mean over the target, never below
    the demand now as the class forecast's level smooths it), and the demand that came (the realised mean over each target): hourly, and the error."""
    y, dt, t0 = scenario_trace(path)
    k_n = min(y.shape[1], len(TARGETS_S))
    r_now = np.zeros(y.shape[0])
    r_fc = np.zeros(y.shape[0])
    r_true = np.zeros(y.shape[0])
    for k in range(k_n):
        tau = TARGETS_S[k]
        if tau <= 0.0:
            continue
        yk = y[:, k:k + 1]
        f = horizon_replay(yk, dt, tau, t0_s=t0, **params())[:, 0]
        # the program's floor while no battery clock runs: the class forecast's level (the demand now, smoothed)
        level = horizon_replay(yk, dt, 0.0, t0_s=t0, **params())[:, 0]
        r_now += yk[:, 0] * tau / 3600.0
        r_fc += np.maximum(f, np.where(np.isnan(level), yk[:, 0], level)) * tau / 3600.0
        r_true_k = window_means(yk, int(round(tau / dt)))[:, 0] * tau / 3600.0
        r_true += r_true_k  # NaN where a window runs past the trace
    lo, hi = int(day * DAY_S / dt), int((day + 1) * DAY_S / dt)
    ok = np.arange(y.shape[0])[lo:hi]
    ok = ok[np.isfinite(r_true[ok])]
    print(f"\n{path.name}, day {day + 1}: the whole reserve R_K (Wh), targets {TARGETS_S} s")
    print("| time | demand now | R_K on the demand now | R_K on the forecast | R_K on the demand that came |")
    print("|---|---|---|---|---|")
    for hh in range(0, 24, 2):
        i = int((day * DAY_S + hh * 3600.0) / dt)
        if i < y.shape[0]:
            print(f"| {hh:02d}:00 | {y[i].sum():,.0f} W | {r_now[i]:,.0f} | {r_fc[i]:,.0f} | {r_true[i]:,.0f} |")
    for name, r in (("demand now", r_now), ("forecast", r_fc)):
        err = r[ok] - r_true[ok]
        print(f"R_K on the {name}: MAE {np.abs(err).mean():,.1f} Wh, short of the demand that came by "
              f"{max(0.0, -err.min()):,.1f} Wh at most, {100.0 * np.mean(err < 0):.0f} % of the minutes short")


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):
        print(__doc__.rstrip().rsplit("\n", 1)[-1].strip())
        return 0
    unknown = [a for a in argv if a.startswith("-") and a != "--seeded"]
    if unknown:
        print(f"forecast_horizon.py: unknown option {unknown[0]} (expected --seeded and scenario files)",
              file=sys.stderr)
        return 2
    seeded = "--seeded" in argv
    argv = [a for a in argv if a != "--seeded"]
    files = [Path(a) for a in argv] or sorted((ROOT / "examples/scenarios").glob("*.yaml"))
    if seeded:
        seeded_table(files)
        return 0
    print("MAE (W per class) of the mean class demand over the next H: forecast | persistence | ratio")
    print("| trace | samples | classes | mean total W | 5 min: fc | pers | ratio | 1 h: fc | pers | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for f in files:
        t = time.perf_counter()
        y, dt, t0 = scenario_trace(f)
        row(f.name, y, dt, t0)
        if y.shape[0] * dt >= 2 * DAY_S:  # a day learnt online, judged on the days after
            row(f.name + ", after day 1", y, dt, t0, start_s=DAY_S)
            # the days after day 1 from a cold start: alone, and seeded from day 1 recorded (as the OPC UA
            # server would have; the wall clock moved to today: the file keeps 30 days)
            d1 = int(round(DAY_S / dt))
            today = np.floor(time.time() / DAY_S) * DAY_S + (t0 % DAY_S)
            row(f.name + ", days 2+, cold", y[d1:], dt, today)
            prior, season = seeded_prior(y[:d1], dt, today)
            row(f.name + ", days 2+, seeded from day 1 recorded (demand_seed: always)", y[d1:], dt, today, prior=prior,
                prior_season=season)
        print(f"    ({time.perf_counter() - t:.0f} s to simulate and replay)", file=sys.stderr)
    y, dt = csv_trace()
    # the trace's first sample is midnight; today's (the history file keeps only the last 30 days)
    t0 = np.floor(time.time() / DAY_S) * DAY_S
    row("office_trace.csv, cold", y, dt, t0)
    prior, season = seeded_prior(y, dt, t0)
    row("office_trace.csv, seeded (same day recorded; demand_seed: always)", y, dt, t0, prior=prior,
        prior_season=season)
    if not argv:
        reserve_day(ROOT / "examples/scenarios/peak.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
