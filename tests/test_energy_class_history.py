"""The class demand history (issue #12, part 3): the OPC UA server records each class's demand beside the
aggregate, and a cold start seeds each class's daily profile from its own record (docs/energy.md "The
recorded history"). Real files, the server's writer, a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time

import numpy as np
import pytest

from vbatt.config.plant import load_config_text
from vbatt.opcua_models.history import HISTORY_FILE, BatchHistory
from vbatt.programs.energy.horizon import HZ_READY, HZ_SEEN
from vbatt.programs.recorded import class_series

DAY = 86400.0
NODE = "max_discharge_w: 500, max_charge_w: 300, capacity_wh: 1000, soc: 0.9, link_max_w: 500"


def _plant(state, prios, targets, energy=""):
    nodes = "".join(f"  - {{id: n{i}, priority: {p}, demand_w: 100, {NODE}}}\n" for i, p in enumerate(prios))
    return (f"cycle: {{cycle_ms: 10}}\n"
            f"plant: {{main_limit_w: 10000, ride_through_s: {{{targets}}}}}\n"
            f"opcua: {{enabled: true, state_dir: \"{state}\"}}\n"
            f"nodes:\n{nodes}"
            f"programs:\n  - energy: {{sweep_s: 0{energy}}}\n  - allocation\n")


def _engine(text, clock=None):
    """A cold start of the scan (energy + allocation) on a fresh image: the programs' init reads the
    history file then."""
    from vbatt.config.plan import build_programs, image_spec, partition
    from vbatt.kernel.clock import FakeClock
    from vbatt.kernel.image import Ctl, Mode, ProcessImage
    from vbatt.kernel.scan import ScanEngine

    cfg, fleet = load_config_text(text)
    progs = build_programs(cfg, len(fleet))
    img = ProcessImage.create(image_spec(cfg, fleet, progs, partition(cfg, fleet)))
    for k, v in fleet.values.items():
        img.node[k][:] = v
    img.node["online"][:] = 1
    img.node["hi_w"][:] = img.node["max_discharge_w"]
    img.node["lo_w"][:] = -img.node["max_charge_w"]
    img.agg["main_limit_w"][0] = 10000.0  # the main supply carries every class: the clocks stand still
    img.ctl[Ctl.MODE] = Mode.RUN
    clock = clock or FakeClock()
    return img, ScanEngine(img, progs, cfg, clock), clock, fleet


def _step(eng, wall_s, dt_s=1.0):
    from vbatt.kernel.program import Ctx

    eng.ctx[Ctx.WALL_S], eng.ctx[Ctx.DT_S] = wall_s, dt_s
    dict(eng.steps)["energy"]()


def _record(path, series: dict[str, callable], start_s, end_s, step_s=60.0):
    """A history file as the OPC UA server writes it (its writer): name -> value at wall time t."""
    h = BatchHistory(path, {})
    h.open()
    for t in np.arange(start_s, end_s, step_s):
        for name, f in series.items():
            h.append(name, int(t * 1e9), float(f(t)))
    h.flush()
    h.close()


# -- recorded by a real server, read back by a cold start ----------------------------------------------------------
SEASON_S, BINS = 8.0, 4  # a "day" of 8 s: a real server records whole seasons within seconds
PER_NODE = {0: (50.0, 100.0, 150.0, 100.0), 1: (150.0, 100.0, 50.0, 100.0)}  # W per node by bin: opposite days


def test_the_server_records_each_class_demand_and_a_cold_start_seeds_each_class_from_its_own(tmp_path, caplog):
    """Two classes of opposite daily shapes (their sum is flat: the aggregate's profile says nothing
    about either). The server records each class's demand_w (HistoryRead answers it); a cold start
    of the energy program on the same state dir starts each class from its own recorded profile,
    with `auto`, where before only a fleet of one class was seeded: at the start of the day with a
    target of a whole day, class 0 (rising) holds the day's mean, 200 W, not its 100 W of now."""
    from datetime import datetime, timezone

    from test_opcua_support import VIEWER, connected, make_state, nid, start_server

    from vbatt.kernel.clock import FakeClock

    pki = make_state(tmp_path)
    energy = f", demand_season_s: {SEASON_S}, demand_season_bins: {BINS}, demand_season_tau_s: {SEASON_S}"
    text = _plant(pki.state, [0, 0, 1, 1], f"0: {SEASON_S}, 1: {SEASON_S}", energy)
    clock = FakeClock(time.monotonic_ns())
    img, eng, _, fleet = _engine(text, clock)
    width = SEASON_S / BINS

    async def cycle() -> int:
        """One scan cycle at the real time, with the demand of its bin (far from a bin's edge: the
        server stamps the sample with the cycle's time, which must fall in the bin whose demand it has)."""
        while True:
            mono, wall = time.monotonic_ns(), time.time()
            phase = (wall % SEASON_S) / width
            if 0.1 < phase % 1.0 < 0.9:
                break
            await asyncio.sleep(0.02)
        j = int(phase)
        img.node["demand_w"][:] = [PER_NODE[p][j] for p in (0, 0, 1, 1)]
        clock.t = mono
        img.node["updated_ns"][:] = mono
        eng.cycle(mono)
        return j

    async def record():
        await cycle()  # the server's first update records the published cycle
        srv = await start_server(pki, img, fleet.ids, cycle_ms=10.0)
        try:
            seen: dict[int, int] = {}
            t_end = time.monotonic() + 60.0
            # every bin recorded at least 5 times over more than one season (by the wall clock)
            while len(seen) < BINS or min(seen.values()) < 5 or sum(seen.values()) < 2 * BINS * 5:
                assert time.monotonic() < t_end, seen
                j = await cycle()
                srv._next_sample = 0
                await srv.update()
                seen[j] = seen.get(j, 0) + 1
                await asyncio.sleep(0.05)
            srv.history.flush()
            async with connected(srv.endpoint, pki, VIEWER) as c:
                hist = await c.get_node(nid(c, "VirtualBattery.Classes.Class_0.demand_w")).read_raw_history(
                    datetime(2000, 1, 1, tzinfo=timezone.utc), datetime.now(timezone.utc))
            vals = {round(d.Value.Value) for d in hist}
            assert vals == {100, 200, 300}, vals  # the class's sum: 2 nodes x 50, 100, 150 W
        finally:
            await srv.stop()

    try:
        asyncio.run(asyncio.wait_for(record(), 90))
    finally:
        img.close()
    path = pki.state / HISTORY_FILE
    assert {class_series(p, "demand_w") for p in (0, 1)} <= {
        n for (n,) in sqlite3.connect(path).execute("SELECT DISTINCT name FROM samples")}

    with caplog.at_level(logging.INFO, logger="vbatt.energy"):
        img, eng, _, _ = _engine(text)  # a cold start on the same state dir
    try:
        assert "class 0: its own profile, whole" in caplog.text and "class 1: its own profile, whole" in caplog.text
        assert list(img.mem["energy.hz_class_prior"][:2]) == [0, 1]
        for r, p in enumerate((0, 1)):
            assert img.mem["energy.hz_class_prior_w"][r] == pytest.approx(2 * np.array(PER_NODE[p]), rel=0.1)
        wall = math.floor(time.time() / SEASON_S) * SEASON_S + 0.5 * width  # the middle of bin 0
        img.node["demand_w"][:] = [PER_NODE[p][0] for p in (0, 0, 1, 1)]
        _step(eng, wall)
        _step(eng, wall + 0.01)
        assert list(img.mem["energy.hz"][:2, HZ_SEEN]) == [BINS, BINS]
        # the reserve's demand over a whole day's target: the day's mean 200 W for the rising class (100 W
        # now); the falling one keeps its 300 W of now (never below now)
        assert img.mem["energy.demand_horizon_w"][:2] == pytest.approx([200.0, 300.0], rel=0.1)
    finally:
        img.close()


