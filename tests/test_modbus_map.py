"""A device without SunSpec, read and instructed through an explicit register map from YAML."""

from __future__ import annotations

import asyncio
import struct

import numpy as np
import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from test_modbus_support import poll_for, poller
from vbatt.config.plant import ConfigError, load_config_text
from vbatt.drivers.modbus.config import modbus_endpoints

PLANT = """
drivers: {{modbus: {{plaintext: true}}}}
nodes:
  - id: plain-bms
    driver: modbus
    port: {port}
    registers:
      soc: {{address: 100, type: uint16, scale: 0.001}}
      voltage_v: {{address: 101, type: uint16, scale: 0.01}}
      current_a: {{address: 102, type: int16, scale: 0.1}}
      max_discharge_w: {{address: 103}}
      capacity_wh: {{address: 104, type: uint32}}
      demand_w: {{address: 110, type: float32}}
      battery_w: {{address: 200, type: int16}}
"""


def _words(fmt: str, v) -> list[int]:
    raw = struct.pack(fmt, v)
    return [int.from_bytes(raw[k:k + 2], "big") for k in range(0, len(raw), 2)]


def test_explicit_map_reads_scaled_values_and_writes_the_instruction():
    async def body():
        regs = [0] * 16
        regs[0], regs[1], regs[2], regs[3] = 734, 5120, _words(">h", -25)[0], 900
        regs[4:6] = _words(">I", 70000)
        regs[10:12] = _words(">f", 321.5)
        dev = SimDevice(id=1, simdata=[SimData(100, values=regs, datatype=DataType.REGISTERS),
                                       SimData(200, values=[0], datatype=DataType.REGISTERS)])
        srv = ModbusTcpServer(dev, address=("127.0.0.1", 0))
        await srv.serve_forever(background=True)
        port = srv.transport.sockets[0].getsockname()[1]
        try:
            cfg, fleet = load_config_text(PLANT.format(port=port))
            ep = modbus_endpoints(cfg, fleet)[0]
            p = poller([ep])
            p.set_instruction(3, {"battery_w": np.array([-150.0]), "bus_w": np.zeros(1), "served_w": np.zeros(1),
                                  "shed_w": np.zeros(1)})
            await poll_for(p, 0.3)
            vals, faults, reasons = p.decode()
            assert faults[0] == 0, reasons
            assert vals["soc"][0] == pytest.approx(0.734)
            assert vals["voltage_v"][0] == pytest.approx(51.2)
            assert vals["current_a"][0] == pytest.approx(-2.5)
            assert vals["max_discharge_w"][0] == 900 and vals["capacity_wh"][0] == 70000
            assert vals["demand_w"][0] == 321.5
            assert vals["temperature_c"][0] == 25.0 and vals["link_max_w"][0] == 0.0  # not mapped
            got = srv.context.devices[1].block["x"][2]
            assert struct.unpack(">h", got[100].to_bytes(2, "big"))[0] == -150  # register 200
            await p.close()
        finally:
            await srv.shutdown()

    asyncio.run(body())


@pytest.mark.parametrize("registers, expect", [
    ("{soc: {address: 1}, voltage_v: {address: 1}}", "voltage_v at 1 overlaps soc"),
    ("{soc: {address: 1, type: uint32}, demand_w: {address: 2}}", "demand_w at 2 overlaps soc (1..2)"),
    ("{voltage_v: {address: 1}}", "'soc' is required"),
    ("{soc: {address: 1}, colour: {address: 5}}", "unknown field(s) ['colour']"),
    ("{soc: {address: 1, type: int8}}", "registers.soc.type"),
])
def test_explicit_map_errors(registers, expect):
    with pytest.raises(ConfigError) as exc:
        load_config_text("drivers: {modbus: {plaintext: true}}\n"
                         f"nodes:\n  - {{id: x, driver: modbus, registers: {registers}}}\n")
    assert expect in str(exc.value)
