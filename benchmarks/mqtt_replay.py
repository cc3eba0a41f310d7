"""A cheap Sparkplug B load generator: many devices of one edge node replayed from pre-encoded payloads.

The real edge node (`vbatt fleet`, drivers/mqtt/edge.py) spends ~74 µs of Python per device and tick
making its DDATA, so on a small machine the publishers saturate before the controller under test.
This process sends the same VALID Sparkplug B traffic for a fraction of that:

* the real `EdgeNode` of `fleet_edges(cfg, fleet, only=K)` (its devices, its simulated values) births
  with the real codec: NBIRTH, then a DBIRTH per device with every metric and alias;
* each device's DDATA is a template encoded once with the real codec (the metrics a real tick sends:
  those that changed between two ticks of the simulation, and the lease left), without timestamp and
  seq; every tick sends template + Payload.timestamp (field 1) + Payload.seq (field 3) appended as raw
  varints. Protobuf keeps the last occurrence of a scalar field, so that is a valid payload with the
  new values (tests/test_mqtt_replay.py decodes it with the real codec);
* a DCMD is answered at once with an acknowledgement in a DDATA: status/mode, status/lease_left_ms,
  status/applied_w from a template, then status/ack_epoch, status/ack_seq and instruction/seq appended as
  metrics of their own (repeated field 2: appended metrics are metrics), timestamp and seq last, so the
  host measures the instruction round trip as with a real node. The DCMD is decoded with the real codec.

The MQTT session is vbatt's own (drivers/mqtt/client.py: paho-mqtt, TLS, the NDEATH will with bdSeq).
paho's `publish()` costs ~14 µs of Python per message (measured here), as much as the controller's decode;
so by default (`framed`) the replay frames the QoS 0 PUBLISH packets itself (fixed header 0x30, remaining
length, topic, payload: MQTT 3.1.1 §3.3) and hands paho's network thread one buffer per tick, and one
packet per acknowledgement, through the client's own output queue. `--paho-publish` uses `publish()`.

    python -m benchmarks.mqtt_replay PLANT.yaml --edge K        # until SIGTERM/SIGINT
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
import time

import numpy as np
import paho.mqtt.client as paho

from vbatt.drivers.mqtt import sparkplug as sp
from vbatt.drivers.mqtt.client import Session, Will
from vbatt.drivers.mqtt.edge import COL, DM, INT_COLS, EdgeNode

__all__ = ["varint", "stamp", "long_metric", "ddata_template", "publish_packet", "Replay"]


def varint(v: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    out = bytearray()
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


_SEQ = [b"\x18" + varint(s) for s in range(256)]  # Payload.seq (field 3, varint) for every seq value


def stamp(template: bytes, timestamp_ms: int, seq: int) -> bytes:
    """A DDATA template with Payload.timestamp (field 1) and Payload.seq (field 3) appended."""
    return template + b"\x08" + varint(timestamp_ms) + _SEQ[seq & 0xFF]


def long_metric(alias: int, value: int) -> bytes:
    """A Payload.metrics entry (field 2) with alias (field 2) and long_value (field 11): a UInt64 metric."""
    body = b"\x10" + varint(alias) + b"\x58" + varint(value)
    return b"\x12" + varint(len(body)) + body


def publish_packet(topic: bytes, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH packet, QoS 0, not retained (the remaining length is the same varint)."""
    body = len(topic).to_bytes(2, "big") + topic + payload
    return b"\x30" + varint(len(body)) + body


def ddata_template(i: int, row: np.ndarray, cols) -> bytes:
    """Device i's metrics `cols` with the values of `row`, by alias, encoded with the real codec."""
    p = sp.Payload()
    base = (i + 1) * sp.ALIAS_STRIDE
    for j in cols:
        m = p.metrics.add(alias=base + int(j))
        x = float(row[j])
        if x != x:
            m.is_null = True
        elif INT_COLS[j]:
            setattr(m, sp.VALUE_FIELD[DM[j].datatype], int(x))
        else:
            m.double_value = x
    return p.SerializeToString()


