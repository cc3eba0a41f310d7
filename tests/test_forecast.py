"""Forecast: Holt smoothing per node, seasonal variant, and the error against persistence."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from vbatt.programs.forecast import PRIOR_N, ForecastParams, forecast_mae, holt_step


def run(demand, dt=0.1, online=None, **kw):
    p = ForecastParams(**kw)
    steps, n = demand.shape
    bins = p.season_bins if p.season_s else 0
    level, trend, ready = np.zeros(n), np.zeros(n), np.zeros(n, np.uint8)
    season = np.zeros((n, max(bins, 1)))[:, :bins]
    t0, fc = np.full(1, np.nan), np.zeros(n)
    out = np.zeros((steps, n))
    for t in range(steps):
        on = np.ones(n, np.uint8) if online is None else online[t]
        holt_step(t * dt, dt, on, demand[t], fc, level, trend, ready, season, t0, np.zeros(1), np.full(PRIOR_N, np.nan),
                  p.horizon_s, p.level_tau_s,
                  p.trend_tau_s, p.season_s or 1.0, p.season_tau_s)
        out[t] = fc
    return out


def test_constant_demand_is_forecast_exactly_from_the_first_cycle():
    out = run(np.full((50, 3), [100.0, 0.0, 2500.0]))
    assert np.all(out == [100.0, 0.0, 2500.0])


def test_a_ramp_is_tracked_with_its_slope():
    t = np.arange(3000) * 0.1
    y = (100 + 5 * t)[:, None]  # 5 W/s
    out = run(y, horizon_s=2.0, trend_tau_s=5.0)
    assert out[-1, 0] == pytest.approx(y[-1, 0] + 5 * 2.0, abs=0.5)


def test_offline_or_nan_keeps_the_last_forecast():
    y = np.full((20, 1), 300.0)
    y[10:, 0] = np.nan
    out = run(y)
    assert np.all(out[10:] == 300.0)
    online = np.ones((20, 1), np.uint8)
    online[5:] = 0
    y2 = np.full((20, 1), 300.0)
    y2[5:] = 900.0
    assert np.all(run(y2, online=online)[5:] == 300.0)


def test_seasonal_variant_beats_plain_holt_on_a_daily_shape():
    dt, season = 1.0, 240.0
    t = np.arange(int(6 * season / dt)) * dt
    rng = np.random.default_rng(3)
    y = (500 + 200 * (np.sin(2 * math.pi * t / season) > 0) + rng.normal(0, 5, t.size))[:, None]
    plain = forecast_mae(y, dt, ForecastParams(horizon_s=20.0, level_tau_s=5.0))
    # with a season the profile carries the shape: a slow level and (almost) no trend
    seasonal = forecast_mae(y, dt, ForecastParams(horizon_s=20.0, level_tau_s=120.0, trend_tau_s=1e6,
                                                  season_s=season, season_bins=48, season_tau_s=200.0))
    assert seasonal[0] < 0.3 * plain[0] and seasonal[0] < 0.3 * seasonal[1]  # [1]: persistence


def test_beats_persistence_on_the_simulated_noisy_profile():
    from vbatt.drivers.sim.physics import demand_at

    np.random.seed(0)  # noqa: NPY002 (numba's generator)
    n, dt, steps = 50, 0.01, 6000
    base = np.linspace(200, 450, n)
    kind = np.ones(n, np.int64)
    p1, p2, p3, p4 = np.full(n, 60.0), np.full(n, 120.0), np.full(n, 15.0), np.zeros(n)
    y = np.zeros((steps, n))
    for k in range(steps):
        demand_at(k * dt, kind, base, p1, p2, p3, p4, np.zeros(1), y[k])
    fc, pers = forecast_mae(y, dt, ForecastParams(horizon_s=1.0, level_tau_s=0.5, trend_tau_s=20.0))
    assert fc < pers


# -- starting from the OPC UA server's recorded history after a cold start ---------------------------
HIST_FLEET = """
plant: {{main_limit_w: 1000}}
opcua: {{enabled: true, state_dir: "{state}"}}
nodes:
  - template: {{count: 4, id: "n{{i}}", demand_w: 100, max_discharge_w: 500, max_charge_w: 300,
                capacity_wh: 1000, link_max_w: 500}}
programs:
  - forecast: {{horizon_s: 600, level_tau_s: 1800, trend_tau_s: 1.0e6, season_s: 86400, season_bins: 24}}
