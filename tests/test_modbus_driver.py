"""The controller side (drivers/modbus/driver.py) against real agents and misbehaving servers on 127.0.0.1.

Every bad input marks only its own node faulty, with a specific Fault and reason; the good
node polled alongside keeps its data and its poll rate.
"""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest

from test_modbus_support import (M, V, endpoint, fleet_of, free_port, mbap, poll_for, poller, raw_server,
                                 registers_reply, request_range, serving, staging)
from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.node.backends.sim import SimBackend
from vbatt.drivers.faults import Fault


def run(coro):
    return asyncio.run(coro)


def test_discovery_polling_and_counters():
    async def body():
        async with serving() as agents:
            p = poller([endpoint(agents.ports[0], "A"), endpoint(agents.ports[1], "B")])
            await poll_for(p, 0.4)
            st = staging(2)
            p.fill(st)
            assert st["fault"].tolist() == [0, 0]
            assert st["soc"] == pytest.approx([0.8, 0.6], abs=1e-6)
            assert st["demand_w"].tolist() == [200.0, 50.0]
            assert st["max_discharge_w"].tolist() == [100.0, 150.0]
            assert st["capacity_wh"].tolist() == [1000.0, 1000.0]
            assert st["voltage_v"] == pytest.approx([48.0, 48.0])
            assert all(st["updated_ns"] > 0) and all(st["io_latency_ms"] > 0)
            assert all(st["io_requests"] >= 4) and st["io_errors"].tolist() == [0, 0]
            assert p.links[0].ident["SN"] == "A" and p.links[0].layout == (40070, 106, True)
            await p.close()

    run(body())


def test_instruction_is_written_applied_and_acknowledged():
    async def body():
        async with serving() as agents:
            p = poller([endpoint(agents.ports[0], "A"), endpoint(agents.ports[1], "B")], lease_ms=800)
            p.set_instruction(1234, {"battery_w": np.array([100.0, 150.0]), "bus_w": np.array([100.0, -100.0]),
                                     "served_w": np.array([200.0, 50.0]), "shed_w": np.zeros(2)})
            await poll_for(p, 0.3)
            assert p.acked_seq.tolist() == [1234, 1234] and p.sent_seq.tolist() == [1234, 1234]
            assert agents.seq.tolist() == [1234, 1234] and agents.lease_ms.tolist() == [800, 800]
            assert agents.cmd["battery_w"].tolist() == [100.0, 150.0]
            assert agents.cmd["bus_w"].tolist() == [100.0, -100.0]
            agents.tick()
            assert agents.applied_w.tolist() == [100.0, 150.0]
            await p.close()

    run(body())


def _memory(rows: np.ndarray):
    """A Modbus server answering FC3/FC23 reads from a copy of an agent's registers (edited by the test)."""
    mem = rows.astype(np.int64).tolist()

    def reply(req: bytes):
        addr, count = request_range(req)
        off = addr - M.base
        if off < 0 or off + count > len(mem):
            return mbap(req, bytes([req[7] | 0x80, 2]))
        return registers_reply(req, mem[off:off + count])

    return reply


def _rows_with(**points) -> np.ndarray:
    fleet = fleet_of()
    from vbatt.drivers.node.agent import AgentSet, AgentSpec

    a = AgentSet(SimBackend(fleet, 0, 1), [AgentSpec("A", "127.0.0.1", 0)])
    rows = a.rows[:1].copy()
    for (model, name), value in points.items() if False else []:
        pass
    for key, value in points.items():
        model, name = key.split("__")
        ss.put(rows, M.at(int(model), name), M.base, [value])
    return rows[0]


def _exception(req):
    return mbap(req, bytes([req[7] | 0x80, 4]))


def _garbage(req):
    return b"\x13\x37garbage, not modbus at all\r\n"


def _short(req):  # a header announcing 200 bytes, then only 3 of them
    return req[:4] + struct.pack(">HB", 201, req[6]) + b"\x03\xc8\x00"


def _wrong_count(req):
    return registers_reply(req, [0x5375, 0x6E53, 1])  # asked 2, got 3 registers


def _no_suns(req):
    addr, count = request_range(req)
    return registers_reply(req, [0x1234] * count)


