"""Trips, health alarms and the watchdog as OPC UA alarm conditions (Part 9).

One condition per node and code (``<node id>.trip.<NAME>``, ``<node id>.alarm.<NAME>``)
plus ``VirtualBattery.watchdog`` and, per priority class of the energy program,
``VirtualBattery.Classes.Class_<p>.RIDE_THROUGH_SHORT`` (its message names the class and the
time it can reach: "class 1: 1,240 s of 1,800 s"), and ``VirtualBattery.tree.TREE_FALLBACK`` while
the aggregate `tree_state` is 2 (a controller in a tree whose parent stopped renewing its levels),
each created the first time it becomes active. Trips
are TripAlarmType, health alarms OffNormalAlarmType, the watchdog
SystemOffNormalAlarmType; every state change is an event from the Server object
with severity, source node, message, ActiveState and AckedState. A condition is
retained while it is active or unacknowledged, so ConditionRefresh (asyncua's,
bound at start) replays exactly those to a client that connects later.
Acknowledge (the standard method on the condition) pushes Op.ACK_ALARM for
health alarms; trips are cleared by ResetTrip, not by acknowledging them.
"""

from __future__ import annotations

import copy
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import numpy as np
from asyncua import ua
from asyncua.common import events
from asyncua.common.node import Node
from asyncua.server.address_space import AttributeValue, NodeData

from vbatt.opcua_models.model import VB_ID

__all__ = ["Alarms", "Condition", "code_tables"]

log = logging.getLogger("vbatt.opcua.alarms")
_A = ua.AttributeIds


@dataclass(frozen=True)
class _Code:
    bit: int
    name: str
    severity: int
    text: str


def code_tables() -> tuple[tuple[_Code, ...], tuple[_Code, ...]]:
    """(trip codes, alarm codes) from programs/codes.py; generic bits if that table is missing."""
    try:
        from vbatt.programs.codes import ALARM_CODES, TRIP_CODES
    except ImportError:  # pragma: no cover - the table ships with vbatt
        gen = lambda kind, sev: tuple(_Code(b, f"{kind}_BIT_{b}", sev, f"{kind} bit {b}") for b in range(32))  # noqa: E731
        return gen("TRIP", 800), gen("ALARM", 500)
    conv = lambda t: tuple(_Code(c.bit, c.name, c.severity, c.text) for c in t)  # noqa: E731
    return conv(TRIP_CODES), conv(ALARM_CODES)


@dataclass
class Condition:
    nodeid: ua.NodeId
    kind: str  # "trip" | "alarm" | "watchdog" | "class" | "tree"
    node: int  # node index, -1 for the virtual battery
    code: _Code
    event: object
    active: bool = False
    acked: bool = True


_TYPES = {"trip": ua.ObjectIds.TripAlarmType, "alarm": ua.ObjectIds.OffNormalAlarmType,
          "watchdog": ua.ObjectIds.SystemOffNormalAlarmType, "class": ua.ObjectIds.OffNormalAlarmType,
          "tree": ua.ObjectIds.OffNormalAlarmType}
_WATCHDOG = _Code(0, "WATCHDOG", 900, "Scan watchdog: consecutive overruns; outputs held in the safe state until RUN")


