"""Instances of the model in asyncua's address space, built directly and in linear time.

asyncua's `add_nodes`/`instantiate` scans the parent's whole reference list for
every child added (duplicate checks), so N children under one parent cost
O(N²), and instantiate browses the type for every instance. The NodeIds built
here are unique by construction (string ids ``<node id>.<field>``), so this
module writes `NodeData` records straight into the address space: one pass,
constant attribute values shared between the instances of one field. Type
information (EngineeringUnits, EURange, method arguments) is referenced from the
imported type's instance declarations instead of being copied per instance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from asyncua import ua
from asyncua.server.address_space import AddressSpace, AttributeValue, NodeData

from vbatt.opcua_models.fastpath import data_value
from vbatt.opcua_models.model import (METHODS, TYPE_IDS, VB_ID, VarDef, aggregate_vars, class_object_id, class_vars,
                                      decl_ids, node_vars, scan_vars)
from vbatt.programs.recorded import class_series

__all__ = ["Instances", "build_instances", "add_class"]

_A = ua.AttributeIds
_HC = ua.NodeId(ua.ObjectIds.HasComponent)
_HP = ua.NodeId(ua.ObjectIds.HasProperty)
_HTD = ua.NodeId(ua.ObjectIds.HasTypeDefinition)
_ORG = ua.NodeId(ua.ObjectIds.Organizes)
_NULL = ua.NodeId()
_WAITING = ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData)
_new = object.__new__


@dataclass
class Instances:
    """Where the values go: Value attributes per variable, by field and node index."""

    ns: int
    node_values: dict[str, list[AttributeValue]] = field(default_factory=dict)  # field -> per node
    agg_values: dict[str, AttributeValue] = field(default_factory=dict)
    scan_values: dict[str, AttributeValue] = field(default_factory=dict)
    node_objects: list[ua.NodeId] = field(default_factory=list)
    methods: dict[str, ua.NodeId] = field(default_factory=dict)
    vb: ua.NodeId | None = None
    writable: dict[ua.NodeId, tuple[str, str, int]] = field(default_factory=dict)  # nid -> (scope, name, node)
    historized: dict[ua.NodeId, str] = field(default_factory=dict)
    class_values: dict[int, dict[str, AttributeValue]] = field(default_factory=dict)  # priority -> var -> value
    class_objects: dict[int, ua.NodeId] = field(default_factory=dict)
    class_historized: dict[ua.NodeId, str] = field(default_factory=dict)  # nid -> "class.<priority>.<var>"
    aspace: AddressSpace | None = None


def _dv(v, vt=None) -> AttributeValue:
    return AttributeValue(ua.DataValue(ua.Variant(v, vt)))


class _Builder:
    def __init__(self, aspace: AddressSpace, ns: int):
        self.aspace, self.ns = aspace, ns
        self.decl = {k: ua.NodeId(v, ns) for k, v in decl_ids().items()}
        self.types = {k: ua.NodeId(v, ns) for k, v in TYPE_IDS.items()}
        self._shared: dict[tuple, dict] = {}
        self._typedefs: dict[ua.NodeId, ua.ReferenceDescription] = {}

    def ref(self, src: NodeData, rtype: ua.NodeId, target: NodeData, forward: bool = True) -> None:
        # every field is set here: skip the constructor's five default NodeId/name objects
        d = _new(ua.ReferenceDescription)
        d.ReferenceTypeId = rtype
        d.IsForward = forward
        d.NodeId = target.nodeid
        d.BrowseName = target.attributes[_A.BrowseName].value.Value.Value
        d.DisplayName = target.attributes[_A.DisplayName].value.Value.Value
        d.NodeClass = target.attributes[_A.NodeClass].value.Value.Value
        d.TypeDefinition = getattr(target, "_typedef", _NULL)
        src.references.append(d)

    def link(self, parent: NodeData, rtype: ua.NodeId, child: NodeData) -> None:
        self.ref(parent, rtype, child, True)
        self.ref(child, rtype, parent, False)

    def typedef(self, nd: NodeData, tid: ua.NodeId) -> None:
        d = self._typedefs.get(tid)
        if d is None:  # one reference object per type, shared (references are never mutated)
            d = self._typedefs[tid] = ua.ReferenceDescription()
            d.ReferenceTypeId, d.IsForward, d.NodeId = _HTD, True, tid
            d.NodeClass = ua.NodeClass.ObjectType if nd.attributes[_A.NodeClass].value.Value.Value == \
                ua.NodeClass.Object else ua.NodeClass.VariableType
            tnode = self.aspace.get(tid)
            if tnode is not None:
                d.BrowseName = tnode.attributes[_A.BrowseName].value.Value.Value
                d.DisplayName = tnode.attributes[_A.DisplayName].value.Value.Value
        nd.references.append(d)
        nd._typedef = tid  # type: ignore[attr-defined]

    def _common(self, key: tuple, make) -> dict:
        attrs = self._shared.get(key)
        if attrs is None:
            attrs = self._shared[key] = make()
        return attrs

    def new(self, nid: ua.NodeId, common: dict) -> NodeData:
        nd = NodeData(nid)
        nd.attributes.update(common)
        nd.attributes[_A.NodeId] = _dv(nid, ua.VariantType.NodeId)
        self.aspace[nid] = nd
        return nd

    def obj(self, nid: ua.NodeId, bname: str, tid: ua.NodeId, doc: str = "", notifier: int = 0,
            share: bool = False) -> NodeData:
        def make() -> dict:
            return {
                _A.NodeClass: _dv(ua.NodeClass.Object, ua.VariantType.Int32),
                _A.BrowseName: _dv(ua.QualifiedName(bname, self.ns), ua.VariantType.QualifiedName),
                _A.DisplayName: _dv(ua.LocalizedText(bname), ua.VariantType.LocalizedText),
                _A.Description: _dv(ua.LocalizedText(doc), ua.VariantType.LocalizedText),
                _A.WriteMask: _dv(0, ua.VariantType.UInt32),
                _A.UserWriteMask: _dv(0, ua.VariantType.UInt32),
                _A.EventNotifier: _dv(notifier, ua.VariantType.Byte),
            }
        common = self._common(("obj", str(tid), notifier), make) if share else make()
        if share:  # per-instance names on top of the shared attributes
            common = {**common,
                      _A.BrowseName: _dv(ua.QualifiedName(bname, self.ns), ua.VariantType.QualifiedName),
                      _A.DisplayName: _dv(ua.LocalizedText(bname), ua.VariantType.LocalizedText)}
        nd = self.new(nid, common)
        self.typedef(nd, tid)
        return nd

    def var(self, nid: ua.NodeId, v: VarDef, tname: str, initial) -> NodeData:
        def make() -> dict:
            access = (ua.AccessLevel.CurrentRead.mask | (ua.AccessLevel.CurrentWrite.mask if v.writable else 0)
                      | (ua.AccessLevel.HistoryRead.mask if v.historized else 0))
            return {
                _A.NodeClass: _dv(ua.NodeClass.Variable, ua.VariantType.Int32),
                _A.BrowseName: _dv(ua.QualifiedName(v.name, self.ns), ua.VariantType.QualifiedName),
                _A.DisplayName: _dv(ua.LocalizedText(v.name), ua.VariantType.LocalizedText),
                _A.Description: _dv(ua.LocalizedText(v.doc), ua.VariantType.LocalizedText),
                _A.WriteMask: _dv(0, ua.VariantType.UInt32),
                _A.UserWriteMask: _dv(0, ua.VariantType.UInt32),
                _A.DataType: _dv(ua.NodeId(v.datatype), ua.VariantType.NodeId),
                _A.ValueRank: _dv(-1, ua.VariantType.Int32),
                _A.ArrayDimensions: _dv([], ua.VariantType.UInt32),
                _A.AccessLevel: _dv(access, ua.VariantType.Byte),
                _A.UserAccessLevel: _dv(access, ua.VariantType.Byte),
                _A.MinimumSamplingInterval: _dv(0.0, ua.VariantType.Double),
                _A.Historizing: _dv(v.historized, ua.VariantType.Boolean),
            }
        nd = self.new(nid, self._common(("var", tname, v.name), make))
        nd.attributes[_A.Value] = AttributeValue(data_value(initial, v.vtype, _WAITING, None, None))
        self.typedef(nd, ua.NodeId(v.type_definition))
        for prop in ("EngineeringUnits", "EURange"):
            pid = self.decl.get((tname, v.name, prop))
            if pid is not None:  # shared with the type's instance declaration
                self.ref(nd, _HP, self.aspace[pid])
        return nd


_ZERO = {ua.VariantType.Double: 0.0, ua.VariantType.Int64: 0, ua.VariantType.UInt32: 0,
         ua.VariantType.UInt64: 0, ua.VariantType.Boolean: False, ua.VariantType.String: ""}


def build_instances(aspace: AddressSpace, ns: int, node_ids: list[str] | tuple[str, ...],
                    classes: tuple[int, ...] = ()) -> Instances:
    """The virtual battery, its scan status, its methods, one BatteryNodeType object per node and one
    PriorityClassType object per priority in `classes`."""
    bad = sorted(i for i in node_ids if i == VB_ID or i.startswith(VB_ID + "."))
    if bad:
        raise ValueError(f"node id(s) {bad} are reserved by the OPC UA server (rename the node)")
    b = _Builder(aspace, ns)
    inst = Instances(ns=ns, aspace=aspace)
    S = lambda s: ua.NodeId(s, ns)  # noqa: E731

    objects = aspace[ua.NodeId(ua.ObjectIds.ObjectsFolder)]
    vb = b.obj(S(VB_ID), VB_ID, b.types["VirtualBatteryType"], "the virtual battery",
               notifier=1 << ua.EventNotifier.SubscribeToEvents)
    b.link(objects, _ORG, vb)
    inst.vb = vb.nodeid
    for v in aggregate_vars():
        nd = b.var(S(f"{VB_ID}.{v.name}"), v, "VirtualBatteryType", _ZERO[v.vtype])
        b.link(vb, _HC, nd)
        inst.agg_values[v.name] = nd.attributes[_A.Value]
        if v.writable:
            inst.writable[nd.nodeid] = ("agg", v.name, -1)
        if v.historized:
            inst.historized[nd.nodeid] = v.name
    scan = b.obj(S(f"{VB_ID}.Scan"), "Scan", b.types["ScanStatusType"], "scan status and cycle statistics")
    b.link(vb, _HC, scan)
    for v in scan_vars():
        nd = b.var(S(f"{VB_ID}.Scan.{v.name}"), v, "ScanStatusType", _ZERO[v.vtype])
        b.link(scan, _HC, nd)
        inst.scan_values[v.name] = nd.attributes[_A.Value]
    for m in METHODS:
        nd = b.new(S(f"{VB_ID}.{m.name}"), {
            _A.NodeClass: _dv(ua.NodeClass.Method, ua.VariantType.Int32),
            _A.BrowseName: _dv(ua.QualifiedName(m.name, ns), ua.VariantType.QualifiedName),
            _A.DisplayName: _dv(ua.LocalizedText(m.name), ua.VariantType.LocalizedText),
            _A.Description: _dv(ua.LocalizedText(m.doc), ua.VariantType.LocalizedText),
            _A.WriteMask: _dv(0, ua.VariantType.UInt32), _A.UserWriteMask: _dv(0, ua.VariantType.UInt32),
            _A.Executable: _dv(True, ua.VariantType.Boolean), _A.UserExecutable: _dv(True, ua.VariantType.Boolean),
        })
        b.link(vb, _HC, nd)
        b.ref(nd, _HP, aspace[b.decl[("VirtualBatteryType", m.name, "InputArguments")]])
        inst.methods[m.name] = nd.nodeid
    cfolder = b.obj(S(f"{VB_ID}.Classes"), "Classes", ua.NodeId(ua.ObjectIds.FolderType),
                    "one object per priority class (with the energy program)")
    b.link(vb, _HC, cfolder)
    for p in classes:
        add_class(inst, p, b)
    folder = b.obj(S(f"{VB_ID}.Nodes"), "Nodes", ua.NodeId(ua.ObjectIds.FolderType), "one object per node")
    b.link(vb, _HC, folder)

    nvars = node_vars()
    for v in nvars:
        inst.node_values[v.name] = []
    btype = b.types["BatteryNodeType"]
    for i, nid_s in enumerate(node_ids):
        obj = b.obj(S(nid_s), nid_s, btype, share=True)
        b.link(folder, _ORG, obj)
        inst.node_objects.append(obj.nodeid)
        for v in nvars:
            nd = b.var(S(f"{nid_s}.{v.name}"), v, "BatteryNodeType", _ZERO[v.vtype])
            b.link(obj, _HC, nd)
            inst.node_values[v.name].append(nd.attributes[_A.Value])
            if v.writable:
                inst.writable[nd.nodeid] = ("node", v.name, i)
    return inst


def add_class(inst: Instances, p: int, b: _Builder | None = None) -> ua.NodeId:
    """The PriorityClassType object of priority `p` under VirtualBattery/Classes (at the start, or later
    while serving: a class that appears); returns its NodeId. Its values wait for initial data."""
    b = b or _Builder(inst.aspace, inst.ns)
    S = lambda s: ua.NodeId(s, inst.ns)  # noqa: E731
    name = class_object_id(p)
    obj = b.obj(S(name), name.rsplit(".", 1)[1], b.types["PriorityClassType"], f"priority class {p}")
    b.link(inst.aspace[S(f"{VB_ID}.Classes")], _ORG, obj)
    inst.class_objects[p] = obj.nodeid
    inst.class_values[p] = {}
    for v in class_vars():
        nd = b.var(S(f"{name}.{v.name}"), v, "PriorityClassType", _ZERO[v.vtype])
        b.link(obj, _HC, nd)
        inst.class_values[p][v.name] = nd.attributes[_A.Value]
        if v.historized:
            inst.class_historized[nd.nodeid] = class_series(p, v.name)
    return obj.nodeid
