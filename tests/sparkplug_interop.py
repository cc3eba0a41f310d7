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
flowing = threading.Event()
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
            flowing.set()
            if any(m["name"] == "status/ack_seq" and m["value"] == 4242 for m in metrics):
                data.set()
    except Exception as exc:  # reported, not lost in paho's thread
        out["errors"].append(f"{type(exc).__name__}: {exc}")


c = psp.Client(username=user, password=password, transport_config=psp.TLSConfig(ca_certs=ca))
# pysparkplug decodes in paho's thread before `on` sees a message, and a DDATA (aliases, no datatypes, as
# Sparkplug allows) that comes before pysparkplug has the DBIRTH raises NotImplementedError there, which
# ends that thread: the edge publishes data every period, so data is subscribed only once the birth is in
for kind, dev in (("NBIRTH", None), ("DBIRTH", device)):
    c.subscribe(psp.Topic(group_id=group, message_type=psp.MessageType[kind], edge_node_id=edge, device_id=dev),
                psp.QoS.AT_MOST_ONCE, on)
connected = threading.Event()
c.connect("127.0.0.1", port=int(port), blocking=False, callback=lambda client: connected.set())


def ask_for_birth() -> None:
    """NCMD Node Control/Rebirth, the Sparkplug way."""
    now = psp.get_current_timestamp()
    rebirth = psp.Metric(timestamp=now, name="Node Control/Rebirth", datatype=psp.DataType.BOOLEAN, value=True)
    c.publish(psp.Message(topic=psp.Topic(group_id=group, message_type=psp.MessageType.NCMD, edge_node_id=edge),
                          payload=psp.NCmd(timestamp=now, metrics=(rebirth,)), qos=psp.QoS.AT_MOST_ONCE,
                          retain=False), include_dtypes=True)


# a request published before the broker's CONNACK is lost (paho 1.x: not connected), and one sent before the
# subscriptions are in may be answered unseen: ask once connected (pysparkplug subscribes on connect, ahead
# of the request on the same connection), and again while no birth comes
ok = False
if connected.wait(60):
    deadline = time.monotonic() + 60
    while not ok and time.monotonic() < deadline:
        ask_for_birth()
        ok = born.wait(5)
if ok:
    c.subscribe(psp.Topic(group_id=group, message_type=psp.MessageType.DDATA, edge_node_id=edge, device_id=device),
                psp.QoS.AT_MOST_ONCE, on)
    flowing.wait(60)  # the subscription is in: the acknowledgement cannot be missed
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
waits = (("connection", connected), ("birth", born), ("data", flowing), ("acknowledgement", data))
out["timed_out"] = [w for w, e in waits if not e.is_set()]
c.disconnect()
print(json.dumps(out))
