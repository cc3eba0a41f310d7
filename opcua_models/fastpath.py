"""The hot path from a changed value to the subscribed clients, without asyncua's per-item overheads.

Measured per value and monitored item (benchmarks/bench_opcua.py, docs/opcua.md),
stock asyncua spends its time in four places; each is replaced here by code
whose bytes decode to the same notifications (one deliberate difference: a Good
status is left out of a DataValue, as its encoding mask allows; 4 bytes fewer):

1. `MonitoredItemValues.set_current_datavalue` deep-copies every DataValue for
   every monitored item "to prevent referencing the inner value". For scalar
   payloads (numbers, booleans, strings, bytes, datetimes) the value cannot be
   mutated, and the updater builds a fresh DataValue per write and never touches
   it again, so sharing it is as safe as copying. Arrays and structures are
   still deep-copied (other writers keep the stock guarantee).
2. `Variant`/`DataValue` constructors guess and check the type on every call;
   `data_value()` builds them with the type the model already knows.
3. `MonitoredItemService.datachange_callback` builds a default notification
   (with its own default DataValue and Variant) and compares old and new values;
   `write_values()`/`deliver()` are only called for a changed value or status, so
   they queue the notification directly, already encoded, for items without a
   deadband (items with a deadband or a status-only trigger take the stock path).
4. The generic dataclass encoder walks type hints per field; the encoder of
   `MonitoredItemNotification` is replaced by one for scalar DataValues
   (any other content falls back to the stock encoder).
"""

from __future__ import annotations

import copy
import datetime as _dt
import struct

from asyncua import ua
from asyncua.server import address_space as _asp
from asyncua.server import monitored_item_service as _mis
from asyncua.ua import ua_binary as _ub
from asyncua.ua.uatypes import datetime_to_win_epoch

__all__ = ["install", "uninstall", "installed", "data_value", "deliver", "write_values", "flush", "wire", "encode_notification"]

_IMMUTABLE = (int, float, bool, str, bytes, type(None), _dt.datetime)
_stock_set = _mis.MonitoredItemValues.set_current_datavalue
_stock_callback = _mis.MonitoredItemService.datachange_callback
_stock_create = _ub.create_dataclass_serializer
_DISABLED = ua.MonitoringMode.Disabled


def _set_current_datavalue(self, cur_val):
    self.old_dvalue = self.current_dvalue
    v = cur_val.Value
    if v is None or isinstance(v.Value, _IMMUTABLE):
        self.current_dvalue = cur_val
    else:
        self.current_dvalue = copy.deepcopy(cur_val)


# -- 2. values --------------------------------------------------------------------------------------
_new = object.__new__
_Variant, _DataValue, _Notification = ua.Variant, ua.DataValue, ua.MonitoredItemNotification


def data_value(value, vtype: ua.VariantType, status: ua.StatusCode, source: _dt.datetime,
               server: _dt.datetime) -> ua.DataValue:
    """A scalar DataValue of a known type, built without the constructors' type guessing."""
    v = _new(_Variant)
    v.Value, v.VariantType, v.Dimensions, v.is_array = value, vtype, None, False
    dv = _new(_DataValue)
    dv.Encoding, dv.Value, dv.StatusCode = 0, v, status
    dv.SourceTimestamp, dv.ServerTimestamp, dv.SourcePicoseconds, dv.ServerPicoseconds = source, server, None, None
    return dv


# -- 3. notification ------------------------------------------------------------------------------------
_STATUS_ONLY = ua.DataChangeTrigger.Status


def _plain(flt) -> bool:
    """A filter that passes every change of value or status (what most clients send by default)."""
    if flt is None:
        return True
    if isinstance(flt, ua.ExtensionObject):  # a null filter, as node-opcua sends by default
        return flt.Body is None
    return isinstance(flt, ua.DataChangeFilter) and flt.DeadbandType == 0 and flt.Trigger != _STATUS_ONLY


# The monitored items behind one attribute's callbacks, resolved once and kept until a data change
# callback of that attribute is added or deleted: resolving them per value (bound method checks,
# two dict lookups, the filter test) was most of the server's time with 3 clients.
_generation = [0]  # bumped by uninstall(): everything is resolved again
_sinks: dict[int, tuple] = {}  # id(callbacks dict) -> (callbacks dict, generation, fast sinks, stock callbacks)
_stock_add = _asp.AddressSpace.add_datachange_callback
_stock_delete = _asp.AddressSpace.delete_datachange_callback


