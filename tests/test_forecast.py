"""Forecast: Holt smoothing per node, seasonal variant, and the error against persistence."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vbatt.programs.forecast import ForecastParams, forecast_mae, holt_step


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
        holt_step(t * dt, dt, on, demand[t], fc, level, trend, ready, season, t0, p.horizon_s, p.level_tau_s,
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
    from vbatt.drivers.sim_physics import demand_at

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
