"""Class objects that follow the classes while serving (issue #12, OPC UA): a `vbatt reload` that gives a
node a priority no node had adds that class's object (with its units, a GeneralModelChangeEvent, its
history record), the class left without nodes keeps its object with its last values as
UncertainLastUsableValue, and a later cold start on the same state dir seeds the new class from its
own record. A real `vbatt run`, a real reload, a real client on 127.0.0.1 (docs/opcua.md "Classes")."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import time
from datetime import datetime, timezone

import numpy as np
import pytest

from conftest import REPO, VBATT, run_vbatt
from test_energy_class_history import _engine, _step
from test_opcua_support import VIEWER, Events, connected, free_port, make_state, nid, wait_for
from vbatt.opcua_models.history import HISTORY_FILE
from vbatt.programs.energy.horizon import HZ_SEEN
from vbatt.programs.recorded import class_series, load_bins

SEASON_S, BINS = 8.0, 4  # a "day" of 8 s: a real run records a whole season of the new class in seconds
NODE = "demand_w: {d}, max_discharge_w: 500, max_charge_w: 300, capacity_wh: 1000, soc: 0.9, link_max_w: 500"


def _plant(state, port, prios, targets):
    nodes = "".join(f"  - {{id: n{i}, priority: {p}, {NODE.format(d=100 * (i + 1))}}}\n" for i, p in enumerate(prios))
    return (f"cycle: {{cycle_ms: 20, realtime: false}}\n"
            f"plant: {{main_limit_w: 10000, ride_through_s: {{{targets}}}}}\n"
            f"opcua: {{enabled: true, port: {port}, state_dir: \"{state}\", "
            f"history: {{sample_ms: 100, flush_s: 0.2}}}}\n"
            f"nodes:\n{nodes}"
            f"programs:\n  - energy: {{sweep_s: 0, demand_season_s: {SEASON_S}, demand_season_bins: {BINS}, "
            f"demand_season_tau_s: {SEASON_S}}}\n  - allocation\n")


def _children(folder):
    async def names():
        return sorted([(await ch.read_browse_name()).Name for ch in await folder.get_children()])
    return names()


def test_a_reload_that_makes_a_class_adds_its_object_records_it_and_a_cold_start_seeds_it(tmp_path, caplog):
    from asyncua import ua
    from asyncua.common.events import get_filter_from_event_type

    pki = make_state(tmp_path)
    port = free_port()
    cfg, moved = tmp_path / "plant.yaml", tmp_path / "moved.yaml"
    # n0: 100 W in class 0, n1: 200 W in 1, n2: 300 W in 3, whose target of 10^6 s is out of reach (an alarm)
    cfg.write_text(_plant(pki.state, port, [0, 1, 3], "0: 8, 3: 1000000"))
    moved.write_text(_plant(pki.state, port, [0, 1, 2], "0: 8"))  # n2 to class 2: class 2 appears, 3 is gone
    err = tmp_path / "err.txt"
    run = subprocess.Popen([*VBATT, "run", str(cfg), "-q", "--duration", "600"], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=open(err, "w"), start_new_session=True)
    history = pki.state / HISTORY_FILE

    async def body():
        deadline = time.monotonic() + 180  # a loaded machine: numba's cache load and the first cycles take long
        while True:  # the server listens once the scan runs
            assert run.poll() is None and time.monotonic() < deadline, err.read_text()
            try:
                async with connected(f"opc.tcp://127.0.0.1:{port}/", pki, VIEWER):
                    break
            except (OSError, asyncio.TimeoutError, ua.UaError):
                await asyncio.sleep(0.3)
        async with connected(f"opc.tcp://127.0.0.1:{port}/", pki, VIEWER) as c:
            ns = c.vbatt_ns
            folder = await (await c.nodes.objects.get_child([f"{ns}:VirtualBattery"])).get_child([f"{ns}:Classes"])
            assert await _children(folder) == ["Class_0", "Class_1", "Class_3"]
            base3 = "VirtualBattery.Classes.Class_3."
            got3 = await c.get_node(nid(c, base3 + "demand_w")).read_data_value()
            assert got3.Value.Value == pytest.approx(300.0) and got3.StatusCode.is_good()
            h = Events()
            sub = await c.create_subscription(50, h)
            mc = c.get_node(ua.ObjectIds.GeneralModelChangeEventType)
            await sub.subscribe_events(c.nodes.server, mc, evfilter=await get_filter_from_event_type([mc]))
            ac = c.get_node(ua.ObjectIds.AlarmConditionType)
            await sub.subscribe_events(c.nodes.server, ac, evfilter=await get_filter_from_event_type([ac]))
            await c.get_node(ua.ObjectIds.ConditionType).call_method(  # the alarm raised before we subscribed
                ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh),
                ua.Variant(sub.subscription_id, ua.VariantType.UInt32))

            def short3(active):
                return next((e for e in h.got if getattr(e, "ConditionName", None) == "RIDE_THROUGH_SHORT"
                             and e.SourceName == "Class_3" and getattr(e, "ActiveState/Id") is active), None)

            def added(nodeid):
                return next((e for e in h.got if any(ch.Affected == nodeid for ch in getattr(e, "Changes", None) or [])),
                            None)
            assert await wait_for(lambda: short3(True), timeout=90), h.got

            r = await asyncio.to_thread(run_vbatt, "reload", str(moved), "--pid", str(run.pid))
            assert r.returncode == 0, (r.stdout, r.stderr)
            cls2 = nid(c, "VirtualBattery.Classes.Class_2")
            ev = await wait_for(lambda: added(cls2), timeout=90)
            assert ev is not None, (h.got, err.read_text()[-2000:])
            verbs = {(ch.Affected, ch.Verb) for ch in ev.Changes}
            assert (cls2, ua.ModelChangeStructureVerbMask.NodeAdded) in verbs
            assert (nid(c, "VirtualBattery.Classes"), ua.ModelChangeStructureVerbMask.ReferenceAdded) in verbs
            assert ev.SourceNode == ua.NodeId(ua.ObjectIds.Server)
            # a client that browses again sees the new object, typed, with its engineering units
            assert await _children(folder) == ["Class_0", "Class_1", "Class_2", "Class_3"]
            obj = c.get_node(cls2)
            assert (await c.get_node(await obj.read_type_definition()).read_browse_name()).Name == "PriorityClassType"
            for var, unit in (("demand_w", "W"), ("reserve_wh", "Wh"), ("target_s", "s"), ("runtime_s", "s")):
                node = await obj.get_child([f"{ns}:{var}"])
                props = {(await p.read_browse_name()).Name: await p.read_value() for p in await node.get_properties()}
                assert props["EngineeringUnits"].DisplayName.Text == unit, var
            demand2 = c.get_node(nid(c, "VirtualBattery.Classes.Class_2.demand_w"))
            dv = await demand2.read_data_value()
            assert dv.Value.Value == pytest.approx(300.0) and dv.StatusCode.is_good()
            assert (await demand2.read_attribute(ua.AttributeIds.Historizing)).Value.Value is True
            # class 3 has no node now: its object stays, its last values marked as no longer updated
            for var, last in (("demand_w", 300.0), ("priority", 3)):
                dv3 = await c.get_node(nid(c, base3 + var)).read_attribute(ua.AttributeIds.Value, None, False)
                assert dv3.StatusCode.value == ua.StatusCodes.UncertainLastUsableValue, var
                assert dv3.Value.Value == pytest.approx(last), var
            # and nothing left to ride through: its alarm is cleared, saying why
            cleared = await wait_for(lambda: short3(False), timeout=90)
            assert cleared and cleared.Message.Text == "class 3: no node has this priority any more", h.got

            # class 2 recorded: every bin of its season (the history file, by wall time), and HistoryRead
            t_end = time.monotonic() + 120
            while True:
                _, j, _, n = load_bins(history, class_series(2, "demand_w"), 0.0, SEASON_S, BINS)
                if (np.bincount(j, weights=n, minlength=BINS)[:BINS] >= 3).all():  # samples per bin, all seasons
                    break
                assert time.monotonic() < t_end and run.poll() is None, (j, n, err.read_text()[-2000:])
                await asyncio.sleep(0.3)
            hist = await demand2.read_raw_history(datetime(2000, 1, 1, tzinfo=timezone.utc), datetime.now(timezone.utc))
            assert len(hist) >= 3 * BINS and {round(d.Value.Value) for d in hist} == {300}

            # back as it was: class 3 is served again (Good), class 2 keeps its object, now not updated
            r = await asyncio.to_thread(run_vbatt, "reload", str(cfg), "--pid", str(run.pid))
            assert r.returncode == 0, (r.stdout, r.stderr)
            demand3 = c.get_node(nid(c, base3 + "demand_w"))
            t_end = time.monotonic() + 90
            while not (await demand3.read_attribute(ua.AttributeIds.Value, None, False)).StatusCode.is_good():
                assert time.monotonic() < t_end, err.read_text()[-2000:]
                await asyncio.sleep(0.1)
            dv2 = await demand2.read_attribute(ua.AttributeIds.Value, None, False)
            assert dv2.StatusCode.value == ua.StatusCodes.UncertainLastUsableValue and dv2.Value.Value == 300.0
            assert await _children(folder) == ["Class_0", "Class_1", "Class_2", "Class_3"]

    try:
        asyncio.run(asyncio.wait_for(body(), 420))
    finally:
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 0, err.read_text()[-3000:]

    # a cold start on the same state dir, the plant as reloaded: class 2 starts from its own record
    with caplog.at_level(logging.INFO, logger="vbatt.energy"):
        img, eng, _, _ = _engine(moved.read_text())
    try:
        assert "class 2: its own profile, whole" in caplog.text, caplog.text
        rows = list(img.mem["energy.hz_class_prior"])
        assert rows[:3] == [0, 1, 2]  # the classes present first (class 3's record follows, unused)
        assert img.mem["energy.hz_class_prior_w"][2] == pytest.approx(np.full(BINS, 300.0), rel=0.05)
        img.node["demand_w"][:] = [100.0, 200.0, 300.0]
        _step(eng, time.time())
        _step(eng, time.time() + 0.01)
        assert list(img.mem["energy.priority"][:3]) == [0, 1, 2]
        assert img.mem["energy.hz"][2, HZ_SEEN] == BINS  # the whole profile in place at its first sample
    finally:
        img.close()
