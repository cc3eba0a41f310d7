"""The OPC UA server against a real process image and real asyncua clients over SignAndEncrypt on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from asyncua import ua
from asyncua.common.events import get_filter_from_event_type
from asyncua.ua.uaerrors import UaStatusCodeError

from vbatt.kernel.fields import NODE_FIELDS
from vbatt.kernel.image import Ctl, Mode, Op
from vbatt.opcua_models.history import HISTORY_FILE, load_series
from vbatt.opcua_models.model import NS_URI, node_vars
from vbatt.opcua_models.nodeset import nodeset_path, nodeset_xml

from test_opcua_support import OPERATOR, VIEWER, Events, connected, drain, fill, make_image, make_state, nid, \
    start_server, wait_for


@contextlib.asynccontextmanager
async def served(tmp_path, n: int = 4, **cfg_kw):
    pki = make_state(tmp_path)
    img, ids = make_image(n)
    fill(img)
    srv = await start_server(pki, img, ids, **cfg_kw)
    try:
        yield srv, img, pki, ids
    finally:
        await srv.stop()
        img.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def _code(exc: BaseException) -> int:
    return exc.code if isinstance(exc, UaStatusCodeError) else -1


# -- model ---------------------------------------------------------------------------------------
def test_committed_nodeset_is_the_generated_one():
    assert nodeset_path().read_text(encoding="utf-8") == nodeset_xml(), \
        "regenerate: python -m vbatt.opcua_models.nodeset"


def test_every_visible_field_is_a_typed_variable_of_battery_node_type():
    xml = nodeset_xml()
    assert f"<Uri>{NS_URI}</Uri>" in xml
    names = {v.name for v in node_vars()}
    assert names == {f.name for f in NODE_FIELDS} - {"updated_ns"}
    types = {v.name: v.vtype.name for v in node_vars()}
    assert types["voltage_v"] == "Double" and types["trip"] == "UInt32" and types["online"] == "Boolean"
    assert types["priority"] == "Int64"


# -- browse and values ---------------------------------------------------------------------------------
def test_browse_types_objects_and_values_equal_the_snapshot(tmp_path):
    async def body():
        async with served(tmp_path) as (srv, img, pki, ids):
            async with connected(srv.endpoint, pki) as c:
                ns = c.vbatt_ns
                vb = await c.nodes.objects.get_child([f"{ns}:VirtualBattery"])
                assert vb.nodeid == nid(c, "VirtualBattery")
                vbt = await vb.read_type_definition()
                assert (await c.get_node(vbt).read_browse_name()).Name == "VirtualBatteryType"
                folder = await vb.get_child([f"{ns}:Nodes"])
                children = await folder.get_children()
                assert [(await ch.read_browse_name()).Name for ch in children] == ids
                btype = await children[0].read_type_definition()
                assert (await c.get_node(btype).read_browse_name()).Name == "BatteryNodeType"
                for m in ("ResetTrip", "SetPriority", "SetMainSupplyLimit", "SetMode", "AcknowledgeAlarm"):
                    await vb.get_child([f"{ns}:{m}"])

                views, _ = img.read_published()
                for i, node_id in enumerate(ids):
                    for v in node_vars():
                        got = await c.get_node(nid(c, f"{node_id}.{v.name}")).read_value()
                        want = views["node." + v.name][i]
                        want = bool(want) if v.vtype == ua.VariantType.Boolean else want * v.scale
                        assert got == pytest.approx(want), (node_id, v.name)
                assert await c.get_node(nid(c, "VirtualBattery.soc")).read_value() == pytest.approx(25.0)
                assert await c.get_node(nid(c, "VirtualBattery.demand_w")).read_value() == len("demand_w")

                volt = c.get_node(nid(c, f"{ids[0]}.voltage_v"))
                assert (await volt.read_data_type()) == ua.NodeId(ua.ObjectIds.Double)
                props = {(await p.read_browse_name()).Name: await p.read_value() for p in await volt.get_properties()}
                assert props["EngineeringUnits"].DisplayName.Text == "V"
                assert (props["EURange"].Low, props["EURange"].High) == (0.0, 2000.0)
                soc_props = {(await p.read_browse_name()).Name: await p.read_value()
                             for p in await c.get_node(nid(c, f"{ids[0]}.soc")).get_properties()}
                assert soc_props["EngineeringUnits"].DisplayName.Text == "%"
                dv = await volt.read_data_value()
                assert dv.SourceTimestamp is not None and dv.ServerTimestamp is not None
    run(body())


def test_only_changed_values_are_written_and_offline_inputs_are_uncertain(tmp_path):
    async def body():
        async with served(tmp_path) as (srv, img, pki, ids):
            await srv.update()
            assert await srv.update() == 0  # nothing published since, scan words unchanged: nothing written
            img.node["demand_w"][2] = 1234.5
            img.publish()
            assert await srv.update() == 1
            img.node["online"][1] = 0
            img.publish()
            n = await srv.update()
            inputs = [v for v in node_vars() if v.field.kind.value == "input"]
            assert n == len(inputs)  # online itself + every input of node 1 re-stamped
            async with connected(srv.endpoint, pki, VIEWER) as c:
                dv = await c.get_node(nid(c, f"{ids[1]}.voltage_v")).read_data_value(raise_on_bad_status=False)
                assert dv.StatusCode.value == ua.StatusCodes.UncertainLastUsableValue
                dv = await c.get_node(nid(c, f"{ids[1]}.battery_w")).read_data_value()
                assert dv.StatusCode.is_good()  # outputs are the controller's own: not uncertain
                assert await c.get_node(nid(c, f"{ids[2]}.demand_w")).read_value() == 1234.5
    run(body())


def test_subscription_receives_changes_with_source_timestamp(tmp_path):
    class Handler:
        def __init__(self):
            self.got = []

        def datachange_notification(self, node, val, data):
            self.got.append((val, data.monitored_item.Value.SourceTimestamp))

    async def body():
        async with served(tmp_path) as (srv, img, pki, ids):
            async with connected(srv.endpoint, pki, VIEWER) as c:
                h = Handler()
                sub = await c.create_subscription(50, h)
                await sub.subscribe_data_change(c.get_node(nid(c, f"{ids[3]}.battery_w")))
                assert await wait_for(lambda: h.got)  # the initial value
                for k in (1, 2, 3):
                    before = datetime.now(timezone.utc)
                    img.time_ns[0] = time.monotonic_ns()  # the cycle's time, as the scan stamps it
                    img.node["battery_w"][3] = 100.0 * k
                    img.publish()
                    await srv.update()
                    assert await wait_for(lambda: h.got and h.got[-1][0] == 100.0 * k)
                    after = datetime.now(timezone.utc)
                    # the source timestamp is the cycle's (not the delivery's): between the two reads of the
                    # clock around it, however slow the delivery on a loaded machine, to a tick's slack
                    ts = h.got[-1][1]
                    assert ts is not None and before - timedelta(seconds=0.1) <= ts <= after, (before, ts, after)
    run(body())


def test_scan_status_and_cycle_statistics_are_exposed(tmp_path):
    async def body():
        async with served(tmp_path) as (srv, img, pki, ids):
            img.ctl[Ctl.MODE] = Mode.RUN
            img.ctl[Ctl.CYCLES] = 4242
            img.ctl[Ctl.OVERRUNS] = 7
            img.mem["stats.ring"][0, :10] = np.arange(1, 11) * 1000  # exec 1..10 µs
            img.mem["stats.count"][0] = 10
            srv._next_stats = 0
            await srv.update()
            async with connected(srv.endpoint, pki, VIEWER) as c:
                read = lambda s: c.get_node(nid(c, f"VirtualBattery.Scan.{s}")).read_value()  # noqa: E731
                assert await read("mode") == "RUN"
                assert await read("cycles") == 4242
                assert await read("overruns") == 7
                assert await read("cycle_ms") == 10.0
                assert await read("exec_max_us") == 10.0
                assert await read("exec_p50_us") in (5.0, 6.0)
    run(body())


# -- methods and writes ----------------------------------------------------------------------------
async def _call(c, name, *args):
    vb = c.get_node(nid(c, "VirtualBattery"))
    return await vb.call_method(nid(c, f"VirtualBattery.{name}"), *args)


S = lambda s: ua.Variant(s, ua.VariantType.String)  # noqa: E731


def test_each_method_works_for_an_operator_and_is_refused_for_a_viewer(tmp_path):
    calls = [
        ("ResetTrip", (S("rack-2"),), (Op.RESET_TRIP, 2, 0.0, 0)),
        ("SetPriority", (S("rack-1"), ua.Variant(7, ua.VariantType.Int64)), (Op.SET_PRIORITY, 1, 7.0, 0)),
        ("SetMainSupplyLimit", (ua.Variant(1500.0, ua.VariantType.Double),), (Op.SET_MAIN_LIMIT, -1, 1500.0, 0)),
        ("SetMode", (S("STOP"),), (Op.SET_MODE, -1, float(Mode.STOP), 0)),
        ("AcknowledgeAlarm", (S("rack-0"), ua.Variant(4, ua.VariantType.UInt32)), (Op.ACK_ALARM, 0, 0.0, 4)),
    ]

    async def body():
        async with served(tmp_path) as (srv, img, pki, ids):
            async with connected(srv.endpoint, pki, VIEWER) as v:
                for name, args, _ in calls:
                    with pytest.raises(UaStatusCodeError) as e:
                        await _call(v, name, *args)
                    assert _code(e.value) == ua.StatusCodes.BadUserAccessDenied, name
                with pytest.raises(UaStatusCodeError) as e:
                    await v.get_node(nid(v, "rack-1.priority")).write_value(ua.DataValue(ua.Variant(3, ua.VariantType.Int64)))
                assert _code(e.value) == ua.StatusCodes.BadUserAccessDenied
                assert await v.get_node(nid(v, "rack-1.voltage_v")).read_value() > 0  # but reads
            assert drain(img) == []
            async with connected(srv.endpoint, pki, OPERATOR) as c:
                for name, args, want in calls:
                    await _call(c, name, *args)
                    assert drain(img) == [want], name
                await c.get_node(nid(c, "rack-3.priority")).write_value(ua.DataValue(ua.Variant(9, ua.VariantType.Int64)))
                await c.get_node(nid(c, "VirtualBattery.main_limit_w")).write_value(
                    ua.DataValue(ua.Variant(2500.0, ua.VariantType.Double)))
                assert drain(img) == [(Op.SET_PRIORITY, 3, 9.0, 0), (Op.SET_MAIN_LIMIT, -1, 2500.0, 0)]
    run(body())


def test_out_of_range_nan_and_wrong_type_are_refused_and_change_nothing(tmp_path):
    D = lambda x: ua.Variant(x, ua.VariantType.Double)  # noqa: E731
    bad_calls = [
        ("SetPriority", (S("rack-1"), ua.Variant(1001, ua.VariantType.Int64)), ua.StatusCodes.BadOutOfRange),
        ("SetPriority", (S("rack-1"), ua.Variant(-1, ua.VariantType.Int64)), ua.StatusCodes.BadOutOfRange),
        ("SetPriority", (S("rack-1"), D(2.5)), ua.StatusCodes.BadTypeMismatch),
        ("SetPriority", (S("nope"), ua.Variant(1, ua.VariantType.Int64)), ua.StatusCodes.BadNodeIdUnknown),
        ("SetMainSupplyLimit", (D(math.nan),), ua.StatusCodes.BadOutOfRange),
        ("SetMainSupplyLimit", (D(math.inf),), ua.StatusCodes.BadOutOfRange),
        ("SetMainSupplyLimit", (D(-1.0),), ua.StatusCodes.BadOutOfRange),
        ("SetMainSupplyLimit", (S("1000"),), ua.StatusCodes.BadTypeMismatch),
        ("SetMode", (S("FAST"),), ua.StatusCodes.BadOutOfRange),
        ("ResetTrip", (ua.Variant(1, ua.VariantType.Int32),), ua.StatusCodes.BadTypeMismatch),
    ]
    bad_writes = [
        ("rack-1.priority", ua.Variant(5000, ua.VariantType.Int64), ua.StatusCodes.BadOutOfRange),
        ("rack-1.priority", D(3.0), ua.StatusCodes.BadTypeMismatch),
        ("VirtualBattery.main_limit_w", D(math.nan), ua.StatusCodes.BadOutOfRange),
        ("VirtualBattery.main_limit_w", D(-5.0), ua.StatusCodes.BadOutOfRange),
        ("VirtualBattery.main_limit_w", ua.Variant(5, ua.VariantType.Int32), ua.StatusCodes.BadTypeMismatch),
        ("rack-1.voltage_v", D(1.0), ua.StatusCodes.BadNotWritable),
        ("VirtualBattery.soc", D(1.0), ua.StatusCodes.BadNotWritable),
    ]

    async def body():
        async with served(tmp_path) as (srv, img, pki, ids):
            before = img.read_published()[0]["node.voltage_v"].copy()
            async with connected(srv.endpoint, pki, OPERATOR) as c:
                for name, args, code in bad_calls:
                    with pytest.raises(UaStatusCodeError) as e:
                        await _call(c, name, *args)
                    assert _code(e.value) == code, (name, args)
                for target, var, code in bad_writes:
                    with pytest.raises(UaStatusCodeError) as e:
                        await c.get_node(nid(c, target)).write_value(ua.DataValue(var))
                    assert _code(e.value) == code, (target, var)
                assert await c.get_node(nid(c, "rack-1.voltage_v")).read_value() == before[1]
            assert drain(img) == []
    run(body())


def test_commands_reach_a_real_scan_between_cycles(tmp_path):
    from vbatt.kernel.clock import FakeClock
    from vbatt.config.plant import load_config_text
    from vbatt.kernel.image import ProcessImage
    from vbatt.config.plan import build_programs, image_spec, partition
    from vbatt.kernel.scan import ScanEngine

    cfg, fleet = load_config_text("plant: {main_limit_w: 100}\nnodes:\n"
                                  "  - {id: a, demand_w: 50, capacity_wh: 100, max_discharge_w: 50}\n"
                                  "  - {id: b, demand_w: 20, capacity_wh: 100, max_discharge_w: 50}\n")
    programs = build_programs(cfg, len(fleet))
    spec = image_spec(cfg, fleet, programs, partition(cfg, fleet))
    pki = make_state(tmp_path)

    async def body():
        img = ProcessImage.create(spec)
        try:
            img.ctl[Ctl.MODE] = Mode.RUN
            clock = FakeClock()
            eng = ScanEngine(img, programs, cfg, clock)
            eng.cycle(clock.now_ns())
            srv = await start_server(pki, img, fleet.ids, cycle_ms=cfg.cycle.cycle_ms)
            try:
                async with connected(srv.endpoint, pki, OPERATOR) as c:
                    await _call(c, "SetPriority", S("b"), ua.Variant(5, ua.VariantType.Int64))
                    await _call(c, "SetMainSupplyLimit", ua.Variant(777.0, ua.VariantType.Double))
                    await srv.update()
                    assert await c.get_node(nid(c, "b.priority")).read_value() == 0  # not applied mid-cycle
                    clock.advance(10_000_000)
                    eng.cycle(clock.now_ns())  # drains the commands first, then runs and publishes
                    await srv.update()
                    assert await c.get_node(nid(c, "b.priority")).read_value() == 5
                    assert await c.get_node(nid(c, "VirtualBattery.main_limit_w")).read_value() == 777.0
            finally:
                await srv.stop()
        finally:
            img.close()
    run(body())


# -- alarms --------------------------------------------------------------------------------------------
async def _subscribe_alarms(c):
    h = Events()
    sub = await c.create_subscription(50, h)
    flt = await get_filter_from_event_type([c.get_node(ua.ObjectIds.AlarmConditionType)])
    await sub.subscribe_events(c.nodes.server, ua.ObjectIds.AlarmConditionType, evfilter=flt)
    return h, sub


def _fields(ev) -> dict:
    return ev.get_event_props_as_fields_dict()


def test_forced_trip_is_an_alarm_event_that_can_be_acknowledged_and_refreshed(tmp_path):
    from vbatt.programs.codes import ALARM_CODES, TRIP_CODES

    trip = TRIP_CODES[2]  # OVER_TEMPERATURE
    alarm = ALARM_CODES[3]  # TEMPERATURE_HIGH

    async def body():
        async with served(tmp_path) as (srv, img, pki, ids):
            async with connected(srv.endpoint, pki, OPERATOR) as c:
                h, _ = await _subscribe_alarms(c)
                img.node["trip"][1] = trip.mask
                img.node["alarm"][2] = alarm.mask
                img.publish()
                await srv.update()
                assert await wait_for(lambda: len(h.got) >= 2)
                by_name = {e.ConditionName: e for e in h.got}
                t = by_name[trip.name]
                assert t.Severity == trip.severity
                assert t.SourceName == "rack-1" and t.SourceNode == nid(c, "rack-1")
                assert trip.text in t.Message.Text
                assert getattr(t, "ActiveState/Id") is True and getattr(t, "AckedState/Id") is False
                assert t.EventType == ua.NodeId(ua.ObjectIds.TripAlarmType)
                a = by_name[alarm.name]
                assert a.EventType == ua.NodeId(ua.ObjectIds.OffNormalAlarmType)

                # acknowledge the health alarm with the standard method on its condition
                cond = c.get_node(a.NodeId if hasattr(a, "NodeId") else nid(c, f"rack-2.alarm.{alarm.name}"))
                await cond.call_method(ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
                                       ua.Variant(a.EventId, ua.VariantType.ByteString),
                                       ua.Variant(ua.LocalizedText("seen"), ua.VariantType.LocalizedText))
                assert drain(img) == [(Op.ACK_ALARM, 2, 0.0, alarm.mask)]
                assert await wait_for(lambda: any(e.ConditionName == alarm.name and getattr(e, "AckedState/Id")
                                                  for e in h.got))
                with pytest.raises(UaStatusCodeError) as e:  # twice: already acknowledged
                    await cond.call_method(ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
                                           ua.Variant(a.EventId, ua.VariantType.ByteString),
                                           ua.Variant(ua.LocalizedText(""), ua.VariantType.LocalizedText))
                assert _code(e.value) in (ua.StatusCodes.BadConditionBranchAlreadyAcked, ua.StatusCodes.BadEventIdUnknown)

            # the watchdog is an alarm too, and so is a tree's fallback (agg tree_state 2: the parent stopped
            # renewing), both of the virtual battery
            img.ctl[Ctl.WATCHDOG] = 1
            img.agg["tree_state"][0] = 2
            img.publish()
            await srv.update()
            # a client that connects later gets the active conditions by ConditionRefresh
            async with connected(srv.endpoint, pki, VIEWER) as v:
                h2, sub2 = await _subscribe_alarms(v)
                await v.get_node(ua.ObjectIds.ConditionType).call_method(
                    ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh),
                    ua.Variant(sub2.subscription_id, ua.VariantType.UInt32))
                want = {trip.name, alarm.name, "WATCHDOG", "TREE_FALLBACK"}
                assert await wait_for(lambda: {e.ConditionName for e in h2.got} >= want)
                fb = next(e for e in h2.got if e.ConditionName == "TREE_FALLBACK")
                assert fb.SourceName == "VirtualBattery" and "own main supply limit" in fb.Message.Text
                assert getattr(fb, "ActiveState/Id") is True
                # a viewer may refresh but not acknowledge
                t2 = next(e for e in h2.got if e.ConditionName == trip.name)
                with pytest.raises(UaStatusCodeError) as e:
                    await v.get_node(t2.NodeId).call_method(
                        ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
                        ua.Variant(t2.EventId, ua.VariantType.ByteString),
                        ua.Variant(ua.LocalizedText(""), ua.VariantType.LocalizedText))
                assert _code(e.value) == ua.StatusCodes.BadUserAccessDenied

            # cleared and acknowledged conditions are no longer retained
            img.node["alarm"][2] = 0
            img.publish()
            await srv.update()
            assert {c.code.name for c in srv.alarms.retained()} == {trip.name, "WATCHDOG", "TREE_FALLBACK"}
            img.agg["tree_state"][0] = 1  # controlled from above again: inactive (retained until acknowledged)
            img.publish()
            await srv.update()
            assert not next(c for c in srv.alarms.retained() if c.code.name == "TREE_FALLBACK").active
    run(body())


# -- history ---------------------------------------------------------------------------------------------
def test_history_read_returns_the_stored_range(tmp_path):
    async def body():
        async with served(tmp_path) as (srv, img, pki, ids):
            t0 = datetime.now(timezone.utc)
            for k in range(1, 6):
                img.agg["demand_w"][0] = 100.0 * k
                img.agg["soc"][0] = 0.1 * k
                img.time_ns[0] = __import__("time").monotonic_ns()
                img.publish()
                srv._next_sample = 0
                await srv.update()
                await asyncio.sleep(0.02)
            t1 = datetime.now(timezone.utc)
            srv.history.flush()
            async with connected(srv.endpoint, pki, VIEWER) as c:
                node = c.get_node(nid(c, "VirtualBattery.demand_w"))
                dvs = await node.read_raw_history(t0, t1)
                vals = [d.Value.Value for d in dvs]
                assert vals[-5:] == [100.0, 200.0, 300.0, 400.0, 500.0]
                assert all(t0 - timedelta(seconds=1) <= d.SourceTimestamp <= t1 for d in dvs)
                soc = [d.Value.Value for d in await c.get_node(nid(c, "VirtualBattery.soc")).read_raw_history(t0, t1)]
                assert soc[-5:] == pytest.approx([10.0, 20.0, 30.0, 40.0, 50.0])  # shown in %
                assert await c.get_node(nid(c, "VirtualBattery.demand_w")).read_raw_history(
                    t1 + timedelta(hours=1), t1 + timedelta(hours=2)) == []
            # the forecast can start from the file after a restart (raw image units)
            ts, vs = load_series(srv.state / HISTORY_FILE, "soc")
            assert list(vs[-5:]) == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
            assert np.all(np.diff(ts) >= 0)
    run(body())


# -- security ------------------------------------------------------------------------------------------------
def test_endpoints_offer_only_sign_and_encrypt_with_the_three_policies(tmp_path):
    async def body():
        async with served(tmp_path) as (srv, img, pki, ids):
            async with connected(srv.endpoint, pki) as c:
                eps = await c.get_endpoints()
            modes = {e.SecurityMode for e in eps}
            assert modes == {ua.MessageSecurityMode.SignAndEncrypt}
            assert {e.SecurityPolicyUri.rsplit("#", 1)[1] for e in eps} == {
                "Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"}
            tokens = {t.TokenType for e in eps for t in e.UserIdentityTokens}
            assert tokens == {ua.UserTokenType.UserName}
            for policy in ("Aes128Sha256RsaOaep", "Aes256Sha256RsaPss"):
                async with connected(srv.endpoint, pki, policy=policy) as c:
                    assert await c.get_node(nid(c, "VirtualBattery.soc")).read_value() == pytest.approx(25.0)
    run(body())


@pytest.mark.parametrize("case", ["anonymous", "wrong_password", "unknown_user", "admin_no_password",
                                  "untrusted_certificate"])
def test_refused_sessions(tmp_path, case):
    async def body():
        async with served(tmp_path) as (srv, img, pki, ids):
            user = {"anonymous": None, "wrong_password": (OPERATOR[0], "not-the-password"),
                    "unknown_user": ("mallory", "whatever-pass"), "admin_no_password": ("admin", ""),
                    "untrusted_certificate": OPERATOR}[case]
            with pytest.raises(Exception) as e:
                async with connected(srv.endpoint, pki, user, untrusted=case == "untrusted_certificate") as c:
                    await c.get_node(nid(c, "VirtualBattery.soc")).read_value()
            msg = repr(e.value)
            assert any(s in msg for s in ("BadIdentityTokenRejected", "BadUserAccessDenied", "BadCertificateUntrusted",
                                          "BadIdentityTokenInvalid", "BadSecurityChecksFailed")), msg
            if case == "untrusted_certificate":
                assert list((pki.state / "pki" / "rejected").glob("*.der"))
    run(body())


def test_anonymous_is_a_viewer_only_when_configured(tmp_path):
    async def body():
        async with served(tmp_path, allow_anonymous=True) as (srv, img, pki, ids):
            async with connected(srv.endpoint, pki, None) as c:
                assert await c.get_node(nid(c, "VirtualBattery.soc")).read_value() == pytest.approx(25.0)
                with pytest.raises(UaStatusCodeError) as e:
                    await _call(c, "SetMode", S("STOP"))
                assert _code(e.value) == ua.StatusCodes.BadUserAccessDenied
    run(body())


def test_passwords_are_stored_only_as_hashes(tmp_path):
    pki = make_state(tmp_path)
    text = (pki.state / "users.json").read_text()
    assert OPERATOR[1] not in text and VIEWER[1] not in text
    assert oct((pki.state / "users.json").stat().st_mode & 0o777) == "0o600"
