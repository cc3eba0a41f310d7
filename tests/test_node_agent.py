"""The node agent on real Modbus TCP (127.0.0.1): a SunSpec reader's view, instructions, leases, bad writes."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pymodbus.client import AsyncModbusTcpClient

from test_modbus_support import M, V, FakeNs, fleet_of, instruction_words, point, serving
from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.node.backends.sysfs import SysfsBackend
from vbatt.drivers.node.agent import AgentSet, AgentSpec

REPO = Path(__file__).resolve().parents[1]


def run(coro):
    return asyncio.run(coro)


async def client(port: int) -> AsyncModbusTcpClient:
    c = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0, reconnect_delay=0)
    assert await c.connect()
    return c


async def read(c, addr: int, count: int, unit: int = 1) -> list[int]:
    r = await c.read_holding_registers(addr, count=count, device_id=unit)
    assert not r.isError(), r
    return r.registers


def test_a_sunspec_reader_walks_the_models_and_reads_the_battery():
    async def body():
        async with serving() as agents:
            c = await client(agents.ports[1])
            try:
                assert await read(c, 40000, 2) == [0x5375, 0x6E53]  # 'SunS'
                addr, chain = 40002, []
                while True:
                    mid, length = await read(c, addr, 2)
                    if mid == 0xFFFF:
                        assert length == 0
                        break
                    chain.append((mid, addr, length))
                    addr += 2 + length
                assert [(m, a) for m, a, _ in chain] == [(1, 40002), (802, 40070), (V, 40134)]
                common = await read(c, 40004, 66)
                assert ss.decode_string(common[0:16]) == "vbatt"
                assert ss.decode_string(common[48:64]) == "B"  # serial number = node id
                bat = await read(c, 40072, 62)
                sf = lambda off: bat[off] - 0x10000 if bat[off] >= 0x8000 else bat[off]  # noqa: E731
                assert bat[9] * 10.0 ** sf(54) == pytest.approx(60.0, abs=0.01)  # SoC % with SoC_SF
                assert bat[1] * 10.0 ** sf(51) == 1000  # WHRtg
                assert bat[3] * 10.0 ** sf(52) == 150  # WDisChaRteMax
                assert bat[32] * 10.0 ** sf(57) == pytest.approx(48.0)  # V (ideal battery: 48 V)
                assert bat[11] * 10.0 ** sf(56) == pytest.approx(100.0)  # SoH %
                vend = await read(c, 40136, 40)
                assert point(vend, 40136, V, "DemandW") == 50.0
                assert point(vend, 40136, V, "Mode", True) == ss.Mode.WAITING
            finally:
                c.close()

    run(body())


def test_instruction_written_applied_and_acknowledged_in_one_transaction():
    async def body():
        async with serving() as agents:
            c = await client(agents.ports[0])
            try:
                a, words = instruction_words(seq=42, lease_ms=2000, battery_w=100.0, bus_w=100.0, served_w=200.0)
                r = await c.readwrite_registers(read_address=40070, read_count=106, write_address=a, values=words,
                                                device_id=1)
                assert not r.isError()
                assert point(r.registers, 40070, V, "AckSeq", True) == 42
                assert point(r.registers, 40070, V, "Mode", True) == ss.Mode.CONTROLLED
                assert 0 < point(r.registers, 40070, V, "LeaseLeftMs", True) <= 2000
                agents.tick()  # the agent applies it to its battery
                vend = await read(c, 40136, 40)
                assert point(vend, 40136, V, "AppliedW") == 100.0
                assert agents.backend.sim.current_a[0] == pytest.approx(100.0 / 48.0)
                bat = await read(c, 40072, 62)
                assert bat[15] == 1  # LocRemCtl: remote
            finally:
                c.close()

    run(body())


def test_lease_expiry_makes_the_node_autonomous_and_a_new_instruction_takes_it_back(caplog):
    clock = FakeNs()

    async def body():
        async with serving(clock_ns=clock) as agents:
            c = await client(agents.ports[0])
            try:
                a, words = instruction_words(seq=7, lease_ms=500, battery_w=-50.0, bus_w=-250.0)
                assert not (await c.write_registers(a, words, device_id=1)).isError()
                clock.advance_ms(400)
                agents.tick()
                assert agents.mode[0] == ss.Mode.CONTROLLED and agents.applied_w[0] == -50.0
                clock.advance_ms(200)  # 600 ms > 500 ms lease, no renewal
                with caplog.at_level(logging.WARNING, logger="vbatt.node"):
                    agents.tick()
                vend = await read(c, 40136, 40)
                assert point(vend, 40136, V, "Mode", True) == ss.Mode.AUTONOMOUS
                assert point(vend, 40136, V, "Expiries", True) == 1
                assert point(vend, 40136, V, "Alm", True) & ss.Alarm.LEASE_EXPIRED
                # own battery for own load (200 W demand, 100 W allowed), nothing to the bus
                assert point(vend, 40136, V, "AppliedW") == 100.0
                assert "ran out without renewal" in caplog.text and "node A" in caplog.text
                a, words = instruction_words(seq=8, lease_ms=500, battery_w=80.0)
                assert not (await c.write_registers(a, words, device_id=1)).isError()
                agents.tick()
                assert agents.mode[0] == ss.Mode.CONTROLLED and agents.applied_w[0] == 80.0
                assert not agents.alarm[0] & ss.Alarm.LEASE_EXPIRED
            finally:
                c.close()

    run(body())


def test_bad_writes_are_refused_and_change_nothing():
    async def body():
        async with serving() as agents:
            c = await client(agents.ports[0])
            try:
                a, words = instruction_words(seq=5, lease_ms=1000, battery_w=60.0)
                assert not (await c.write_registers(a, words, device_id=1)).isError()
                a, nan_words = instruction_words(seq=6, lease_ms=1000, battery_w=float("nan"))
                r = await c.write_registers(a, nan_words, device_id=1)
                assert r.isError() and r.exception_code == 3  # ILLEGAL DATA VALUE
                a, zero_lease = instruction_words(seq=6, lease_ms=0, battery_w=10.0)
                assert (await c.write_registers(a, zero_lease, device_id=1)).isError()
                r = await c.write_registers(a, words[:2], device_id=1)  # the sequence number alone
                assert r.isError() and r.exception_code == 3
                r = await c.write_registers(M.at(802, "SoC").addr, [1], device_id=1)  # a measured value
                assert r.isError() and r.exception_code == 2  # ILLEGAL DATA ADDRESS
                assert agents.seq[0] == 5 and agents.cmd["battery_w"][0] == 60.0
                vend = await read(c, 40136, 40)
                assert point(vend, 40136, V, "AckSeq", True) == 5
                assert point(vend, 40136, V, "Alm", True) & ss.Alarm.BAD_INSTRUCTION
                r = await c.read_holding_registers(40000, count=2, device_id=9)  # nobody at unit 9
                assert r.isError() and r.exception_code == 0x0B
                r = await c.read_holding_registers(30000, count=2, device_id=1)  # outside the map
                assert r.isError() and r.exception_code == 2
            finally:
                c.close()

    run(body())


def _power_supply(d: Path, **files: str) -> Path:
    d.mkdir(parents=True)
    base = {"type": "Battery", "status": "Discharging", "capacity": "73", "voltage_now": "12400000",
            "current_now": "1500000", "energy_full": "50000000", "temp": "312"}
    for k, v in {**base, **files}.items():
        (d / k).write_text(v + "\n")
    return d


def test_sysfs_backend_reads_a_power_supply_directory(tmp_path):
    d = _power_supply(tmp_path / "BAT0")
    be = SysfsBackend(str(d), demand_w=20.0, max_discharge_w=40.0, max_charge_w=30.0, link_max_w=0.0)
    o = be.offer
    assert o["soc"][0] == pytest.approx(0.73) and o["voltage_v"][0] == pytest.approx(12.4)
    assert o["current_a"][0] == pytest.approx(1.5) and o["capacity_wh"][0] == pytest.approx(50.0)
    assert o["temperature_c"][0] == pytest.approx(31.2) and o["demand_w"][0] == 20.0
    (d / "status").write_text("Charging\n")
    be.step(1.0, 1.0, np.zeros(1))
    assert o["current_a"][0] == pytest.approx(-1.5)

    async def body():  # served: a controller reads it like any node; a vanished battery reads as NaN
        async with serving(backend=be) as agents:
            c = await client(agents.ports[0])
            try:
                vend = await read(c, 40136, 40)
                assert point(vend, 40136, V, "SoCFrac") == pytest.approx(0.73)
                (d / "capacity").unlink()
                agents.tick()
                vend = await read(c, 40136, 40)
                assert np.isnan(point(vend, 40136, V, "SoCFrac"))
                assert point(vend, 40136, V, "Alm", True) & ss.Alarm.BACKEND
            finally:
                c.close()

    run(body())
    with pytest.raises(Exception, match="type is 'Mains'"):
        from vbatt.drivers.node.backends.sysfs import read_power_supply

        read_power_supply(_power_supply(tmp_path / "AC", type="Mains"))


def test_vbatt_node_command_serves_and_stops_on_sigterm(tmp_path):
    ready = tmp_path / "ready"
    cfg = tmp_path / "node.yaml"
    cfg.write_text("id: rack-7\nport: 0\nplaintext: true\ntick_ms: 50\n"
                   "backend: {kind: sim, demand_w: 120, max_discharge_w: 300, capacity_wh: 500, soc: 0.9}\n")
    proc = subprocess.Popen([sys.executable, "-m", "vbatt.cli", "node", str(cfg), "--ready-file", str(ready)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.communicate(timeout=5)
        port = int(ready.read_text())

        async def body():
            c = await client(port)
            try:
                common = await read(c, 40004, 66)
                assert ss.decode_string(common[48:64]) == "rack-7"
                vend = await read(c, 40136, 40)
                assert point(vend, 40136, V, "DemandW") == 120.0
            finally:
                c.close()

        run(body())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, errs = proc.communicate(timeout=10)
    assert proc.returncode == 0, errs


@pytest.mark.parametrize("text, expect", [
    ("id: x\nport: 0\nbackend: {kind: sim}\n", "either 'tls: {ca, cert, key}'"),
    ("id: x\nport: 0\nplaintext: true\nbackend: {kind: sim, soc: 2}\n", "backend.soc"),
    ("id: x\nport: 0\nplaintext: true\nbackend: {kind: nut}\n", "backend.ups"),
    ("id: x\nport: 0\nplaintext: true\nbogus: 1\nbackend: {kind: sim}\n", "bogus: unknown key"),
])
def test_vbatt_node_bad_config_exit_2_with_the_reason(tmp_path, text, expect):
    cfg = tmp_path / "node.yaml"
    cfg.write_text(text)
    r = subprocess.run([sys.executable, "-m", "vbatt.cli", "node", str(cfg)], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert expect in r.stderr