def _forget(aspace, nodeid, attr) -> None:
    node = aspace._nodes.get(nodeid)
    av = node.attributes.get(attr) if node is not None else None
    if av is not None:
        _sinks.pop(id(av.datachange_callbacks), None)


def _add_datachange_callback(self, nodeid, attr, callback):
    _forget(self, nodeid, attr)
    return _stock_add(self, nodeid, attr, callback)


def _delete_datachange_callback(self, handle):
    where = self._handle_to_attribute_map.get(handle)
    if where is not None:
        _forget(self, *where)
    return _stock_delete(self, handle)


def _resolve(callbacks: dict) -> tuple:
    fast, stock = [], []
    for handle, cb in callbacks.items():
        svc = getattr(cb, "__self__", None)
        if getattr(cb, "__func__", None) is _stock_callback and isinstance(svc, _mis.MonitoredItemService):
            mid = svc._monitored_datachange.get(handle)
            mdata = svc._monitored_items.get(mid) if mid is not None else None
            if mdata is not None:
                fast.append((mdata, mdata.mvalue, mid, svc.isub, mdata.filter, _plain(mdata.filter), handle, cb))
                continue
        stock.append((handle, cb))
    entry = (callbacks, _generation[0], fast, stock)
    if len(_sinks) > 200_000:  # attributes come and go with the address space: keep the map bounded
        _sinks.clear()
    _sinks[id(callbacks)] = entry
    return entry


def deliver(callbacks: dict, dv: ua.DataValue, pending: dict, w: bytes | None = None) -> None:
    """Queue a changed value on every monitored item registered on one attribute, without awaiting.

    `pending` collects what must still be awaited (`flush`): the subscriptions to trigger, and the
    items the stock path must judge (deadband or status-only filters, foreign callbacks). `w` is
    dv's wire form when the caller has it (`write_values`)."""
    entry = _sinks.get(id(callbacks))
    if entry is None or entry[0] is not callbacks or entry[1] != _generation[0]:
        entry = _resolve(callbacks)
    for mdata, mv, mid, isub, flt, plain, handle, cb in entry[2]:
        if mdata.mode is _DISABLED:
            continue
        if not plain or mdata.filter is not flt:  # a deadband, or modified: the stock comparison decides
            pending.setdefault(None, []).append((handle, cb, dv))
            continue
        mv.old_dvalue, mv.current_dvalue = mv.current_dvalue, dv
        if w is None:
            w = wire(dv) or b""
        if w:  # the notification, encoded: the same bytes the encoder would make from the object
            ev = _U32(mdata.client_handle) + w
        else:
            ev = _new(_Notification)
            ev.ClientHandle, ev.Value = mdata.client_handle, dv
        queue = isub._triggered_datachanges  # replaced by every publish: look it up now
        items = queue.get(mid)
        if items is None:
            queue[mid] = [ev]
            pending[isub] = True
        else:
            size = mdata.queue_size
            if size and len(items) >= size:
                items.pop(0)
            items.append(ev)
    for handle, cb in entry[3]:
        pending.setdefault(None, []).append((handle, cb, dv))


def write_values(avs: list, idx: list, vals: list, vt: ua.VariantType, status: list | None,
                 good: ua.StatusCode, bad: ua.StatusCode, source: _dt.datetime, server: _dt.datetime,
                 pending: dict) -> None:
    """Write vals[k] into the attribute avs[idx[k]] and deliver it (status: per value, True = good).

    One field of one tick shares the type, the timestamps and (mostly) the status: the wire form is
    the value's bytes between a head and a tail made once, not a DataValue encoded per value."""
    pack = _SCALAR.get(vt)
    if pack is not None:  # mask: value, source and server timestamps (a Good status is not encoded)
        head, tail = _MASK_TYPE(0x0D, _VT_CODE[vt]), _ts(source) + _ts(server)
    code = good.value
    for k, i in enumerate(idx):
        val = vals[k]
        ok = status is None or status[k]
        dv = data_value(val, vt, good if ok else bad, source, server)
        av = avs[i]
        av.value = dv
        cbs = av.datachange_callbacks
        if not cbs:
            continue
        # A Good scalar: its notification bytes from the head and tail made once for the field.
        deliver(cbs, dv, pending, head + pack(val) + tail if pack is not None and ok and not code else None)


