"""The surfaces of the energy layer (issue #12): targets changed at run time (`vbatt reload`, OPC UA),
kept across a restart, and shown per class (live view, OPC UA objects, history, alarm)."""

from __future__ import annotations

import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import REPO, VBATT, read_json, run_vbatt
from vbatt.config.plant import ConfigError, load_config_text

PLANT = """\
cycle: {cycle_ms: 10}
plant:
  main_limit_w: 0
  ride_through_s: {0: 600, 1: 60}
nodes:
  - {id: A, priority: 0, demand_w: 100, max_discharge_w: 500, link_max_w: 500, capacity_wh: 100, soc: 0.6}
  - {id: B, priority: 1, demand_w: 100, max_discharge_w: 500, link_max_w: 500, capacity_wh: 100, soc: 0.6}
programs: [energy, allocation]
"""


def test_targets_without_the_energy_program_are_a_config_error_with_file_line():
    with pytest.raises(ConfigError) as e:
        load_config_text(PLANT.replace("programs: [energy, allocation]", "programs: [allocation]"), "p.yaml")
    msg = str(e.value)
    assert "p.yaml:4: plant.ride_through_s: ride-through targets need the energy program" in msg
    assert "add 'energy' to programs, before the allocation" in msg
    load_config_text(PLANT.replace("  ride_through_s: {0: 600, 1: 60}\n", "").replace(
        "[energy, allocation]", "[allocation]"), "p.yaml")  # no targets, no program: today's behaviour


def _wait_for(err, text, proc, timeout_s=90.0):
    deadline = time.monotonic() + timeout_s
    while text not in err.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.1)


def test_reload_changes_the_targets_between_two_cycles(tmp_path):
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(PLANT)
    snap, err = tmp_path / "snap.json", tmp_path / "err.txt"
    run = subprocess.Popen([*VBATT, "run", str(cfg), "-v", "-q", "--duration", "120", "--snapshot", str(snap)],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(err, "w"), start_new_session=True)
    try:
        _wait_for(err, "real-time setup", run)
        new = tmp_path / "new.yaml"
        new.write_text(PLANT.replace("{0: 600, 1: 60}", "{0: 900}"))
        r = run_vbatt("reload", str(new), "--pid", str(run.pid))
        assert r.returncode == 0, r.stderr
        assert "ride_through_s {0: 600 -> 900 s, 1: none}" in r.stdout, r.stdout
        r = run_vbatt("reload", str(new), "--pid", str(run.pid))
        assert r.returncode == 0 and "no change" in r.stdout
    finally:
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 0, err.read_text()
    classes = read_json(snap)["classes"]
    assert [(c["priority"], c["target_s"]) for c in classes] == [(0, 900.0), (1, 0.0)]


# -- OPC UA: class objects, SetRideThrough, the unreachable alarm, history ---------------------------------------
OUTAGE = """\
cycle: {cycle_ms: 10}
plant: {main_limit_w: 0, ride_through_s: {0: 600}}
nodes:
  - {id: A, priority: 0, demand_w: 100, max_discharge_w: 500, link_max_w: 500, capacity_wh: 100, soc: 0.4}
  - {id: B, priority: 1, demand_w: 100, max_discharge_w: 500, link_max_w: 500, capacity_wh: 100, soc: 0.4}
programs: [energy, allocation]
"""


@pytest.fixture
def scan_and_server(tmp_path):
    """A real scan (energy + allocation, an injected clock) and the OPC UA server on its image."""
    import asyncio

    from test_opcua_support import make_state, start_server

    from vbatt.config.plan import build_programs, image_spec, partition
    from vbatt.kernel.clock import FakeClock
    from vbatt.kernel.image import Ctl, Mode, ProcessImage
    from vbatt.kernel.scan import ScanEngine

    cfg, fleet = load_config_text(OUTAGE)
    programs = build_programs(cfg, len(fleet))
    spec = image_spec(cfg, fleet, programs, partition(cfg, fleet))
    pki = make_state(tmp_path)
    img = ProcessImage.create(spec)
    for k, v in fleet.values.items():
        img.node[k][:] = v
    img.node["online"][:] = 1
    img.agg["main_limit_w"][0] = 0.0
    img.ctl[Ctl.MODE] = Mode.RUN
    clock = FakeClock()
    eng = ScanEngine(img, programs, cfg, clock)

    def cycle():
        clock.advance(10_000_000)
        img.node["updated_ns"][:] = clock.now_ns()
        eng.cycle(clock.now_ns())

    cycle()

    async def start():
        return await start_server(pki, img, fleet.ids, cycle_ms=10.0)

    try:
        yield img, cycle, start, pki
    finally:
        img.close()


