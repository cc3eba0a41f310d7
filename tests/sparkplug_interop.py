"""Run under pysparkplug (an independent Sparkplug B implementation with its own paho 1.x), not vbatt:
a host that decodes an edge node's births and data with pysparkplug's codec and writes one DCMD with
pysparkplug's encoder. Prints one JSON object: what it decoded, and its compiled protobuf descriptor.

argv: port ca_file username password group edge device
"""

import json
import sys
import threading
import time

import pysparkplug as psp
from pysparkplug._protobuf import sparkplug_b_pb2

port, ca, user, password, group, edge, device = sys.argv[1:8]
out = {"births": {}, "data": [], "errors": [], "descriptor": sparkplug_b_pb2.DESCRIPTOR.serialized_pb.hex()}
born = threading.Event()
data = threading.Event()


def on(client, msg):
    try:
        t = msg.topic
        if t.edge_node_id != edge:  # another edge node of the group
            return
        kind = t.message_type.value if hasattr(t.message_type, "value") else str(t.message_type)
        metrics = [{"name": m.name, "alias": m.alias, "datatype": int(m.datatype), "value": m.value,
                    "unit": None} for m in msg.payload.metrics]
        entry = {"kind": kind, "device": t.device_id, "seq": getattr(msg.payload, "seq", None),
                 "timestamp": msg.payload.timestamp, "metrics": metrics}
        if kind in ("NBIRTH", "DBIRTH"):
            out["births"][kind] = entry
            if kind == "DBIRTH":
                born.set()
        elif kind == "DDATA" and born.is_set():
            out["data"].append(entry)
            if any(m["name"] == "status/ack_seq" and m["value"] == 4242 for m in metrics):
                data.set()
    except Exception as exc:  # reported, not lost in paho's thread
        out["errors"].append(f"{type(exc).__name__}: {exc}")


c = psp.Client(username=user, password=password, transport_config=psp.TLSConfig(ca_certs=ca))
# only this edge node's births and data: pysparkplug decodes whatever a subscription delivers in paho's
# thread, and a command of another test's host (metrics without datatypes, as Sparkplug allows outside
# births) stops that thread with NotImplementedError before `on` sees it
for kind, dev in (("NBIRTH", None), ("DBIRTH", device), ("DDATA", device)):
    c.subscribe(psp.Topic(group_id=group, message_type=psp.MessageType[kind], edge_node_id=edge, device_id=dev),
                psp.QoS.AT_MOST_ONCE, on)
c.connect("127.0.0.1", port=int(port), blocking=False)
time.sleep(0.5)
# ask for a birth the Sparkplug way: NCMD Node Control/Rebirth
now = psp.get_current_timestamp()
c.publish(psp.Message(topic=psp.Topic(group_id=group, message_type=psp.MessageType.NCMD, edge_node_id=edge),
                      payload=psp.NCmd(timestamp=now, metrics=(psp.Metric(timestamp=now, name="Node Control/Rebirth",
                                                                          datatype=psp.DataType.BOOLEAN, value=True),)),
                      qos=psp.QoS.AT_MOST_ONCE, retain=False), include_dtypes=True)
ok = born.wait(60)
if ok:
    now = psp.get_current_timestamp()
    values = [("instruction/seq", psp.DataType.UINT64, 4242), ("instruction/lease_ms", psp.DataType.UINT32, 60000),
              ("instruction/epoch", psp.DataType.UINT64, 7), ("instruction/battery_w", psp.DataType.DOUBLE, 33.0),
              ("instruction/bus_w", psp.DataType.DOUBLE, -12.5), ("instruction/served_w", psp.DataType.DOUBLE, 180.0),
              ("instruction/shed_w", psp.DataType.DOUBLE, 20.0)]
    cmd = psp.DCmd(timestamp=now, metrics=tuple(psp.Metric(timestamp=now, name=n, datatype=d, value=v)
                                                for n, d, v in values))
    c.publish(psp.Message(topic=psp.Topic(group_id=group, message_type=psp.MessageType.DCMD, edge_node_id=edge,
                                          device_id=device), payload=cmd, qos=psp.QoS.AT_MOST_ONCE, retain=False),
              include_dtypes=True)
    data.wait(60)
out["timed_out"] = [w for w, e in (("birth", born), ("acknowledgement", data)) if not e.is_set()]
c.disconnect()
print(json.dumps(out))