async def flush(pending: dict) -> None:
    """Await what `deliver` left: stock callbacks, then one publish trigger per subscription."""
    for handle, cb, dv in pending.pop(None, ()):
        await cb(handle, dv)
    for isub in pending:
        await isub._trigger_publish()
    pending.clear()


# -- 4. encoding -------------------------------------------------------------------------------------------
_U32 = struct.Struct("<I").pack
_MASK_TYPE = struct.Struct("<BB").pack  # DataValue mask, Variant type
_I64 = struct.Struct("<q").pack
_SCALAR = {
    ua.VariantType.Double: struct.Struct("<d").pack, ua.VariantType.Float: struct.Struct("<f").pack,
    ua.VariantType.Int64: struct.Struct("<q").pack, ua.VariantType.UInt64: struct.Struct("<Q").pack,
    ua.VariantType.Int32: struct.Struct("<i").pack, ua.VariantType.UInt32: struct.Struct("<I").pack,
    ua.VariantType.Boolean: struct.Struct("<?").pack,
}
_STRING = ua.VariantType.String
_ts_cache: list = [None, b"", None, b""]  # the last two timestamps: every value of one tick shares them


def _ts(t: _dt.datetime) -> bytes:
    c = _ts_cache
    if t is c[0]:
        return c[1]
    if t is c[2]:
        return c[3]
    b = _I64(datetime_to_win_epoch(t))
    c[2], c[3] = c[0], c[1]
    c[0], c[1] = t, b
    return b


_VT_CODE = {vt: vt.value for vt in ua.VariantType}  # Enum.value is a descriptor call: too slow per value


def wire(dv) -> bytes | None:
    """The binary DataValue of a scalar value (numbers, booleans, strings) with timestamps, or None
    for anything else (the stock encoder's business)."""
    v = dv.Value if dv is not None else None
    if (v is None or v.is_array or v.Dimensions is not None or dv.SourcePicoseconds is not None
            or dv.ServerPicoseconds is not None or type(dv) is not _DataValue):
        return None
    vt = v.VariantType
    pack = _SCALAR.get(vt)
    if pack is not None:
        body = pack(v.Value)
    elif vt is _STRING and isinstance(v.Value, str):
        raw = v.Value.encode("utf-8")
        body = _U32(len(raw)) + raw
    else:
        return None
    mask = 0x01
    tail = b""
    sc = dv.StatusCode
    if sc is not None and sc.value:
        mask |= 0x02
        tail += _U32(sc.value)
    if dv.SourceTimestamp is not None:
        mask |= 0x04
        tail += _ts(dv.SourceTimestamp)
    if dv.ServerTimestamp is not None:
        mask |= 0x08
        tail += _ts(dv.ServerTimestamp)
    return _MASK_TYPE(mask, _VT_CODE[vt]) + body + tail


def _make_encoder(stock):
    def encode(obj) -> bytes:
        if type(obj) is bytes:  # queued by deliver(), encoded once for every client
            return obj
        w = wire(obj.Value)
        return stock(obj) if w is None else _U32(obj.ClientHandle) + w
    return encode


def encode_notification(obj) -> bytes:
    return _make_encoder(_stock_create(_Notification))(obj)


def _create_dataclass_serializer(clazz):
    stock = _stock_create(clazz)
    return _make_encoder(stock) if clazz is _Notification else stock


def _clear_serializer_caches() -> None:
    for name in ("create_type_serializer", "create_list_serializer", "field_serializer"):
        fn = getattr(_ub, name, None)
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


# -- switch ------------------------------------------------------------------------------------------------------
def install() -> None:
    _mis.MonitoredItemValues.set_current_datavalue = _set_current_datavalue
    _asp.AddressSpace.add_datachange_callback = _add_datachange_callback
    _asp.AddressSpace.delete_datachange_callback = _delete_datachange_callback
    if _ub.create_dataclass_serializer is _stock_create:
        import functools

        _ub.create_dataclass_serializer = functools.cache(_create_dataclass_serializer)
        _clear_serializer_caches()


def uninstall() -> None:
    _mis.MonitoredItemValues.set_current_datavalue = _stock_set
    _asp.AddressSpace.add_datachange_callback = _stock_add
    _asp.AddressSpace.delete_datachange_callback = _stock_delete
    _generation[0] += 1
    if _ub.create_dataclass_serializer is not _stock_create:
        _ub.create_dataclass_serializer = _stock_create
        _clear_serializer_caches()


def installed() -> bool:
    return _mis.MonitoredItemValues.set_current_datavalue is _set_current_datavalue
