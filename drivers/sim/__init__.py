"""Simulated nodes: battery physics and demand profiles, in-process."""

from vbatt.drivers.registry import DriverSpec
from vbatt.drivers.sim.config import SimDriverConfig, SimNodeConfig

SPEC = DriverSpec(driver="vbatt.drivers.sim.driver:SimDriver", config=SimDriverConfig, node=SimNodeConfig,
                  template=True)
