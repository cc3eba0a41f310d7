"""Driver fault codes, written per node into the `fault` input field (0 = healthy).

A node with a fault is offline for protection and allocation; the code says why.
"""

from __future__ import annotations

import enum

__all__ = ["Fault"]


class Fault(enum.IntEnum):
    NONE = 0
    NO_DATA = 1  # never heard from
    TIMEOUT = 2  # no reply within the timeout
    CONNECTION = 3  # refused, reset, unreachable
    EXCEPTION_REPLY = 4  # the device refused a request (Modbus exception reply, OPC UA Bad status on a write)
    GARBLED = 5  # short or malformed frame
    BAD_VALUE = 6  # NaN or out-of-range register value
    NO_SUNSPEC = 7  # 'SunS' marker missing or model chain broken
    WRONG_UNIT = 8  # reply from another unit id
    TLS = 9  # certificate missing, wrong or untrusted
    SIMULATED = 10  # a fault injected in the simulation
    DRIVER_FAILED = 11  # the driver process died