def _other_unit(req):
    addr, count = request_range(req)
    return registers_reply(req, [0] * count)[:6] + bytes([req[6] + 1]) + registers_reply(req, [0] * count)[7:]


def _silent(req):
    return None


BAD = [
    ("exception reply", _exception, Fault.EXCEPTION_REPLY, "exception reply 0x04"),
    ("garbled frame", _garbage, Fault.GARBLED, "garbled"),
    ("short frame", _short, Fault.GARBLED, "short or garbled"),
    ("wrong register count", _wrong_count, Fault.GARBLED, "asked 2 registers, got 3"),
    ("missing SunS", _no_suns, Fault.NO_SUNSPEC, "no 'SunS' marker"),
    ("reply from another unit", _other_unit, Fault.WRONG_UNIT, "another unit id"),
    ("accepts TCP, never answers", _silent, Fault.TIMEOUT, "no reply within 150 ms"),
    ("NaN value", _memory(_rows_with(**{f"{V}__SoCFrac": float("nan")})), Fault.BAD_VALUE, "soc = nan"),
    ("out-of-range value", _memory(_rows_with(**{f"{V}__SoCFrac": 1.5})), Fault.BAD_VALUE, "soc = 1.5"),
    ("negative demand", _memory(_rows_with(**{f"{V}__DemandW": -5.0})), Fault.BAD_VALUE, "demand_w = -5.0"),
]


@pytest.mark.parametrize("name, reply, fault, reason", BAD, ids=[b[0] for b in BAD])
def test_each_bad_input_faults_only_its_node(name, reply, fault, reason):
    async def body():
        async with serving() as agents, raw_server(reply) as bad_port:
            p = poller([endpoint(agents.ports[0], "good"), endpoint(bad_port, "bad")], poll_ms=50, timeout_ms=150)
            await poll_for(p, 0.8)
            st = staging(2)
            p.fill(st)
            _, faults, reasons = p.decode()
            assert st["fault"][0] == 0 and st["updated_ns"][0] > 0, reasons[0]
            assert st["fault"][1] == fault, reasons[1]
            assert reason in reasons[1]
            assert st["updated_ns"][1] == 0  # never fresh: the scan counts it offline
            assert st["io_errors"][1] >= 1
            # the good node kept its pace (~16 polls in 0.8 s at 50 ms) despite its neighbour
            assert st["io_requests"][0] >= 8
            await p.close()

    run(body())


def test_wrong_unit_id_and_refused_connection():
    async def body():
        async with serving() as agents:
            p = poller([endpoint(agents.ports[0], "ok"), endpoint(agents.ports[0], "unit5", unit=5),
                        endpoint(free_port(), "nobody")])
            await poll_for(p, 0.4)
            _, faults, reasons = p.decode()
            assert faults.tolist() == [0, Fault.WRONG_UNIT, Fault.CONNECTION], reasons
            assert "no device at unit id 5" in reasons[1] and "cannot connect" in reasons[2]
            await p.close()

    run(body())


def test_a_node_that_dies_goes_faulty_and_rejoins_after_restart():
    fleet = fleet_of()

    async def body():
        async with serving(fleet) as agents:
            port = agents.ports[1]
            p = poller([endpoint(agents.ports[0], "A"), endpoint(port, "B")], poll_ms=50)
            stop = asyncio.Event()
            tasks = [asyncio.create_task(p.device_task(i, stop)) for i in range(2)]
            await asyncio.sleep(0.3)
            assert p.decode()[1].tolist() == [0, 0]
            await agents.servers[1].shutdown()  # B's agent dies
            await asyncio.sleep(0.3)
            assert p.decode()[1].tolist() == [0, Fault.CONNECTION]
            # B comes back on the same port
            from vbatt.drivers.node.agent import AgentSet, AgentSpec

            again = AgentSet(SimBackend(fleet, 1, 2), [AgentSpec("B", "127.0.0.1", port)])
            await again.start()
            await asyncio.sleep(0.6)
            assert p.decode()[1].tolist() == [0, 0]
            stop.set()
            await asyncio.gather(*tasks)
            await again.stop()
            await p.close()

    run(body())
