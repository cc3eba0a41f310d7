"""benchmarks/mqtt_replay.py: pre-encoded DDATA with the timestamp and seq appended is valid Sparkplug B
that the real codec decodes to the new values and the real host application accepts (no broker: the
messages go straight into `Host.on_message`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from test_modbus_support import fleet_of
from vbatt.drivers.mqtt import sparkplug as sp
from vbatt.drivers.mqtt.driver import Host
from vbatt.drivers.mqtt.edge import COL, EdgeNode, Link
from vbatt.drivers.node.agent import AgentSet, AgentSpec
from vbatt.drivers.node.backends.sim import SimBackend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.mqtt_replay import (Replay, ddata_template, long_metric, publish_packet, stamp,  # noqa: E402
                                    varint)

TWO = """
nodes:
  - {id: A, demand_w: 200, max_discharge_w: 100, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
  - {id: B, demand_w: 300, max_discharge_w: 400, max_charge_w: 200, capacity_wh: 900, soc: 0.5, link_max_w: 800}
"""


def test_varint_is_protobufs():
    p = sp.Payload(seq=300, timestamp=2**63 + 5)
    assert p.SerializeToString() == b"\x08" + varint(2**63 + 5) + b"\x18" + varint(300)
    assert varint(0) == b"\x00" and varint(127) == b"\x7f" and varint(128) == b"\x80\x01"


def test_a_framed_publish_packet_has_mqtts_remaining_length():
    topic, payload = b"spBv1.0/g/DDATA/e/d", bytes(range(200))
    pk = publish_packet(topic, payload)
    assert pk[:3] == b"\x30\xdd\x01" and len(pk) == 3 + 2 + len(topic) + len(payload)  # 2 + 19 + 200 = 221 = 0x5d + 1 * 128
    assert _packets(pk + publish_packet(b"t", b"")) == [(topic, payload), (b"t", b"")]


def test_appended_timestamp_and_seq_decode_as_the_new_values_the_last_occurrence_wins():
    row = np.zeros(len(COL))
    row[COL["soc"]], row[COL["status/mode"]] = 0.625, 1
    t = ddata_template(1, row, [COL["soc"], COL["status/mode"]])
    first = sp.Payload.FromString(stamp(t, 1_700_000_000_123, 254))
    assert (first.timestamp, first.seq) == (1_700_000_000_123, 254)
    again = sp.Payload.FromString(stamp(stamp(t, 1, 2), 1_800_000_000_000, 255))  # a stamp over a stamp
    assert (again.timestamp, again.seq) == (1_800_000_000_000, 255)
    assert [(m.alias, m.WhichOneof("value")) for m in again.metrics] == [
        (2 * sp.ALIAS_STRIDE + COL["soc"], "double_value"), (2 * sp.ALIAS_STRIDE + COL["status/mode"], "int_value")]
    assert again.metrics[0].double_value == 0.625 and again.metrics[1].int_value == 1
    m = sp.Payload.FromString(t + long_metric(4242, 2**40 + 7)).metrics[-1]
    assert (m.alias, m.long_value) == (4242, 2**40 + 7)


def _packets(buf: bytes) -> list[tuple[bytes, bytes]]:
    """MQTT 3.1.1 QoS 0 PUBLISH packets back to (topic, payload), as a broker reads them."""
    out, k = [], 0
    while k < len(buf):
        assert buf[k] == 0x30, f"not a QoS 0 PUBLISH at byte {k}: {buf[k]:#x}"
        k, n, shift = k + 1, 0, 0
        while True:
            b = buf[k]
            k += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        tl = int.from_bytes(buf[k:k + 2], "big")
        out.append((buf[k + 2:k + 2 + tl], buf[k + 2 + tl:k + n]))
        k += n
    return out


class _Capture:
    """Stands in for the broker session: keeps what the edge node publishes and what the replay queues
    for paho's network thread (framed PUBLISH packets), in order."""

    connected = True

    def __init__(self):
        self.out: list[tuple[bytes, bytes]] = []
        self.client = self

    def publish(self, topic, payload, qos=0, retain=False):
        self.out.append((topic.encode() if isinstance(topic, str) else topic, payload))
        return True

    def _packet_queue(self, command, packet, mid, qos, info=None):
        assert (command, qos) == (0x30, 0)
        self.out.extend(_packets(packet))


def test_the_host_takes_replayed_births_data_and_acknowledgements():
    fleet = fleet_of(TWO)
    agents = AgentSet(SimBackend(fleet, 0, 2), [AgentSpec(i, "127.0.0.1", 0) for i in fleet.ids], tick_ms=1000)
    link = Link("127.0.0.1", 1, None, "e1", "pw")
    edge = EdgeNode(agents, link, group="g1", edge="e1", devices=["A", "B"])
    r = Replay(edge, lease_ms=4000)
    cap = _Capture()
    r.session = edge.session = cap
    edge.bdseq = 0  # as after a connect
    edge.birth()
    r.seq = edge.seq
    host = Host([("g1", "e1", "A"), ("g1", "e1", "B")], link, host_id="h", lease_ms=4000, command_ms=1000,
                silence_ms=5000)
    for topic, payload in cap.out:
        host.on_message(topic, payload)
    assert host.fault.tolist() == [0, 0] and host.aliases[0] is not None
    cap.out.clear()
    r.tick()  # every device: template + timestamp + seq, seq continuing after the births
    cmd = sp.Payload(timestamp=5)
    cmd.metrics.add(name="instruction/seq", datatype=sp.DataType.UInt64, long_value=77)
    cmd.metrics.add(name="instruction/epoch", datatype=sp.DataType.UInt64, long_value=1_700_000_000_000)
    r.on_message(sp.topic("g1", "DCMD", "e1", "B").encode(), cmd.SerializeToString())
    assert [t.decode() for t, _ in cap.out] == [sp.topic("g1", "DDATA", "e1", d) for d in ("A", "B", "B")]
    stamps = [sp.Payload.FromString(p) for _, p in cap.out]
    assert [p.seq for p in stamps] == [3, 4, 5]  # NBIRTH 0, DBIRTH 1 and 2
    for topic, payload in cap.out:
        host.on_message(topic, payload)
    assert host.gaps == 0 and host.fault.tolist() == [0, 0]
    assert host.sampled_ms[0] == stamps[0].timestamp and host.sampled_ms[1] == stamps[2].timestamp
    assert host.status["status/ack_seq"][1] == 77 and host.status["status/ack_epoch"][1] == 1_700_000_000_000
    assert host.status["status/mode"].tolist() == [0, 1]
    assert host.values["soc"][0] == agents.backend.offer["soc"][0]
