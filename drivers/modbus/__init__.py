"""Modbus TCP / SunSpec: the driver, its configuration, the register map and codec."""

from vbatt.drivers.modbus.config import ModbusDriverConfig, ModbusNodeConfig, modbus_endpoints
from vbatt.drivers.registry import DriverSpec


def _check(cfg, fleet) -> None:
    modbus_endpoints(cfg, fleet)  # raises ValueError on a port clash or overflow


# a template with `driver: modbus` is served by the embedded fleet and polled over Modbus
SPEC = DriverSpec(driver="vbatt.drivers.modbus.driver:ModbusDriver", config=ModbusDriverConfig,
                  node=ModbusNodeConfig, check=_check, template=True)
