"""Remove asyncua's deepcopy per monitored item for immutable values.

`MonitoredItemValues.set_current_datavalue` deep-copies every DataValue handed
to every monitored item, "to prevent referencing the inner value". That guards
against a writer mutating a value object after writing it. For scalar payloads
(numbers, booleans, strings, bytes, datetimes, None) the Variant's value cannot
be mutated, and the vbatt updater builds a fresh DataValue for every write and
never touches it again; so sharing the object is exactly as safe as copying it.
Arrays and structures (lists, ExtensionObjects) are still copied, so other
writers keep the stock guarantee. `benchmarks/bench_opcua.py` measures both.
"""

from __future__ import annotations

import copy
import datetime as _dt

from asyncua.server import monitored_item_service as _mis

__all__ = ["install", "uninstall", "installed"]

_IMMUTABLE = (int, float, bool, str, bytes, type(None), _dt.datetime)
_stock = _mis.MonitoredItemValues.set_current_datavalue


def _set_current_datavalue(self, cur_val):
    self.old_dvalue = self.current_dvalue
    v = cur_val.Value
    if v is None or isinstance(v.Value, _IMMUTABLE):
        self.current_dvalue = cur_val
    else:
        self.current_dvalue = copy.deepcopy(cur_val)


def install() -> None:
    _mis.MonitoredItemValues.set_current_datavalue = _set_current_datavalue


def uninstall() -> None:
    _mis.MonitoredItemValues.set_current_datavalue = _stock


def installed() -> bool:
    return _mis.MonitoredItemValues.set_current_datavalue is _set_current_datavalue