class Replay:
    """Edge node `edge` (a real EdgeNode, for its births and values) replayed from templates at `rate_hz`."""

    def __init__(self, edge: EdgeNode, rate_hz: float = 1.0, lease_ms: int = 4000, framed: bool = True):
        self.framed = framed
        self.edge = edge
        self.period_s = 1.0 / rate_hz
        n = edge.agents.n
        a = edge.agents
        v0 = edge.values(a.clock_ns())
        a.tick()
        v1 = edge.values(a.clock_ns())
        lease = COL["status/lease_left_ms"]
        self.tmpl = []
        for i in range(n):
            cols = [int(j) for j in np.flatnonzero(~((v0[i] == v1[i]) | (np.isnan(v0[i]) & np.isnan(v1[i]))))]
            self.tmpl.append(ddata_template(i, v1[i], [*cols, lease]))
        row = v1.copy()
        row[:, COL["status/mode"]] = 1
        row[:, lease] = lease_ms
        ack_cols = [COL["status/mode"], lease, COL["status/applied_w"]]
        self.ack = [ddata_template(i, row[i], ack_cols) for i in range(n)]
        self.alias_ack_seq = [(i + 1) * sp.ALIAS_STRIDE + COL["status/ack_seq"] for i in range(n)]
        self.alias_ack_epoch = [(i + 1) * sp.ALIAS_STRIDE + COL["status/ack_epoch"] for i in range(n)]
        self.alias_instr_seq = [(i + 1) * sp.ALIAS_STRIDE + COL["instruction/seq"] for i in range(n)]
        self.topics = list(edge._ddata)
        self.btopics = [t.encode() for t in self.topics]
        self.dcmd = dict(edge._dcmd)
        self.ncmd = edge._ncmd
        self.lock = threading.Lock()  # seq and publish in one step: seq order on the wire
        self.seq = 0
        self.want_birth = False
        self.session: Session | None = None
        self.sent = self.acks = self.refused = self.skipped = 0

    def _next(self) -> int:
        s = self.seq
        self.seq = (s + 1) & 0xFF
        return s

    def _queue(self, packets: bytes) -> None:
        """PUBLISH packets (already framed) into paho's output queue: its network thread writes them."""
        self.session.client._packet_queue(paho.PUBLISH, packets, 0, 0, paho.MQTTMessageInfo(0))

    def tick(self) -> None:
        ts = b"\x08" + varint(time.time_ns() // 1_000_000)
        with self.lock:
            if self.framed:
                tm, bt = self.tmpl, self.btopics
                self._queue(b"".join([publish_packet(t, tm[i] + ts + _SEQ[self._next()]) for i, t in enumerate(bt)]))
            else:
                pub = self.session.client.publish
                for i, t in enumerate(self.topics):
                    pub(t, self.tmpl[i] + ts + _SEQ[self._next()], 0)
        self.sent += len(self.topics)

    # paho's thread
    def on_message(self, topic: bytes, payload: bytes) -> None:
        i = self.dcmd.get(topic)
        if i is None:
            if topic == self.ncmd:
                self.want_birth = True
            return
        seq = epoch = None
        try:
            for m in sp.Payload.FromString(payload).metrics:
                name = m.name
                if name == "instruction/seq":
                    seq = m.long_value
                elif name == "instruction/epoch":
                    epoch = m.long_value
        except Exception:  # noqa: BLE001 (a garbled command: refused, as a real node would)
            self.refused += 1
            return
        if seq is None:
            self.refused += 1
            return
        body = (self.ack[i] + long_metric(self.alias_ack_epoch[i], epoch or 0)
                + long_metric(self.alias_ack_seq[i], seq) + long_metric(self.alias_instr_seq[i], seq)
                + b"\x08" + varint(time.time_ns() // 1_000_000))
        with self.lock:
            if self.framed:
                self._queue(publish_packet(self.btopics[i], body + _SEQ[self._next()]))
            else:
                self.session.client.publish(self.topics[i], body + _SEQ[self._next()], 0)
        self.acks += 1

    async def run(self, stop: asyncio.Event) -> None:
        e = self.edge
        lk = e.link
        while not stop.is_set():
            e.bdseq = (e.bdseq + 1) % 256
            s = Session(f"{e.group}-{e.edge}", host=lk.host, port=lk.port, username=lk.username,
                        password=lk.password, tls=lk.tls, on_message=self.on_message, keepalive_s=lk.keepalive_s,
                        will=Will(sp.topic(e.group, "NDEATH", e.edge), e._death(), 1, False))
            try:
                await s.connect()
                await s.subscribe([(sp.topic(e.group, "NCMD", e.edge), 1), (sp.topic(e.group, "DCMD", e.edge, "+"), 1)])
            except Exception:  # noqa: BLE001 (the broker is not up yet: again shortly)
                s.close(clean=False)
                await asyncio.sleep(0.5)
                continue
            self.session = e.session = s
            self.want_birth = True
            loop = asyncio.get_running_loop()
            due = loop.time()
            while not stop.is_set() and not s.lost.is_set():
                if self.want_birth:
                    with self.lock:
                        self.want_birth = False
                        e.birth()  # the real codec: NBIRTH, every DBIRTH, seq 0..n
                        self.seq = e.seq
                self.tick()
                due += self.period_s
                if loop.time() > due + self.period_s:
                    self.skipped += 1
                    due = loop.time()  # behind by more than a tick: skip, as the real edge node does
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
                except asyncio.TimeoutError:
                    pass
            if stop.is_set() and s.connected:
                s.publish(sp.topic(e.group, "NDEATH", e.edge), e._death(), 1)
            s.close(clean=True)
            self.session = e.session = None


def main() -> int:
    from vbatt.config.plant import load_config
    from vbatt.drivers.mqtt.edge import fleet_edges

    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--edge", type=int, required=True)
    ap.add_argument("--rate", type=float, default=1.0, help="DDATA per device and second")
    ap.add_argument("--stats", help="write what was sent to this JSON file every second")
    ap.add_argument("--paho-publish", action="store_true", help="paho's publish() per message, not framed packets")
    a = ap.parse_args()
    cfg, fleet = load_config(a.config)
    edge = fleet_edges(cfg, fleet, only=a.edge)[0]
    r = Replay(edge, a.rate, lease_ms=int(cfg.drivers.mqtt.lease), framed=not a.paho_publish)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if a.stats:
            asyncio.create_task(stats(stop))
        await r.run(stop)

    async def stats(stop: asyncio.Event) -> None:
        import json
        import os

        while not stop.is_set():
            tmp = a.stats + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"t": time.monotonic(), "ddata": r.sent, "acks": r.acks, "skipped_ticks": r.skipped}, f)
            os.replace(tmp, a.stats)
            await asyncio.sleep(1.0)

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