def test_opcua_class_objects_set_ride_through_alarm_and_history(scan_and_server):
    import asyncio
    import math
    from datetime import datetime, timezone

    from asyncua import ua
    from asyncua.common.events import get_filter_from_event_type
    from asyncua.ua.uaerrors import UaStatusCodeError
    from test_opcua_support import OPERATOR, VIEWER, Events, connected, nid, wait_for

    from vbatt.programs.energy import class_rows, unreachable_texts

    img, cycle, start, pki = scan_and_server
    D = lambda x: ua.Variant(x, ua.VariantType.Double)  # noqa: E731
    I = lambda x: ua.Variant(x, ua.VariantType.Int64)  # noqa: E731

    async def body():
        srv = await start()
        try:
            async with connected(srv.endpoint, pki, OPERATOR) as c:
                ns = c.vbatt_ns
                vb = await c.nodes.objects.get_child([f"{ns}:VirtualBattery"])
                folder = await vb.get_child([f"{ns}:Classes"])
                names = [(await ch.read_browse_name()).Name for ch in await folder.get_children()]
                assert names == ["Class_0", "Class_1"]
                cls1 = await folder.get_child([f"{ns}:Class_1"])
                ctype = c.get_node(await cls1.read_type_definition())
                assert (await ctype.read_browse_name()).Name == "PriorityClassType"
                for var, unit in (("demand_w", "W"), ("reserve_wh", "Wh"), ("target_s", "s"), ("runtime_s", "s")):
                    node = await cls1.get_child([f"{ns}:{var}"])
                    props = {(await p.read_browse_name()).Name: await p.read_value() for p in await node.get_properties()}
                    assert props["EngineeringUnits"].DisplayName.Text == unit, var
                rows = {r["priority"]: r for r in class_rows(img.mem)}
                for p in (0, 1):
                    for k, want in rows[p].items():
                        got = await c.get_node(nid(c, f"VirtualBattery.Classes.Class_{p}.{k}")).read_value()
                        assert got == pytest.approx(want), (p, k, got, want)
                assert rows[1]["target_s"] == 0.0 and rows[1]["reachable"]

                h = Events()
                sub = await c.create_subscription(50, h)
                flt = await get_filter_from_event_type([c.get_node(ua.ObjectIds.AlarmConditionType)])
                await sub.subscribe_events(c.nodes.server, ua.ObjectIds.AlarmConditionType, evfilter=flt)

                m = nid(c, "VirtualBattery.SetRideThrough")
                refused = [((I(1), D(math.nan)), ua.StatusCodes.BadOutOfRange),
                           ((I(1), D(-1.0)), ua.StatusCodes.BadOutOfRange),
                           ((I(1), D(math.inf)), ua.StatusCodes.BadOutOfRange),
                           ((I(7), D(60.0)), ua.StatusCodes.BadOutOfRange),  # no node has priority 7
                           ((D(1.0), D(60.0)), ua.StatusCodes.BadTypeMismatch)]
                for args, code in refused:
                    with pytest.raises(UaStatusCodeError) as e:
                        await vb.call_method(m, *args)
                    assert e.value.code == code, args
                assert img.commands.applied(1) == int(img.commands.a["head"][1])  # nothing was queued
                await vb.call_method(m, I(1), D(1800.0))
                async with connected(srv.endpoint, pki, VIEWER) as v:
                    with pytest.raises(UaStatusCodeError) as e:
                        await v.get_node(nid(v, "VirtualBattery")).call_method(
                            nid(v, "VirtualBattery.SetRideThrough"), I(1), D(10.0))
                    assert e.value.code == ua.StatusCodes.BadUserAccessDenied
                cycle()  # the target applies between two cycles
                assert class_rows(img.mem)[1]["target_s"] == 1800.0
                # 2 x 30 Wh usable (soc_min 0.1) for 200 W: 1,080 s with no targets, short of 1,800 s for class 1
                texts = unreachable_texts(img.mem)
                assert len(texts) == 1 and texts[0].startswith("class 1: ") and texts[0].endswith(" s of 1,800 s")
                for _ in range(3):
                    cycle()
                    srv._next_sample = 0
                    await srv.update()
                    await asyncio.sleep(0.02)
                base = "VirtualBattery.Classes.Class_1."
                assert await c.get_node(nid(c, base + "target_s")).read_value() == 1800.0
                assert await c.get_node(nid(c, base + "reachable")).read_value() is False
                assert await wait_for(lambda: any(e.ConditionName == "RIDE_THROUGH_SHORT" and
                                                  e.SourceName == "Class_1" for e in h.got))
                ev = next(e for e in h.got if e.ConditionName == "RIDE_THROUGH_SHORT" and e.SourceName == "Class_1")
                assert ev.SourceNode == nid(c, "VirtualBattery.Classes.Class_1")
                assert ev.Message.Text == texts[0] and getattr(ev, "ActiveState/Id") is True
                srv.history.flush()
                # stamped with the cycle's time: the injected clock's, near the boot of this machine
                hist = await c.get_node(nid(c, base + "runtime_s")).read_raw_history(
                    datetime(2000, 1, 1, tzinfo=timezone.utc), datetime.now(timezone.utc))
                assert len(hist) >= 3
                assert hist[-1].Value.Value == pytest.approx(class_rows(img.mem)[1]["runtime_s"], rel=1e-3)
        finally:
            await srv.stop()

    asyncio.run(asyncio.wait_for(body(), 90))


