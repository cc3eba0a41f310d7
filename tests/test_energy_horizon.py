"""The class demand over the horizon (programs/energy/horizon.py) and the energy program's use of it
for the reserve D_k tau_k (docs/energy.md "The demand over the target")."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from vbatt.programs.energy.horizon import horizon_mae, horizon_replay, window_means

DAY = 86400.0
PARAMS = dict(level_tau_s=300.0, trend_tau_s=7200.0, damping_s=3600.0, season_s=DAY, bins=96, season_tau_s=DAY)


def _diurnal(days=4, dt_s=60.0, seed=1):
    """Two classes, a daily sine each (different phases and sizes) plus noise: deterministic."""
    t = np.arange(0.0, days * DAY, dt_s)
    rng = np.random.default_rng(seed)
    a = 1000.0 + 400.0 * np.sin(2 * np.pi * t / DAY) + rng.normal(0.0, 20.0, t.size)
    b = 300.0 + 150.0 * np.sin(2 * np.pi * (t - 6 * 3600.0) / DAY) + rng.normal(0.0, 10.0, t.size)
    return np.stack([a, b], axis=1), dt_s


def test_beats_persistence_an_hour_ahead_on_a_diurnal_trace():
    y, dt = _diurnal()
    # judged on the last day: the profile was learnt online over the days before
    f, p = horizon_mae(y, dt, 3600.0, int(3 * DAY / dt), **PARAMS)
    assert f < 0.5 * p, (f, p)
    f5, p5 = horizon_mae(y, dt, 300.0, int(3 * DAY / dt), **PARAMS)
    assert f5 < p5, (f5, p5)


def test_without_a_profile_it_is_smoothed_persistence():
    """Before one whole season the profile is not used: a constant demand is forecast exactly, at any
    horizon, from the first sample."""
    y = np.full((500, 3), [100.0, 0.0, 2500.0])
    y[:10, 2] = 0.0  # its nodes not reporting yet: the forecast starts with the first demand
    for h in (0.0, 300.0, 3600.0, 4 * DAY):
        pred = horizon_replay(y, 60.0, h, **PARAMS)
        assert np.all(np.isnan(pred[:, 1])) and np.all(np.isnan(pred[:10, 2]))
        assert pred[:, 0] == pytest.approx(y[:, 0]) and pred[10:, 2] == pytest.approx(y[10:, 2])


def test_the_window_mean_of_a_learnt_profile():
    """A square day (400 W at night, 600 W from 06 to 18 h), learnt over two days without noise:
    the forecast of the mean over the next hour at 05:30 sees the morning step before it comes."""
    dt = 60.0
    t = np.arange(0.0, 3 * DAY, dt)
    y = (400.0 + 200.0 * (((t % DAY) >= 6 * 3600) & ((t % DAY) < 18 * 3600)))[:, None]
    pred = horizon_replay(y, dt, 3600.0, season_tau_s=3600.0,
                          **{k: v for k, v in PARAMS.items() if k != "season_tau_s"})
    k = int((2 * DAY + 5.5 * 3600) / dt)
    # the profile is linear between the centres of its 15-minute bins: 400 W to 05:52:30, 600 W from
    # 06:07:30, a ramp between: the mean over 05:30-06:30 is 500 W, the demand now 400 W
    assert y[k, 0] == 400.0
    assert pred[k, 0] == pytest.approx(500.0, abs=2.0)
    truth = window_means(y, 60)
    assert truth[k, 0] == pytest.approx(500.0, abs=4.0)
    # at noon, an hour ahead is still day: 600 W
    assert pred[int((2 * DAY + 12 * 3600) / dt), 0] == pytest.approx(600.0, abs=2.0)


# -- the energy program: the reserve over the target, seeded from the recorded history ------------------
FLEET = """
plant: {{main_limit_w: 1000, ride_through_s: {{0: 3600{more}}}}}
opcua: {{enabled: true, state_dir: "{state}"}}
nodes:
  - template: {{count: {count}, id: "n{{i}}", priority: 0, demand_w: 100, max_discharge_w: 500, max_charge_w: 300,
                capacity_wh: 1000, soc: 0.9, link_max_w: 500}}
{second}programs:
  - energy: {{sweep_s: 0{extra}}}