# -- classes that come and go, a record shorter than a day -----------------------------------------------------------
def _square(lo, hi):
    """lo W at night, hi W from 06 to 18 h."""
    return lambda t: lo + (hi - lo) * (6 <= (t % DAY) / 3600 < 18)


@pytest.mark.parametrize("seed", ["auto", "never"])
def test_each_class_from_its_own_record_partial_and_absent_ones_and_new_classes(tmp_path, seed, caplog):
    """Recorded: class 0 a whole day, class 1 only 00-06 h (a record shorter than a day), class 5 a whole
    day but no node has it now. The fleet: classes 0, 1, 2. At 05:30 class 0 starts from its record
    (its reserve over a 1 h target counts the step at 06:00), class 1 holds the bins it has (the rest
    are learnt online; until then the demand now), class 2 has no record (a cold start). Moved to
    priority 5, class 2's nodes start from class 5's record, scaled to their demand now. `never`: nothing
    is seeded."""
    from vbatt.kernel.image import Op

    now = time.time()
    day0 = math.floor(now / DAY) * DAY
    _record(tmp_path / HISTORY_FILE, {class_series(0, "demand_w"): _square(200.0, 300.0),
                                      class_series(5, "demand_w"): _square(100.0, 400.0)}, now - DAY, now)
    _record(tmp_path / HISTORY_FILE, {class_series(1, "demand_w"): lambda t: 150.0}, day0 - DAY, day0 - DAY + 6 * 3600)
    text = _plant(tmp_path, [0, 0, 1, 2], "0: 3600, 1: 3600, 2: 3600", f", demand_seed: {seed}, demand_horizon_s: 3600")
    with caplog.at_level(logging.INFO, logger="vbatt.energy"):
        img, eng, _, _ = _engine(text)
    try:
        wall = day0 + 5.5 * 3600
        img.node["demand_w"][:] = [100.0, 100.0, 150.0, 80.0]
        _step(eng, wall)
        _step(eng, wall + 1.0)
        hz = img.mem["energy.hz"]
        d = img.mem["energy.demand_horizon_w"][:3]
        if seed == "never":
            assert "recorded demand" not in caplog.text
            assert list(hz[:3, HZ_SEEN]) == [1, 1, 1] and d == pytest.approx([200.0, 150.0, 80.0])
            return
        assert "class 1: its own profile, 24/96 bins (the rest learnt online)" in caplog.text
        assert list(img.mem["energy.hz_class_prior"][:3]) == [0, 1, 5]  # the classes present first
        assert list(hz[:3, HZ_SEEN]) == [96, 24, 1]
        # class 0: 200 W until 06:00, 300 W after: the mean over 05:30-06:30 (linear between the bins'
        # centres) is 250 W; class 1 (partial profile) and class 2 (none): the demand now
        assert d == pytest.approx([250.0, 150.0, 80.0], abs=2.0)
        img.node["priority"][3] = 5
        prog = next(p for p in eng.programs if p.id == "energy")
        prog.on_command(img, Op.SET_PRIORITY, 3, 5.0, 0)
        assert list(img.mem["energy.priority"][:4]) == [0, 1, 5, -1]
        assert list(hz[:3, HZ_READY]) == [0, 0, 0]  # other classes: every class's forecast starts anew
        _step(eng, wall + 2.0)
        _step(eng, wall + 3.0)
        assert list(hz[:3, HZ_SEEN]) == [96, 24, 96]
        # class 5's record: 100 W at night, 400 W by day; it draws 80 W now: the record scaled to that
        # (80 W, 320 W), over 05:30-06:30 a mean of 0.8 x 250 W
        assert img.mem["energy.demand_horizon_w"][2] == pytest.approx(200.0, abs=2.0)
        assert img.mem["energy.hz_season_w"][2, [0, 50]] == pytest.approx([80.0, 320.0])
    finally:
        img.close()