"""
DAY = 86400.0


def _record_day(path, now_s, days=2.0, step_s=60.0):
    """A real history file as the server writes it: aggregate demand 400 W + 200 W by day (06-18 h)."""
    from vbatt.opcua_models.history import BatchHistory

    h = BatchHistory(path, {})
    h.open()
    for t in np.arange(now_s - days * DAY, now_s, step_s):
        h.append("demand_w", int(t * 1e9), 400.0 + (200.0 if 6 <= (t % DAY) / 3600 < 18 else 0.0))
    h.flush()
    h.close()


def step(eng, wall_s, dt_s=0.01):
    """The forecast program as the scan runs it, at a chosen wall-clock time."""
    from vbatt.kernel.program import Ctx

    eng.ctx[Ctx.WALL_S], eng.ctx[Ctx.DT_S] = wall_s, dt_s
    dict(eng.steps)["forecast"]()


def _engine(tmp_path):
    from vbatt.kernel.clock import FakeClock
    from vbatt.config.plant import load_config_text
    from vbatt.kernel.image import Ctl, Mode, ProcessImage
    from vbatt.config.plan import build_programs, image_spec
    from vbatt.kernel.scan import ScanEngine

    cfg, fleet = load_config_text(HIST_FLEET.format(state=tmp_path))
    progs = build_programs(cfg, 4)
    img = ProcessImage.create(image_spec(cfg, fleet, progs, [(0, 4, "sim")]))
    for k, v in fleet.values.items():
        img.node[k][:] = v
    img.node["online"][:] = 1
    img.node["demand_w"][:] = [100.0, 50.0, 150.0, 100.0]  # 400 W at night
    img.ctl[Ctl.MODE] = Mode.RUN
    eng = ScanEngine(img, progs, cfg, FakeClock())
    return img, eng, progs[0]


@pytest.mark.parametrize("recorded", [True, False], ids=["history", "no-history"])
def test_a_cold_start_takes_the_season_from_the_recorded_history(tmp_path, recorded):
    from vbatt.opcua_models.history import HISTORY_FILE

    if recorded:  # the two days up to now (init() reads the record behind the real wall clock)
        _record_day(tmp_path / HISTORY_FILE, time.time())
    # the cycles run at 05:30 today: 10 minutes ahead is still night; at 05:55 it is day
    wall = math.floor(time.time() / DAY) * DAY + 5.5 * 3600
    img, eng, fc = _engine(tmp_path)
    try:
        assert fc.history_path == tmp_path / HISTORY_FILE
        step(eng, wall)
        f = img.node["forecast_w"].copy()
        assert np.all(np.isfinite(f))
        step(eng, wall + 25 * 60)  # 05:55: 10 minutes ahead is 06:05, in the day bin
        ahead = img.node["forecast_w"]
        if recorded:
            # the profile (bin - mean of 500 W) goes to each node by its share of the recorded 400 W at
            # night; 10 minutes ahead of 05:55 the day's +200 W is expected before it is seen
            y = np.array([100.0, 50.0, 150.0, 100.0])
            prof = img.mem["forecast.prior_season_w"]
            assert prof[5] == pytest.approx(-100.0, abs=1.0) and prof[6] == pytest.approx(100.0, abs=1.0)
            assert f == pytest.approx(y, abs=1.0)
            assert ahead == pytest.approx(y + 200.0 * y / 400.0, abs=1.0)
        else:
            assert np.all(np.isnan(img.mem["forecast.prior"]))
            assert f == pytest.approx([100.0, 50.0, 150.0, 100.0])
            assert ahead == pytest.approx([100.0, 50.0, 150.0, 100.0])  # nothing learnt yet: persistence
    finally:
        img.close()


def test_a_short_or_damaged_history_starts_from_nothing(tmp_path):
    from vbatt.opcua_models.history import HISTORY_FILE

    now = time.time()
    _record_day(tmp_path / HISTORY_FILE, now, days=0.25)  # 6 h of a 24 h season: not a profile
    img, eng, _ = _engine(tmp_path)
    try:
        assert img.mem["forecast.prior"][2] != 1.0
    finally:
        img.close()
    (tmp_path / HISTORY_FILE).write_bytes(b"this is not sqlite" * 100)
    img, eng, _ = _engine(tmp_path)
    try:
        assert np.all(np.isnan(img.mem["forecast.prior"]))
        step(eng, now)
        assert img.node["forecast_w"] == pytest.approx([100.0, 50.0, 150.0, 100.0])
    finally:
        img.close()


@pytest.mark.parametrize("span_s,seeded", [(120.0, True), (10.0, False)])
def test_a_cold_start_takes_the_trend_of_a_recent_record(tmp_path, span_s, seeded):
    """Without a season: the aggregate's recent slope, split by share; a record shorter than two
    trend time constants (e.g. the start-up of the last run) is not used."""
    from vbatt.opcua_models.history import BatchHistory, HISTORY_FILE
    from vbatt.programs.forecast import PRIOR_LEVEL, PRIOR_TREND, ForecastParams, seed_from_history

    now = time.time()
    h = BatchHistory(tmp_path / HISTORY_FILE, {})
    h.open()
    for t in np.arange(now - span_s, now, 1.0):
        h.append("demand_w", int(t * 1e9), 400.0 + 2.0 * (t - now))  # +2 W/s, 400 W now
    h.flush()
    h.close()
    prior, season = np.full(3, np.nan), np.zeros(0)
    line = seed_from_history(tmp_path / HISTORY_FILE, ForecastParams(trend_tau_s=20.0), now, prior, season)
    if seeded:
        assert prior[PRIOR_TREND] == pytest.approx(2.0, rel=1e-6)
        assert prior[PRIOR_LEVEL] == pytest.approx(400.0 - 2.0, abs=1e-6)  # the last sample, 1 s ago
        assert "trend +2.0 W/s" in line
    else:
        assert np.all(np.isnan(prior)) and "less than 40 s" in line
