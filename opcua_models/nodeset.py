"""Write the NodeSet2 XML of the vbatt information model (`vbatt.NodeSet2.xml`) from `model.py`.

The XML is committed so that other tools (UaModeler, open62541's nodeset compiler,
a SCADA's engineering tool) can load the model without Python; a test checks that
the committed file is exactly what this module generates.
Regenerate with ``python -m vbatt.opcua_models.nodeset``.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from asyncua import ua

from vbatt.opcua_models.model import (METHODS, NS_URI, TYPE_IDS, VarDef, aggregate_vars, class_vars, decl_ids,
                                      eu_information, node_vars, scan_vars)

__all__ = ["nodeset_xml", "NODESET_FILE", "nodeset_path", "main"]

NODESET_FILE = "vbatt.NodeSet2.xml"
_MANDATORY = ua.ObjectIds.ModellingRule_Mandatory
_ALIASES = {
    "Boolean": ua.ObjectIds.Boolean, "Int64": ua.ObjectIds.Int64, "UInt32": ua.ObjectIds.UInt32,
    "UInt64": ua.ObjectIds.UInt64, "Double": ua.ObjectIds.Double, "String": ua.ObjectIds.String,
    "Argument": ua.ObjectIds.Argument, "EUInformation": ua.ObjectIds.EUInformation, "Range": ua.ObjectIds.Range,
    "HasComponent": ua.ObjectIds.HasComponent, "HasProperty": ua.ObjectIds.HasProperty,
    "HasTypeDefinition": ua.ObjectIds.HasTypeDefinition, "HasSubtype": ua.ObjectIds.HasSubtype,
    "HasModellingRule": ua.ObjectIds.HasModellingRule,
}
_ALIAS_OF = {v: k for k, v in _ALIASES.items()}


def nodeset_path() -> Path:
    return Path(str(resources.files("vbatt.opcua_models") / NODESET_FILE))


def _id(i: int) -> str:
    return f"ns=1;i={i}"


def _dt(i: int) -> str:
    return _ALIAS_OF.get(i, f"i={i}")


class _Writer:
    def __init__(self) -> None:
        self.out: list[str] = []
        self.ids = decl_ids()

    def node(self, tag: str, nid: str, bname: str, attrs: str, display: str, doc: str,
             refs: list[tuple[str, str, bool]], value: str = "") -> None:
        o = self.out
        o.append(f'  <{tag} NodeId="{nid}" BrowseName="1:{bname}"{attrs}>')
        o.append(f"    <DisplayName>{escape(display)}</DisplayName>")
        if doc:
            o.append(f"    <Description>{escape(doc)}</Description>")
        o.append("    <References>")
        for rtype, target, fwd in refs:
            o.append(f'      <Reference ReferenceType="{rtype}"' + ("" if fwd else ' IsForward="false"')
                     + f">{target}</Reference>")
        o.append("    </References>")
        if value:
            o.append(f"    <Value>{value}\n    </Value>" if not value.endswith("\n    ") else f"    <Value>{value}</Value>")
        o.append(f"  </{tag}>")

    def variable(self, tname: str, v: VarDef) -> None:
        parent = _id(TYPE_IDS[tname])
        nid = self.ids[(tname, v.name)]
        refs = [("HasTypeDefinition", f"i={v.type_definition}", True),
                ("HasModellingRule", f"i={_MANDATORY}", True), ("HasComponent", parent, False)]
        props = [p for p in ("EngineeringUnits", "EURange") if (tname, v.name, p) in self.ids]
        refs += [("HasProperty", _id(self.ids[(tname, v.name, p)]), True) for p in props]
        access = 3 if v.writable else 1
        if v.historized:
            access |= 4
        attrs = (f' ParentNodeId="{parent}" DataType="{_dt(v.datatype)}" AccessLevel="{access}"'
                 f' UserAccessLevel="{access}"' + (' Historizing="true"' if v.historized else ""))
        self.node("UAVariable", _id(nid), v.name, attrs, v.name, v.doc, refs)
        if "EngineeringUnits" in props:
            eu = eu_information(v.unit)
            body = (f"<uax:EUInformation><uax:NamespaceUri>{eu.NamespaceUri}</uax:NamespaceUri>"
                    f"<uax:UnitId>{eu.UnitId}</uax:UnitId><uax:DisplayName><uax:Locale>en</uax:Locale>"
                    f"<uax:Text>{escape(eu.DisplayName.Text)}</uax:Text></uax:DisplayName><uax:Description>"
                    f"<uax:Locale>en</uax:Locale><uax:Text>{escape(eu.Description.Text)}</uax:Text>"
                    f"</uax:Description></uax:EUInformation>")
            self.prop(tname, v.name, "EngineeringUnits", nid, "EUInformation",
                      self.ext(ua.ObjectIds.EUInformation_Encoding_DefaultXml, body))
        if "EURange" in props:
            body = f"<uax:Range><uax:Low>{v.lo!r}</uax:Low><uax:High>{v.hi!r}</uax:High></uax:Range>"
            self.prop(tname, v.name, "EURange", nid, "Range", self.ext(ua.ObjectIds.Range_Encoding_DefaultXml, body))

    @staticmethod
    def ext(encoding: int, body: str) -> str:
        # asyncua's importer reads an element as null unless it has text: keep the newlines
        return (f"\n      <uax:ExtensionObject>\n        <uax:TypeId><uax:Identifier>i={encoding}</uax:Identifier>"
                f"</uax:TypeId>\n        <uax:Body>\n          {body}\n        </uax:Body>\n      </uax:ExtensionObject>")

    def prop(self, tname: str, owner: str, name: str, owner_id: int, dtype: str, value: str,
             extra: str = "") -> None:
        nid = self.ids[(tname, owner, name)]
        refs = [("HasTypeDefinition", f"i={ua.ObjectIds.PropertyType}", True),
                ("HasModellingRule", f"i={_MANDATORY}", True), ("HasProperty", _id(owner_id), False)]
        self.node("UAVariable", _id(nid), name, f' ParentNodeId="{_id(owner_id)}" DataType="{dtype}"{extra}',
                  name, "", refs, value)


def nodeset_xml() -> str:
    w = _Writer()
    ids = w.ids
    o = w.out
    o.append('<?xml version="1.0" encoding="utf-8"?>')
    o.append("<!-- Generated by vbatt.opcua_models.nodeset from vbatt/fields.py: do not edit by hand. -->")
    o.append('<UANodeSet xmlns="http://opcfoundation.org/UA/2011/03/UANodeSet.xsd"'
             ' xmlns:uax="http://opcfoundation.org/UA/2008/02/Types.xsd">')
    o.append(f"  <NamespaceUris>\n    <Uri>{NS_URI}</Uri>\n  </NamespaceUris>")
    o.append(f'  <Models>\n    <Model ModelUri="{NS_URI}" Version="0.1.0" PublicationDate="2026-11-24T00:00:00Z">'
             '\n      <RequiredModel ModelUri="http://opcfoundation.org/UA/" Version="1.04.7"'
             ' PublicationDate="2020-07-15T00:00:00Z"/>\n    </Model>\n  </Models>')
    o.append("  <Aliases>")
    for k, v in _ALIASES.items():
        o.append(f'    <Alias Alias="{k}">i={v}</Alias>')
    o.append("  </Aliases>")

    docs = {"VirtualBatteryType": "many battery-backed nodes aggregated into one virtual battery",
            "BatteryNodeType": "one battery-backed device: inputs, limits, instruction, trips and alarms",
            "ScanStatusType": "status words and cycle statistics of the scan",
            "PriorityClassType": "one priority class of the energy program (docs/energy.md): demand, reserve, "
                                 "ride-through target, runtime remaining"}
    members = {
        "VirtualBatteryType": [("HasComponent", _id(ids[("VirtualBatteryType", v.name)]), True) for v in aggregate_vars()]
        + [("HasComponent", _id(ids[("VirtualBatteryType", n)]), True) for n in ("Scan", "Nodes", "Classes")]
        + [("HasComponent", _id(ids[("VirtualBatteryType", m.name)]), True) for m in METHODS],
        "BatteryNodeType": [("HasComponent", _id(ids[("BatteryNodeType", v.name)]), True) for v in node_vars()],
        "ScanStatusType": [("HasComponent", _id(ids[("ScanStatusType", v.name)]), True) for v in scan_vars()],
        "PriorityClassType": [("HasComponent", _id(ids[("PriorityClassType", v.name)]), True) for v in class_vars()],
    }
    for tname, tid in TYPE_IDS.items():
        refs = [("HasSubtype", f"i={ua.ObjectIds.BaseObjectType}", False)] + members[tname]
        w.node("UAObjectType", _id(tid), tname, "", tname, docs[tname], refs)

    for tname, vars_ in (("BatteryNodeType", node_vars()), ("VirtualBatteryType", aggregate_vars()),
                         ("ScanStatusType", scan_vars()), ("PriorityClassType", class_vars())):
        for v in vars_:
            w.variable(tname, v)

    vbt = _id(TYPE_IDS["VirtualBatteryType"])
    for name, tdef, doc in (("Scan", _id(TYPE_IDS["ScanStatusType"]), "scan status and cycle statistics"),
                            ("Nodes", f"i={ua.ObjectIds.FolderType}", "one BatteryNodeType object per node"),
                            ("Classes", f"i={ua.ObjectIds.FolderType}",
                             "one PriorityClassType object per priority class (with the energy program)")):
        refs = [("HasTypeDefinition", tdef, True), ("HasModellingRule", f"i={_MANDATORY}", True),
                ("HasComponent", vbt, False)]
        w.node("UAObject", _id(ids[("VirtualBatteryType", name)]), name, f' ParentNodeId="{vbt}"', name, doc, refs)

    for m in METHODS:
        mid = ids[("VirtualBatteryType", m.name)]
        aid = ids[("VirtualBatteryType", m.name, "InputArguments")]
        refs = [("HasModellingRule", f"i={_MANDATORY}", True), ("HasComponent", vbt, False),
                ("HasProperty", _id(aid), True)]
        w.node("UAMethod", _id(mid), m.name, f' ParentNodeId="{vbt}"', m.name, m.doc, refs)
        args = "".join(
            w.ext(ua.ObjectIds.Argument_Encoding_DefaultXml,
                  f"<uax:Argument><uax:Name>{a.name}</uax:Name><uax:DataType><uax:Identifier>i={a.datatype}"
                  f"</uax:Identifier></uax:DataType><uax:ValueRank>-1</uax:ValueRank><uax:ArrayDimensions/>"
                  f"<uax:Description><uax:Locale>en</uax:Locale><uax:Text>{escape(a.doc)}</uax:Text>"
                  f"</uax:Description></uax:Argument>")
            for a in m.args)
        w.prop("VirtualBatteryType", m.name, "InputArguments", mid, "Argument",
               f"\n      <uax:ListOfExtensionObject>{args}\n      </uax:ListOfExtensionObject>\n    ",
               extra=f' ValueRank="1" ArrayDimensions={quoteattr(str(len(m.args)))}')
    o.append("</UANodeSet>")
    return "\n".join(o) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    target = Path(argv[0]) if argv else Path(__file__).with_name(NODESET_FILE)
    target.write_text(nodeset_xml(), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