class Alarms:
    def __init__(self, isession, ns: int, node_ids, node_objects: list[ua.NodeId], vb: ua.NodeId,
                 on_ack: Callable[[int, int], None]):
        self.isession = isession
        self.aspace = isession.aspace
        self.ns = ns
        self.node_ids = list(node_ids)
        self.node_objects = node_objects
        self.vb = vb
        self.on_ack = on_ack  # (node index, alarm bits) -> push Op.ACK_ALARM
        self.trip_codes, self.alarm_codes = code_tables()
        self.templates: dict[str, object] = {}
        self.conditions: dict[tuple[str, int, int], Condition] = {}
        self.by_id: dict[ua.NodeId, Condition] = {}
        n = len(self.node_ids)
        self.last_trip = np.zeros(n, np.uint32)
        self.last_alarm = np.zeros(n, np.uint32)
        self.last_watchdog = False
        short = [c for c in self.alarm_codes if c.name == "RIDE_THROUGH_SHORT"]
        self.short = short[0] if short else _Code(13, "RIDE_THROUGH_SHORT", 700, "ride-through target unreachable")
        fb = [c for c in self.alarm_codes if c.name == "TREE_FALLBACK"]
        self.fallback = fb[0] if fb else _Code(14, "TREE_FALLBACK", 700, "parent stopped renewing: own main limit")
        self.last_fallback = False

    async def init(self) -> None:
        for kind, tid in _TYPES.items():
            ev = await events.get_event_obj_from_type_node(Node(self.isession, ua.NodeId(tid)))
            ev.add_property("NodeId", None, ua.VariantType.NodeId)  # the ConditionId
            ev.emitting_node = ua.NodeId(ua.ObjectIds.Server)
            self.templates[kind] = ev
        self.aspace.add_method_callback(ua.NodeId(ua.ObjectIds.AcknowledgeableConditionType_Acknowledge),
                                        self._acknowledge)
        server = self.aspace[ua.NodeId(ua.ObjectIds.Server)]
        server.attributes[_A.EventNotifier] = AttributeValue(ua.DataValue(
            ua.Variant(1 << ua.EventNotifier.SubscribeToEvents, ua.VariantType.Byte)))

    # -- from the image --------------------------------------------------------------------------
    async def update(self, trip: np.ndarray, alarm: np.ndarray) -> int:
        """Raise and clear conditions from the published bits; returns the number of events sent."""
        sent = 0
        for kind, new, last, table in (("trip", trip, self.last_trip, self.trip_codes),
                                       ("alarm", alarm, self.last_alarm, self.alarm_codes)):
            for i in np.flatnonzero(new != last).tolist():
                was, now = int(last[i]), int(new[i])
                for c in table:
                    m = 1 << c.bit
                    if (was ^ now) & m:
                        sent += await self._set(kind, i, c, bool(now & m))
            last[:] = new
        return sent

    async def watchdog(self, tripped: bool) -> int:
        """The scan's watchdog (a control word, not a published field): checked every tick."""
        if tripped == self.last_watchdog:
            return 0
        self.last_watchdog = tripped
        return await self._set("watchdog", -1, _WATCHDOG, tripped)

    async def tree_fallback(self, active: bool) -> int:
        """The aggregate tree_state (2 = fallback), a condition of the virtual battery."""
        if active == self.last_fallback:
            return 0
        self.last_fallback = active
        return await self._set("tree", -1, self.fallback, active)

    async def ride_through(self, rows: dict[int, dict], objects: dict[int, ua.NodeId], gone: list[int] = ()) -> int:
        """Per class (priority -> its published row): the condition is active while the target is not
        reachable; each activation's message says how far it reaches. A class gone (no node has its
        priority) has nothing left to ride through: its condition is cleared."""
        sent = 0
        for p in gone:
            cond = self.conditions.get(("class", p, self.short.bit))
            if cond is not None and cond.active:
                cond.event.Message = ua.LocalizedText(f"class {p}: no node has this priority any more", "en")
                sent += await self._set("class", p, self.short, False)
        for p, row in rows.items():
            active = not row["reachable"]
            cond = self.conditions.get(("class", p, self.short.bit))
            if cond is None and not active:
                continue
            cond = cond or self._condition("class", p, self.short, source=objects[p], sname=f"Class_{p}")
            if active != cond.active:
                reach = f"class {p}: {row['runtime_s']:,.0f} s of {row['target_s']:,.0f} s"
                cond.event.Message = ua.LocalizedText(reach if active else f"{reach}: reachable again", "en")
            sent += await self._set("class", p, self.short, active)
        return sent

    def _condition(self, kind: str, i: int, code: _Code, source: ua.NodeId | None = None,
                   sname: str | None = None) -> Condition:
        key = (kind, i, code.bit)
        cond = self.conditions.get(key)
        if cond is not None:
            return cond
        if source is None:
            source = self.vb if i < 0 else self.node_objects[i]
            sname = VB_ID if i < 0 else self.node_ids[i]
        nid = ua.NodeId(f"{sname}.{kind}" if kind == "watchdog" else
                        f"{source.Identifier}.{code.name}" if kind == "class" else f"{sname}.{kind}.{code.name}",
                        self.ns)
        ev = copy.copy(self.templates[kind])  # fields are replaced, never mutated: a shallow copy is enough
        ev.emitting_node = ua.NodeId(ua.ObjectIds.Server)
        ev.EventType = ua.NodeId(_TYPES[kind])
        ev.SourceNode = source
        ev.SourceName = sname
        ev.NodeId = nid
        ev.ConditionName = code.name
        ev.ConditionClassId = ua.NodeId(ua.ObjectIds.SystemConditionClassType if kind == "watchdog"
                                        else ua.ObjectIds.ProcessConditionClassType)
        ev.ConditionClassName = ua.LocalizedText("System" if kind == "watchdog" else "Process")
        ev.BranchId = ua.NodeId()
        ev.Severity = code.severity
        ev.LastSeverity = code.severity
        ev.Quality = ua.StatusCode()
        ev.Message = ua.LocalizedText(f"{sname}: {code.text}", "en")
        setattr(ev, "EnabledState", ua.LocalizedText("Enabled", "en"))
        setattr(ev, "EnabledState/Id", True)
        cond = Condition(nid, kind, i, code, ev)
        self.conditions[key] = cond
        self.by_id[nid] = cond
        self._add_node(cond, source)
        return cond

    def _add_node(self, cond: Condition, source: ua.NodeId) -> None:
        """A minimal condition object, so that Acknowledge can be called on its ConditionId."""
        nd = NodeData(cond.nodeid)
        name = cond.nodeid.Identifier
        for attr, val, vt in ((_A.NodeId, cond.nodeid, ua.VariantType.NodeId),
                              (_A.NodeClass, ua.NodeClass.Object, ua.VariantType.Int32),
                              (_A.BrowseName, ua.QualifiedName(cond.code.name, self.ns), ua.VariantType.QualifiedName),
                              (_A.DisplayName, ua.LocalizedText(name), ua.VariantType.LocalizedText),
                              (_A.EventNotifier, 0, ua.VariantType.Byte)):
            nd.attributes[attr] = AttributeValue(ua.DataValue(ua.Variant(val, vt)))
        td = ua.ReferenceDescription()
        td.ReferenceTypeId, td.IsForward, td.NodeId = ua.NodeId(ua.ObjectIds.HasTypeDefinition), True, \
            ua.NodeId(_TYPES[cond.kind])
        nd.references.append(td)
        self.aspace[cond.nodeid] = nd
        src = self.aspace.get(source)
        if src is not None:
            r = ua.ReferenceDescription()
            r.ReferenceTypeId, r.IsForward, r.NodeId = ua.NodeId(ua.ObjectIds.HasCondition), True, cond.nodeid
            r.NodeClass, r.BrowseName = ua.NodeClass.Object, ua.QualifiedName(cond.code.name, self.ns)
            r.DisplayName = ua.LocalizedText(name)
            src.references.append(r)

    async def _set(self, kind: str, i: int, code: _Code, active: bool) -> int:
        cond = self._condition(kind, i, code)
        if cond.active == active:
            return 0
        cond.active = active
        if active:
            cond.acked = False
        await self._emit(cond)
        return 1

    async def _emit(self, cond: Condition) -> None:
        ev = cond.event
        now = datetime.now(timezone.utc)
        ev.EventId = uuid.uuid4().bytes
        ev.Time = now
        ev.ReceiveTime = now
        ev.Retain = cond.active or not cond.acked
        setattr(ev, "ActiveState", ua.LocalizedText("Active" if cond.active else "Inactive", "en"))
        setattr(ev, "ActiveState/Id", cond.active)
        setattr(ev, "AckedState", ua.LocalizedText("Acknowledged" if cond.acked else "Unacknowledged", "en"))
        setattr(ev, "AckedState/Id", cond.acked)
        await self.isession.subscription_service.trigger_event(ev)

    # -- operator ----------------------------------------------------------------------------------
    async def _acknowledge(self, parent: ua.NodeId, event_id=None, comment=None):
        cond = self.by_id.get(parent)
        if cond is None:
            return ua.StatusCode(ua.StatusCodes.BadConditionNotEnabled if parent in self.aspace
                                 else ua.StatusCodes.BadNodeIdUnknown)
        eid = event_id.Value if isinstance(event_id, ua.Variant) else event_id
        if eid != cond.event.EventId:
            return ua.StatusCode(ua.StatusCodes.BadEventIdUnknown)
        return await self.acknowledge(cond, comment.Value if isinstance(comment, ua.Variant) else comment)

    async def acknowledge(self, cond: Condition, comment=None) -> ua.StatusCode:
        if cond.acked:
            return ua.StatusCode(ua.StatusCodes.BadConditionBranchAlreadyAcked)
        cond.acked = True
        if comment is not None:
            cond.event.Comment = comment if isinstance(comment, ua.LocalizedText) else ua.LocalizedText(str(comment))
        if cond.kind == "alarm":
            self.on_ack(cond.node, 1 << cond.code.bit)
        await self._emit(cond)
        return ua.StatusCode()

    async def acknowledge_node(self, i: int, bits: int) -> int:
        """Acknowledge a node's unacknowledged health alarms (bits 0 = all); returns how many."""
        n = 0
        for (kind, node, bit), cond in list(self.conditions.items()):
            if kind == "alarm" and node == i and not cond.acked and (bits == 0 or bits & (1 << bit)):
                await self.acknowledge(cond)
                n += 1
        return n

    def retained(self) -> list[Condition]:
        return [c for c in self.conditions.values() if c.active or not c.acked]
