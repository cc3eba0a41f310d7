"""Modbus TCP / SunSpec: the driver, its configuration, the register map and codec."""