# -- live view ------------------------------------------------------------------------------------------------------
def test_live_view_shows_a_row_per_class_with_the_energy_program(scan_and_server):
    from rich.console import Console

    from vbatt.kernel.image import Op
    from vbatt.programs.energy import class_rows
    from vbatt.supervise.live import render

    img, cycle, _start, _pki = scan_and_server
    img.commands.push(0, Op.SET_MEMORY, 1, 1800.0, arg=img.spec.memory_index("energy.target_by_priority_s"))
    cycle()
    rows = class_rows(img.mem)
    con = Console(record=True, width=200)
    con.print(render(img, 10.0, classes=rows))
    shown = con.export_text()
    assert "priority classes" in shown
    lines = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:-1]] for ln in shown.splitlines()
             if ln.count("│") == 7}
    assert lines["0"][2:] == ["600 s", f"{rows[0]['runtime_s']:,.0f} s", "yes"], shown
    assert lines["1"][2:] == ["1,800 s", f"{rows[1]['runtime_s']:,.0f} s", "NO"], shown
    assert lines["1"][0] == "100 W" and lines["1"][1] == f"{rows[1]['reserve_wh'] / 1e3:,.2f} kWh"
    con = Console(record=True, width=200)
    con.print(render(img, 10.0))  # without the energy program: no class table
    assert "priority classes" not in con.export_text()


def test_a_bad_target_command_is_refused_at_the_scan_and_changes_nothing(scan_and_server):
    from vbatt.kernel.image import Op
    from vbatt.programs.energy import class_rows

    img, cycle, _start, _pki = scan_and_server
    before = img.mem["energy.target_by_priority_s"].copy()
    k = img.spec.memory_index("energy.target_by_priority_s")
    for node, value, arg in ((1, -5.0, k), (1, float("inf"), k), (5000, 60.0, k),
                             (1, 60.0, img.spec.memory_index("energy.soc_min"))):  # not a setting
        img.commands.push(0, Op.SET_MEMORY, node, value, arg=arg)
    cycle()
    assert np.array_equal(img.mem["energy.target_by_priority_s"], before, equal_nan=True)
    assert img.mem["energy.soc_min"][0] == 0.1
    assert [r["target_s"] for r in class_rows(img.mem)] == [600.0, 0.0]


# -- retained across a kill -9 ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_reloaded_target_survives_kill_9_and_a_warm_restart(tmp_path):
    import os

    from vbatt.retain.store import RetainStore

    retain = tmp_path / "retain"
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(PLANT.replace("cycle: {cycle_ms: 10}",
                                 f"cycle: {{cycle_ms: 10}}\nretain: {{enabled: true, dir: '{retain}', period_s: 0.2}}"))
    err = tmp_path / "err.txt"
    run = subprocess.Popen([*VBATT, "run", str(cfg), "-v", "-q", "--duration", "120"],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(err, "w"), start_new_session=True)
    try:
        _wait_for(err, "real-time setup", run)
        new = tmp_path / "new.yaml"
        new.write_text(cfg.read_text().replace("{0: 600, 1: 60}", "{0: 600, 1: 300}"))
        r = run_vbatt("reload", str(new), "--pid", str(run.pid))
        assert r.returncode == 0 and "ride_through_s {1: 60 -> 300 s}" in r.stdout, (r.stdout, r.stderr)
        deadline = time.monotonic() + 60
        while True:  # program memory is saved every period_s
            st = RetainStore(str(retain)).load().state
            if st is not None and st.arrays["energy.target_by_priority_s"][1] == 300.0:
                break
            assert time.monotonic() < deadline and run.poll() is None, err.read_text()
            time.sleep(0.1)
    finally:
        os.kill(run.pid, signal.SIGKILL)
        run.wait(10)
    deadline = time.monotonic() + 15
    while subprocess.run(["pgrep", "-s", str(run.pid)], capture_output=True).stdout and time.monotonic() < deadline:
        time.sleep(0.1)  # the children follow (parent-death signal)

    snap = tmp_path / "snap.json"
    r = run_vbatt("run", str(cfg), "-q", "--cycles", "20", "--snapshot", str(snap))  # the file still says 60
    assert r.returncode == 0, r.stderr
    assert "warm restart" in r.stdout + r.stderr
    assert [(c["priority"], c["target_s"]) for c in read_json(snap)["classes"]] == [(0, 600.0), (1, 300.0)]
    r = run_vbatt("run", str(cfg), "-q", "--cold", "--cycles", "20", "--snapshot", str(snap))
    assert r.returncode == 0, r.stderr
    assert [(c["priority"], c["target_s"]) for c in read_json(snap)["classes"]] == [(0, 600.0), (1, 60.0)]