def test_a_one_class_fleet_prefers_a_whole_aggregate_to_a_partial_own_record(tmp_path):
    """Just after an upgrade the class record is short while the aggregate's covers days: a fleet of one
    class then starts from the aggregate (its own partial record would leave it without a profile)."""
    now = time.time()
    _record(tmp_path / HISTORY_FILE, {"demand_w": _square(400.0, 600.0)}, now - 2 * DAY, now)
    _record(tmp_path / HISTORY_FILE, {class_series(0, "demand_w"): lambda t: 400.0}, now - 3600.0, now)
    img, eng, _, _ = _engine(_plant(tmp_path, [0, 0, 0, 0], "0: 3600"))
    try:
        wall = math.floor(now / DAY) * DAY + 5.5 * 3600
        _step(eng, wall)
        _step(eng, wall + 1.0)
        assert img.mem["energy.hz"][0, HZ_SEEN] == 96
        assert img.mem["energy.demand_horizon_w"][0] == pytest.approx(500.0, abs=2.0)
    finally:
        img.close()


# -- damaged files ---------------------------------------------------------------------------------------------------
def _damage(path, kind):
    if kind == "not a database":
        path.write_bytes(b"this is not SQLite " * 500)
    elif kind == "no samples table":
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE other (x)")
        con.commit()
        con.close()
    else:  # a real record, then garbage over its pages after the first (the header stays valid)
        now = time.time()
        _record(path, {class_series(0, "demand_w"): lambda t: 100.0}, now - DAY, now, step_s=10.0)
        data = bytearray(path.read_bytes())
        assert len(data) > 16 * 4096
        data[4096:] = bytes((i * 37) % 251 for i in range(len(data) - 4096))
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["not a database", "no samples table", "malformed pages"])
def test_a_damaged_history_file_is_a_log_line_and_a_cold_start(tmp_path, kind, caplog):
    _damage(tmp_path / HISTORY_FILE, kind)
    with caplog.at_level(logging.INFO, logger="vbatt.energy"):
        img, eng, _, _ = _engine(_plant(tmp_path, [0, 0, 1, 1], "0: 3600, 1: 600"))
    try:
        assert f"recorded class demand in {tmp_path / HISTORY_FILE} unusable (" in caplog.text, caplog.text
        assert "recorded history unusable (" in caplog.text or "no recorded demand" in caplog.text
        assert list(img.mem["energy.hz_class_prior"][:2]) == [-1, -1]
        _step(eng, 1000.0)
        _step(eng, 1001.0)
        assert img.mem["energy.demand_horizon_w"][:2] == pytest.approx([200.0, 200.0])  # learnt online
    finally:
        img.close()