"""


def _record_days(path, now_s, days=2.0, step_s=60.0):
    """A real history file as the OPC UA server writes it: aggregate 400 W + 200 W by day (06-18 h)."""
    from vbatt.opcua_models.history import BatchHistory

    h = BatchHistory(path, {})
    h.open()
    for t in np.arange(now_s - days * DAY, now_s, step_s):
        h.append("demand_w", int(t * 1e9), 400.0 + (200.0 if 6 <= (t % DAY) / 3600 < 18 else 0.0))
    h.flush()
    h.close()


def _engine(tmp_path, extra="", two=False):
    from vbatt.config.plan import build_programs, image_spec
    from vbatt.config.plant import load_config_text
    from vbatt.kernel.clock import FakeClock
    from vbatt.kernel.image import Ctl, Mode, ProcessImage
    from vbatt.kernel.scan import ScanEngine

    second = ('  - template: {count: 2, id: "m{i}", priority: 1, demand_w: 100, max_discharge_w: 500, '
              'max_charge_w: 300, capacity_wh: 1000, soc: 0.9, link_max_w: 500}\n')
    text = FLEET.format(state=tmp_path, extra=extra, count=2 if two else 4, second=second if two else "",
                        more=", 1: 3600" if two else "")
    cfg, fleet = load_config_text(text)
    progs = build_programs(cfg, 4)
    img = ProcessImage.create(image_spec(cfg, fleet, progs, [(0, 4, "sim")]))
    for k, v in fleet.values.items():
        img.node[k][:] = v
    img.node["online"][:] = 1
    img.node["demand_w"][:] = [100.0, 50.0, 150.0, 100.0]  # 400 W at night
    img.node["hi_w"][:] = img.node["max_discharge_w"]  # the device limits, as the latch derives them
    img.node["lo_w"][:] = -img.node["max_charge_w"]
    img.agg["main_limit_w"][0] = 1000.0  # the main supply carries the demand: the clocks stand still
    img.ctl[Ctl.MODE] = Mode.RUN
    eng = ScanEngine(img, progs, cfg, FakeClock())
    return img, eng


def _step(eng, wall_s, dt_s=1.0):
    from vbatt.kernel.program import Ctx

    eng.ctx[Ctx.WALL_S], eng.ctx[Ctx.DT_S] = wall_s, dt_s
    dict(eng.steps)["energy"]()


@pytest.mark.parametrize("case", ["history", "no-history", "off"])
def test_the_reserve_rises_ahead_of_the_recorded_morning_peak(tmp_path, case):
    """At 05:30 with a 1 h target, the reserve of a cold start counts the recorded day's step at 06:00:
    500 W over the hour (the mean of the profile), not the 400 W of now. Without a history, or with
    the forecast off, it is the demand now."""
    from vbatt.opcua_models.history import HISTORY_FILE

    if case != "no-history":
        _record_days(tmp_path / HISTORY_FILE, time.time())
    wall = math.floor(time.time() / DAY) * DAY + 5.5 * 3600
    img, eng = _engine(tmp_path, ", demand_forecast: false" if case == "off" else "")
    try:
        _step(eng, wall)
        _step(eng, wall + 1.0)
        d = img.mem["energy.demand_horizon_w"][0]
        r = img.mem["energy.reserve_wh"][0]
        if case == "history":
            assert img.mem["energy.hz_prior"][2] == 1.0
            assert d == pytest.approx(500.0, abs=2.0)
            assert r == pytest.approx(500.0, abs=2.0)  # Wh: 500 W for the 1 h target
        else:
            assert d == pytest.approx(400.0) and r == pytest.approx(400.0)
        # the demand now is what it was: the forecast changes the reserve only
        assert img.mem["energy.demand_w"][0] == pytest.approx(400.0)
    finally:
        img.close()


@pytest.mark.parametrize("seed", ["auto", "always"])
def test_with_two_classes_the_aggregate_profile_seeds_only_when_asked(tmp_path, seed):
    """The record holds the aggregate only: split among classes of other shapes it misleads, so `auto`
    seeds one class only; `always` gives each class the profile scaled by its share (here both halves of
    the fleet follow the aggregate: 200 + 200 W now, 250 + 250 W over the hour)."""
    from vbatt.opcua_models.history import HISTORY_FILE

    _record_days(tmp_path / HISTORY_FILE, time.time())
    wall = math.floor(time.time() / DAY) * DAY + 5.5 * 3600
    img, eng = _engine(tmp_path, f", demand_seed: {seed}", two=True)
    try:
        img.node["demand_w"][:] = [100.0, 100.0, 100.0, 100.0]
        _step(eng, wall)
        _step(eng, wall + 1.0)
        d = img.mem["energy.demand_horizon_w"][:2]
        assert d == pytest.approx([250.0, 250.0] if seed == "always" else [200.0, 200.0], abs=2.0)
    finally:
        img.close()


def test_the_reserve_is_never_below_the_demand_now(tmp_path):
    """A forecast that expects less than now (the evening fall of the record) does not lower the
    reserve below the demand now (a forecast may be wrong; the reserve is what critical loads need)."""
    from vbatt.opcua_models.history import HISTORY_FILE

    _record_days(tmp_path / HISTORY_FILE, time.time())
    wall = math.floor(time.time() / DAY) * DAY + 17.5 * 3600
    img, eng = _engine(tmp_path)
    try:
        img.node["demand_w"][:] = [150.0, 75.0, 225.0, 150.0]  # 600 W by day
        _step(eng, wall)
        _step(eng, wall + 1.0)
        assert img.mem["energy.demand_horizon_w"][0] == pytest.approx(600.0)
    finally:
        img.close()


def test_a_priority_change_starts_the_class_forecasts_anew(tmp_path):
    from vbatt.kernel.image import Op

    img, eng = _engine(tmp_path)
    try:
        _step(eng, 1000.0)
        assert img.mem["energy.hz"][0, 2] == 1.0  # HZ_READY
        img.node["priority"][3] = 1
        prog = next(p for p in eng.programs if p.id == "energy")
        prog.on_command(img, Op.SET_PRIORITY, 3, 1.0, 0)
        assert np.all(img.mem["energy.hz"][:, 2] == 0.0)
        _step(eng, 1001.0)
        assert img.mem["energy.demand_horizon_w"][:2] == pytest.approx([300.0, 100.0])
    finally:
        img.close()
