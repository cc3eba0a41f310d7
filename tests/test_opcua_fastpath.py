"""The OPC UA fast path puts on the wire what asyncua's stock encoder does, decoded value for value.

One difference in bytes, on purpose: a Good status is left out of the DataValue (its encoding mask
says "no status", which means Good: 4 bytes fewer per notification); the stock encoder writes the
zero. The end-to-end tests decode these bytes with two client stacks (asyncua, node-opcua); here
every scalar type and status the server writes is decoded and compared, and a real server with a
real subscribed client checks that write_values() reaches the client, complete."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from asyncua import Client, Server, ua
from asyncua.ua import ua_binary

from vbatt.opcua_models import fastpath

from test_opcua_support import free_port

T1 = dt.datetime(2026, 11, 24, 10, 0, 0, 123456, tzinfo=dt.timezone.utc)
T2 = dt.datetime(2026, 11, 24, 10, 0, 0, 654321, tzinfo=dt.timezone.utc)
GOOD = ua.StatusCode()
UNCERTAIN = ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)

CASES = [(ua.VariantType.Double, 3.25), (ua.VariantType.Double, float("nan")), (ua.VariantType.Float, 1.5),
         (ua.VariantType.Int64, -7), (ua.VariantType.UInt64, 2**40), (ua.VariantType.Int32, -3),
         (ua.VariantType.UInt32, 17), (ua.VariantType.Boolean, True), (ua.VariantType.String, "RUN ü")]


def _decode(raw: bytes) -> ua.MonitoredItemNotification:
    from asyncua.common.utils import Buffer

    return ua_binary.struct_from_binary(ua.MonitoredItemNotification, Buffer(raw))


def _same(a: ua.MonitoredItemNotification, b: ua.MonitoredItemNotification) -> bool:
    va, vb = a.Value, b.Value
    same_value = va.Value.Value == vb.Value.Value or (va.Value.Value != va.Value.Value and vb.Value.Value != vb.Value.Value)
    return (a.ClientHandle == b.ClientHandle and same_value and va.Value.VariantType == vb.Value.VariantType
            and (va.StatusCode or GOOD).value == (vb.StatusCode or GOOD).value
            and va.SourceTimestamp == vb.SourceTimestamp and va.ServerTimestamp == vb.ServerTimestamp)


def _stock(handle: int, dv: ua.DataValue) -> bytes:
    was = fastpath.installed()
    fastpath.uninstall()
    try:
        return ua_binary.struct_to_binary(ua.MonitoredItemNotification(ClientHandle=handle, Value=dv))
    finally:
        if was:
            fastpath.install()


@pytest.mark.parametrize("status", [GOOD, UNCERTAIN], ids=["good", "uncertain"])
@pytest.mark.parametrize("vt,value", CASES, ids=[f"{vt.name}-{v}" for vt, v in CASES])
def test_wire_equals_the_stock_encoding(vt, value, status):
    dv = ua.DataValue(ua.Variant(value, vt), StatusCode=status, SourceTimestamp=T1, ServerTimestamp=T2)
    fast = fastpath.data_value(value, vt, status, T1, T2)
    assert ua_binary.struct_to_binary(fast) == ua_binary.struct_to_binary(dv)
    expected = _decode(_stock(42, dv))
    got = fastpath.encode_notification(ua.MonitoredItemNotification(ClientHandle=42, Value=fast))
    assert got == (42).to_bytes(4, "little") + fastpath.wire(fast)
    assert _same(_decode(got), expected)
    if status.value:  # only a Good status is left out
        assert got == _stock(42, dv)
    else:
        assert len(got) == len(_stock(42, dv)) - 4


def test_other_values_fall_back_to_the_stock_encoder():
    arr = ua.DataValue(ua.Variant([1.0, 2.0], ua.VariantType.Double), SourceTimestamp=T1)
    assert fastpath.wire(arr) is None
    note = ua.MonitoredItemNotification(ClientHandle=1, Value=arr)
    assert fastpath.encode_notification(note) == _stock(1, arr)
    assert _decode(_stock(1, arr)).Value.Value.Value == [1.0, 2.0]


async def _roundtrip(port: int) -> tuple[list, list]:
    srv = Server()
    await srv.init()
    srv.set_endpoint(f"opc.tcp://127.0.0.1:{port}/")
    srv.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    objs = srv.nodes.objects
    vars_ = [await objs.add_variable(ua.NodeId(f"v{i}", 2), f"v{i}", ua.Variant(0.0, ua.VariantType.Double))
             for i in range(50)]
    aspace = srv.iserver.aspace
    avs = [aspace._nodes[v.nodeid].attributes[ua.AttributeIds.Value] for v in vars_]
    fastpath.install()
    got: list = []

    class Handler:
        def datachange_notification(self, node, val, data):
            got.append((node.nodeid.Identifier, val, data.monitored_item.Value.StatusCode.value))

    async with srv:
        async with Client(f"opc.tcp://127.0.0.1:{port}/") as c:
            sub = await c.create_subscription(20, Handler())
            await sub.subscribe_data_change([c.get_node(v.nodeid) for v in vars_], queuesize=4)
            await asyncio.sleep(0.3)
            got.clear()
            pending: dict = {}
            vals = [float(i) * 1.5 for i in range(50)]
            status = [i % 7 != 3 for i in range(50)]  # some Uncertain values: the stock wire() path
            fastpath.write_values(avs, list(range(50)), vals, ua.VariantType.Double, status, GOOD, UNCERTAIN,
                                  T1, T2, pending)
            await fastpath.flush(pending)
            for _ in range(100):
                if len(got) >= 50:
                    break
                await asyncio.sleep(0.05)
            read = [(await c.get_node(v.nodeid).read_data_value(raise_on_bad_status=False)).Value.Value for v in vars_]
    return got, read


def test_write_values_reaches_a_subscribed_client():
    got, read = asyncio.run(_roundtrip(free_port()))
    by_id = {ident: (val, code) for ident, val, code in got}
    assert len(got) == 50
    for i in range(50):
        code = 0 if i % 7 != 3 else ua.StatusCodes.UncertainLastUsableValue
        assert by_id[f"v{i}"] == (i * 1.5, code)
        assert read[i] == i * 1.5