def test_the_server_moves_a_damaged_history_file_aside_and_records_anew(tmp_path, caplog):
    from test_opcua_support import make_state, start_server

    pki = make_state(tmp_path)
    path = pki.state / HISTORY_FILE
    _damage(path, "not a database")
    img, eng, clock, fleet = _engine(_plant(pki.state, [0, 1], "0: 600"))

    async def body():
        img.node["demand_w"][:] = [120.0, 80.0]
        clock.advance(10_000_000)
        img.node["updated_ns"][:] = clock.now_ns()
        eng.cycle(clock.now_ns())
        with caplog.at_level(logging.ERROR, logger="vbatt.opcua.history"):
            srv = await start_server(pki, img, fleet.ids, cycle_ms=10.0)
        try:
            srv._next_sample = 0
            await srv.update()
            srv.history.flush()
        finally:
            await srv.stop()

    try:
        asyncio.run(asyncio.wait_for(body(), 60))
    finally:
        img.close()
    aside = list(pki.state.glob(HISTORY_FILE + ".corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not SQLite")
    assert f"history file {path} is damaged" in caplog.text and str(aside[0]) in caplog.text
    from vbatt.programs.recorded import load_series

    assert set(load_series(path, class_series(0, "demand_w"))[1]) == {120.0}
    assert set(load_series(path, class_series(1, "demand_w"))[1]) == {80.0}
