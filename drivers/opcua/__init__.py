"""OPC UA client driver: nodes that are OPC UA servers."""

from vbatt.drivers.opcua.config import OpcuaClientDriverConfig, OpcuaNodeConfig
from vbatt.drivers.registry import DriverSpec

SPEC = DriverSpec(driver="vbatt.drivers.opcua.driver:OpcuaClientDriver", config=OpcuaClientDriverConfig,
                  node=OpcuaNodeConfig)
