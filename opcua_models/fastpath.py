"""The hot path from a changed value to the subscribed clients, without asyncua's per-item overheads.

Measured per value and monitored item (benchmarks/bench_opcua.py, docs/opcua.md),
stock asyncua spends its time in four places; each is replaced here by code
that produces the same result on the wire:

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
   `notify()` is only called for a changed value or status, so it enqueues the
   notification directly for items without a deadband (items with a deadband or
   a status-only trigger take the stock path).
4. The generic dataclass encoder walks type hints per field; the encoder of
   `MonitoredItemNotification` is replaced by one for scalar DataValues
   (any other content falls back to the stock encoder).
"""

from __future__ import annotations

import copy
import datetime as _dt
import struct

from asyncua import ua
from asyncua.server import monitored_item_service as _mis
from asyncua.ua import ua_binary as _ub
from asyncua.ua.uatypes import datetime_to_win_epoch

__all__ = ["install", "uninstall", "installed", "data_value", "notify", "encode_notification"]

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
    if isinstance(flt, ua.ExtensionObject):  # a null filter, as node-opcua sends by default
        return flt.Body is None
    return isinstance(flt, ua.DataChangeFilter) and flt.DeadbandType == 0 and flt.Trigger != _STATUS_ONLY


async def notify(callbacks: dict, dv: ua.DataValue) -> None:
    """Deliver a changed value to every monitored item registered on one attribute."""
    for handle, cb in list(callbacks.items()):
        svc = getattr(cb, "__self__", None)
        if getattr(cb, "__func__", None) is not _stock_callback or not isinstance(svc, _mis.MonitoredItemService):
            await cb(handle, dv)
            continue
        mid = svc._monitored_datachange.get(handle)
        mdata = svc._monitored_items.get(mid) if mid is not None else None
        if mdata is None or mdata.mode == _DISABLED:
            continue
        flt = mdata.filter
        if flt is not None and not _plain(flt):  # deadband or status-only trigger: the stock comparison decides
            await cb(handle, dv)
            continue
        mv = mdata.mvalue
        mv.old_dvalue, mv.current_dvalue = mv.current_dvalue, dv
        ev = _new(_Notification)
        ev.ClientHandle, ev.Value = mdata.client_handle, dv
        # InternalSubscription._enqueue_event, without two coroutine layers per item
        isub = svc.isub
        queue = isub._triggered_datachanges
        items = queue.get(mid)
        if items is None:
            queue[mid] = [ev]
            await isub._trigger_publish()
        else:
            size = mdata.queue_size
            if size and len(items) >= size:
                items.pop(0)
            items.append(ev)


# -- 4. encoding -------------------------------------------------------------------------------------------
_U32 = struct.Struct("<I").pack
_HEAD = struct.Struct("<IBB").pack  # ClientHandle, DataValue mask, Variant type
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


def _make_encoder(stock):
    def encode(obj) -> bytes:
        dv = obj.Value
        v = dv.Value if dv is not None else None
        if (v is None or v.is_array or v.Dimensions is not None or dv.SourcePicoseconds is not None
                or dv.ServerPicoseconds is not None or type(dv) is not _DataValue):
            return stock(obj)
        vt = v.VariantType
        pack = _SCALAR.get(vt)
        if pack is not None:
            body = pack(v.Value)
        elif vt is _STRING and isinstance(v.Value, str):
            raw = v.Value.encode("utf-8")
            body = _U32(len(raw)) + raw
        else:
            return stock(obj)
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
        return _HEAD(obj.ClientHandle, mask, vt.value) + body + tail
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
    if _ub.create_dataclass_serializer is _stock_create:
        import functools

        _ub.create_dataclass_serializer = functools.cache(_create_dataclass_serializer)
        _clear_serializer_caches()


def uninstall() -> None:
    _mis.MonitoredItemValues.set_current_datavalue = _stock_set
    if _ub.create_dataclass_serializer is not _stock_create:
        _ub.create_dataclass_serializer = _stock_create
        _clear_serializer_caches()


def installed() -> bool:
    return _mis.MonitoredItemValues.set_current_datavalue is _set_current_datavalue
