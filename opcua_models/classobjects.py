"""The PriorityClassType objects follow the classes the energy program publishes, while serving.

A class that appears (a `vbatt reload` or `SetPriority` gives a node a priority no node had) gets its
object at the next update, its variables historized from then on, and a GeneralModelChangeEvent from
the Server object (NodeAdded: the object; ReferenceAdded: the Classes folder), so that a client that
shows the address space (UaExpert) browses the folder again instead of showing a stale tree.

A class that vanishes (no node has its priority any more) keeps its object, its NodeIds and its
record: the variables keep their last values with the status UncertainLastUsableValue (as the inputs
of an offline node: nothing updates them any more; a Good demand of a class without nodes would be
a lie, and a Bad status would make clients drop the last values an operator wants to see), and its
ride-through alarm is cleared. When the class comes back, its values are Good again. Objects are
never deleted while serving: monitored items and displays on them stay valid; a restart builds the
objects of the classes present then.
"""

from __future__ import annotations

import logging
import math
import uuid
from datetime import datetime, timezone

from asyncua import ua
from asyncua.common.event_objects import GeneralModelChangeEvent

from vbatt.opcua_models.addrspace import Instances, add_class
from vbatt.opcua_models.model import CLASS_MEMORY, VB_ID, class_vars

__all__ = ["ClassObjects", "class_keys", "model_change_event"]

log = logging.getLogger("vbatt.opcua")
_VERB = ua.ModelChangeStructureVerbMask


def class_keys() -> dict[str, str]:
    """Each class variable's key in the published block (the energy program's class memory)."""
    return {v.name: f"mem.{CLASS_MEMORY}.{v.name}" for v in class_vars()}


def model_change_event(inst: Instances, added: list[ua.NodeId], type_id: ua.NodeId) -> GeneralModelChangeEvent:
    """Part 3 GeneralModelChangeEvent from the Server object: each object added under the Classes folder
    (NodeAdded, its type) and the folder's new references (ReferenceAdded, FolderType)."""
    folder = ua.NodeId(f"{VB_ID}.Classes", inst.ns)
    ev = GeneralModelChangeEvent(sourcenode=ua.NodeId(ua.ObjectIds.Server),
                                 message=f"{len(added)} priority class object(s) added under {VB_ID}.Classes")
    ev.emitting_node = ua.NodeId(ua.ObjectIds.Server)
    ev.SourceName = "Server"
    now = datetime.now(timezone.utc)
    ev.EventId, ev.Time, ev.ReceiveTime = uuid.uuid4().bytes, now, now
    ev.Changes = [ua.ModelChangeStructureDataType(Affected=nid, AffectedType=type_id, Verb=_VERB.NodeAdded)
                  for nid in added]
    ev.Changes.append(ua.ModelChangeStructureDataType(Affected=folder, AffectedType=ua.NodeId(ua.ObjectIds.FolderType),
                                                      Verb=_VERB.ReferenceAdded))
    ev.data_types["Changes"] = ua.VariantType.ExtensionObject  # asyncua declares it by its DataType NodeId
    return ev


class ClassObjects:
    """The class rows of the published block, the class objects that show them, and their lifecycle."""

    def __init__(self, inst: Instances):
        self.inst = inst
        self.keys = class_keys()
        self.gone: set[int] = set()  # classes with an object and no node now
        self.last: dict[tuple[int, str], object] = {}

    def rows(self, views) -> dict[int, dict[str, object]]:
        """priority -> {var: value} of every class the energy program publishes (one cycle, whole)."""
        out = {}
        for c, p in enumerate(views[self.keys["priority"]].tolist()):
            if p >= 0:
                out[int(p)] = {v.name: (bool(views[k][c]) if v.vtype == ua.VariantType.Boolean else
                                        int(views[k][c]) if v.vtype == ua.VariantType.Int64 else float(views[k][c]))
                               for v, k in zip(class_vars(), self.keys.values())}
        return out

    def add_new(self, rows) -> list[int]:
        """Objects for the classes in `rows` that have none; returns their priorities."""
        added = sorted(p for p in rows if p not in self.inst.class_objects)
        for p in added:
            add_class(self.inst, p)
            log.info("OPC UA: priority class %d appeared: object %s added", p, self.inst.class_objects[p].Identifier)
        return added

    def vanished(self, rows) -> list[int]:
        """The classes that have an object, had a row, and have none now (each reported once)."""
        out = [p for p in self.inst.class_objects if p not in rows and p not in self.gone]
        self.gone.update(out)
        for p in out:
            log.info("OPC UA: priority class %d has no node any more: its object keeps its last values "
                     "(UncertainLastUsableValue)", p)
        return out

    async def write(self, rows, gone_now: list[int], src, now, write) -> int:
        """Changed values of the classes present (Good); the last values of the classes gone now
        (UncertainLastUsableValue). `write` is the server's (avs, idx, vals, vtype, src, now, status)."""
        n = 0
        for p in gone_now:
            for v in class_vars():
                x = self.last.pop((p, v.name), None)
                if x is not None:
                    n += await write([self.inst.class_values[p][v.name]], [0], [x], v.vtype, src, now, [False])
        for p, row in rows.items():
            if p in self.gone:  # back: every value is written Good again
                self.gone.discard(p)
                log.info("OPC UA: priority class %d is back", p)
            for v in class_vars():
                x = row[v.name]
                last = self.last.get((p, v.name))
                if last == x or (isinstance(x, float) and isinstance(last, float) and math.isnan(x)
                                 and math.isnan(last)):
                    continue
                self.last[(p, v.name)] = x
                n += await write([self.inst.class_values[p][v.name]], [0], [x], v.vtype, src, now, None)
        return n
