"""The controller's MQTT driver: the Sparkplug B host application (docs/mqtt.md).

One broker session per I/O process (drivers/aio.py's `Links` with one link: connect, retried with
backoff, faults), one paho network thread that decodes every message as it arrives (`on_message`,
under a lock), and the asyncio loop that stages the newest values for the scan every `publish_ms`
and sends each device its instruction as a DCMD when it matters (`send_due`): when it moved by more
than `deadband_w` since the last DCMD to that device (at once), when half the lease has passed since
then (a renewal, so the lease never runs out on a healthy link) and when the device births (it may
have restarted); never twice within `command_min_ms`. Each DCMD carries the newest sequence number,
so the edge node's ordering (never older, never twice) is unchanged; a scan cycle whose instruction
is within the deadband sends nothing. No resend of an unacknowledged DCMD: QoS 0 loses messages
only with a connection, and every reconnect ends in births (the instruction again); a DCMD lost
otherwise is repaired by the next renewal. A resend on a late acknowledgement would feed an
overloaded host more work exactly when its acknowledgements come late.

Host duties: STATE birth (retained JSON, Sparkplug 3.0 `spBv1.0/STATE/<host_id>`) after subscribing,
STATE death as the will and before a clean disconnect; subscribe to the births, data and deaths of
every group (`spBv1.0/<group>/<type>/+[/+]`), or of its own edge nodes only when it is one of several
host processes (then the first owns the STATE, docs/mqtt.md "Several host processes");
NBIRTH/DBIRTH give each device's aliases and types; seq checked per edge node (a gap asks for a
rebirth, at most every `rebirth_min_ms`); data without a birth asks for a rebirth; NDEATH (with the
bdSeq of the current birth) and DDEATH mark devices CONNECTION; silence longer than `silence_ms`
marks TIMEOUT; a payload that does not parse, or a metric vbatt does not know, marks that device
GARBLED with the reason; values outside the field table's range are BAD_VALUE. Nothing of one
device touches another.

On an orderly stop, after the link's last round, every device that holds a lease is handed back (its
last DCMD once more with seq 0: `status/mode` RELEASED, no lease left to run out) and one line says
how many were and which were not (`goodbye`, `hand_back_report`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time

import numpy as np

from vbatt.kernel.fields import node_field

from vbatt.drivers.aio import LOG_NAMES, AsyncDriver, LinkError, Links
from vbatt.drivers.base import IoContext
from vbatt.drivers.faults import Fault
from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.mqtt import sparkplug as sp
from vbatt.drivers.mqtt.client import Session, Will
from vbatt.drivers.mqtt.config import member_topic, mqtt_nodes
from vbatt.drivers.mqtt.edge import Link

__all__ = ["Host", "MqttDriver"]

log = logging.getLogger("vbatt.mqtt")

DM = sp.DEVICE_METRICS
FIELDS = tuple(m.field for m in DM if m.field is not None and not m.name.startswith("instruction/"))
KNOWN = {m.name: j for j, m in enumerate(DM)}
STATUS = {m.name: m for m in sp.STATUS_METRICS}
OUTPUTS = tuple(m.field for m in sp.COMMAND_METRICS if m.field)
SENT_KEPT = 8
HAND_BACK_WAIT_S = 2.0  # at the stop, how long the host waits for its devices to answer the hand-back


class _Edge:
    __slots__ = ("devices", "bdseq", "next_seq", "born", "rebirth_at", "gaps")

    def __init__(self):
        self.devices: list[int] = []
        self.bdseq = -1
        self.next_seq = -1
        self.born = False
        self.rebirth_at = 0.0
        self.gaps = 0


class Host(Links):
    """The host application for `nodes` (group, edge node, device) on one broker link."""

    log = log
    spread = False
    drop_on_error = True

    def __init__(self, nodes: list[tuple[str, str, str]], link: Link, *, host_id: str, lease_ms: float,
                 command_ms: float, silence_ms: float, rebirth_min_ms: float = 2000.0,
                 backoff_s: tuple[float, float] = (0.25, 4.0), round_s: float = 0.05, clock_ns=time.monotonic_ns,
                 trust_timestamps: bool = True, deadband_w: float = 5.0, command_min_ms: float = 100.0,
                 member: str | None = None, members: tuple[str, ...] = (), per_edge: bool = False):
        """member: this process is host process `member` of several, not the STATE owner (publishes no STATE,
        says it is alive on its member topic instead); members: the others' ids, when this one owns the STATE
        (online only while every one of them is alive); per_edge: subscribe to its own edge nodes only."""
        super().__init__(1, interval_s=round_s, backoff_s=backoff_s)
        self.member, self.members, self.per_edge = member, tuple(members), per_edge
        self.alive: set[str] = set()  # the members whose topic says online (owner)
        self.state_online = False  # what this owner last published on its STATE
        self.state_ts = 0
        self._member_topics = {member_topic(host_id, m).encode(): m for m in self.members}
        self._state_topic = f"{sp.NAMESPACE}/STATE/{host_id}".encode()
        n = self.nodes_n = len(nodes)
        self.nodes, self.link, self.host_id = nodes, link, host_id
        self.lease_ms, self.command_s, self.silence_ns = int(lease_ms), command_ms / 1e3, int(silence_ms * 1e6)
        self.renew_s = lease_ms / 2e3
        self.command_min_s = command_min_ms / 1e3
        self.deadband_w = float(deadband_w)
        self.round_s = round_s
        self.rebirth_min_s = rebirth_min_ms / 1e3
        self.clock_ns = clock_ns
        self.trust_timestamps = trust_timestamps
        self.lock = threading.Lock()
        self.session: Session | None = None
        self.epoch = time.time_ns() // 1_000_000  # orders this process's sequence numbers after any earlier run's
        self.values = {k: np.zeros(n) for k in FIELDS}
        self.got_ns = np.zeros(n, np.int64)
        self.sampled_ms = np.zeros(n, np.int64)  # the payload timestamp of the newest data (the edge's clock)
        self.fault = np.full(n, int(Fault.NO_DATA), np.uint32)
        self.why = ["no birth yet"] * n
        self.requests = np.zeros(n, np.uint64)  # DCMDs and rebirth requests sent
        self.errors = np.zeros(n, np.uint64)
        self.messages = np.zeros(n, np.uint64)
        self.rtt_ms = np.zeros(n)
        self.status = {k: np.zeros(n) for k in STATUS}
        self.sent_seq = np.zeros(n, np.uint64)
        # the last SENT_KEPT DCMDs of each node (sequence number, send time): an acknowledgement that comes
        # after the next DCMD went out still finds its own
        self.sent_hist_seq = np.zeros((n, SENT_KEPT), np.uint64)
        self.sent_hist_ns = np.zeros((n, SENT_KEPT), np.int64)
        self.aliases: list[dict[int, tuple[int, int]] | None] = [None] * n
        self.suspect = np.zeros(n, bool)  # sent something garbled: ignored until its next DBIRTH
        self.edges: dict[tuple[str, str], _Edge] = {}
        self._dev_topics: dict[bytes, tuple[str, int]] = {}
        for i, (g, e, d) in enumerate(nodes):
            self.edges.setdefault((g, e), _Edge()).devices.append(i)
            for kind in ("DBIRTH", "DDATA", "DDEATH"):
                self._dev_topics[sp.topic(g, kind, e, d).encode()] = (kind, i)
        self._edge_topics: dict[bytes, tuple[str, _Edge, tuple[str, str]]] = {}
        for (g, e), ed in self.edges.items():
            for kind in ("NBIRTH", "NDATA", "NDEATH"):
                self._edge_topics[sp.topic(g, kind, e).encode()] = (kind, ed, (g, e))
        self.groups = sorted({g for g, _e, _d in nodes})
        self._dcmd = [sp.topic(g, "DCMD", e, d) for g, e, d in nodes]
        self.have_instruction = False
        self._instr = np.zeros((n, len(OUTPUTS)))
        self._seq = 0
        self.born = np.zeros(n, bool)  # aliases[i] is not None: a DCMD can go to it
        self.sent_w = np.full((n, len(OUTPUTS)), np.nan)  # the outputs of each device's last DCMD
        self._out_w = np.full((n, len(OUTPUTS)), np.nan)  # ... and their encoding, kept for the renewals
        self._out_pb: list[bytes] = [b""] * n
        self.sent_at = np.full(n, -np.inf)  # loop time of each device's last DCMD
        self.force = np.zeros(n, bool)  # births: the newest instruction at once
        self._last_round = 0.0
        self.dcmd = {"changed": 0, "renewed": 0, "birth": 0}  # DCMDs sent, by why
        self.suppressed = 0  # (device, scan instruction) pairs not sent: within the deadband
        self.logged = np.full(n, int(Fault.NO_DATA), np.uint32)  # the start (no birth yet) is no news
        self.reasons = ["no birth yet"] * n  # each node's fault in words, as the last fill saw it
        self.gaps = 0
        self.rebirths = 0
        self.foreign = 0  # messages for devices not configured here
        self.handed_back = np.zeros(n, bool)  # at the stop: answered status/mode RELEASED to the hand-back
        self.not_handed_back: dict[int, str] = {}  # at the stop: held a lease, not handed back (why)

    # -- messages (paho's thread) ----------------------------------------------------------------------
    def on_message(self, topic: bytes, payload: bytes) -> None:
        now = self.clock_ns()
        with self.lock:
            hit = self._dev_topics.get(topic)
            if hit is not None:
                self._device(hit[0], hit[1], payload, now)
                return
            hit = self._edge_topics.get(topic)
            if hit is not None:
                self._edge(hit[0], hit[1], hit[2], payload)
                return
            m = self._member_topics.get(topic)
            if m is not None:
                self._member(m, payload)
                return
            if topic != self._state_topic:  # its own STATE comes back: no news
                self.foreign += 1

    def _member(self, m: str, payload: bytes) -> None:
        """Owner: host process m came or went. The STATE is online only while every process is alive, so an
        edge node never trusts a host of which a part is dead (docs/mqtt.md "Several host processes")."""
        try:
            online = bool(json.loads(payload)["online"])
        except (ValueError, KeyError, TypeError):
            online = False  # unreadable: not alive
        (self.alive.add if online else self.alive.discard)(m)
        log.info("host process %s of %s: %s", m, self.host_id, "online" if online else "offline")
        self._publish_state()

    def _publish_state(self) -> None:
        want = self.member is None and len(self.alive) == len(self.members)
        s = self.session
        if s is None or want == self.state_online:
            return
        self.state_online = want
        # one timestamp per session (that of its will): an edge node that keeps the newest STATE by timestamp
        # must still take the will after an offline/online in between
        s.publish(f"{sp.NAMESPACE}/STATE/{self.host_id}", sp.state_payload(want, self.state_ts), 1, True)

    def _parse(self, payload: bytes, i: int | None, what: str):
        try:
            return sp.Payload.FromString(payload)
        except Exception as exc:  # noqa: BLE001 (protobuf's DecodeError and friends)
            if i is not None:
                self._bad(i, Fault.GARBLED, f"{what}: payload is no Sparkplug B protobuf ({type(exc).__name__})")
            else:
                log.warning("%s: payload is no Sparkplug B protobuf", what)
            return None

    def _bad(self, i: int, fault: Fault, why: str) -> None:
        self.fault[i] = int(fault)
        self.why[i] = why
        self.errors[i] += 1
        if fault == Fault.GARBLED:
            # what it says can no longer be trusted: faulty until it births again, and asked to
            self.suspect[i] = True
            g, e, _d = self.nodes[i]
            self._rebirth((g, e), self.edges[(g, e)])

    def _seq_ok(self, ed: _Edge, key, p) -> None:
        if not p.HasField("seq") or ed.next_seq < 0:
            return
        if p.seq != ed.next_seq:
            ed.gaps += 1
            self.gaps += 1
            log.info("edge %s/%s: seq %d, expected %d: rebirth", key[0], key[1], p.seq, ed.next_seq)
            self._rebirth(key, ed)
        ed.next_seq = (p.seq + 1) % 256

    def _rebirth(self, key, ed: _Edge) -> None:
        now = time.monotonic()
        if now - ed.rebirth_at < self.rebirth_min_s or self.session is None:
            return
        ed.rebirth_at = now
        self.rebirths += 1
        self.requests[ed.devices] += 1  # a request to each of its devices, as a DCMD is
        p = sp.Payload(timestamp=time.time_ns() // 1_000_000)
        p.metrics.add(name=sp.REBIRTH.name, datatype=sp.REBIRTH.datatype, boolean_value=True)
        self.session.publish(sp.topic(key[0], "NCMD", key[1]), p.SerializeToString(), 0)

    def _edge(self, kind: str, ed: _Edge, key, payload: bytes) -> None:
        p = self._parse(payload, None, f"{kind} of edge {key[0]}/{key[1]}")
        if p is None:
            for i in ed.devices:
                self._bad(i, Fault.GARBLED, f"{kind} of its edge node is no Sparkplug B protobuf")
            return
        bd = next((m.long_value for m in p.metrics if m.name == sp.BDSEQ.name), None)
        if kind == "NBIRTH":
            ed.bdseq = -1 if bd is None else bd
            ed.born = True
            ed.next_seq = (p.seq + 1) % 256
            return
        if kind == "NDEATH":
            if bd is not None and ed.bdseq >= 0 and bd != ed.bdseq:
                return  # the will of an older session: this one is alive
            ed.born = False
            ed.next_seq = -1
            for i in ed.devices:
                self.fault[i] = int(Fault.CONNECTION)
                self.why[i] = f"edge node {key[1]} sent NDEATH (bdSeq {bd}): it lost its broker connection"
                self.aliases[i], self.born[i] = None, False
            return
        if not ed.born:
            self._rebirth(key, ed)
            return
        self._seq_ok(ed, key, p)

    def _device(self, kind: str, i: int, payload: bytes, now: int) -> None:
        g, e, d = self.nodes[i]
        ed = self.edges[(g, e)]
        p = self._parse(payload, i, f"{kind} of {g}/{e}/{d}")
        if p is None:
            return
        self.messages[i] += 1
        if kind == "DDEATH":
            self.fault[i] = int(Fault.CONNECTION)
            self.why[i] = f"device {d} sent DDEATH"
            self.aliases[i], self.born[i] = None, False
            self._seq_ok(ed, (g, e), p)
            return
        if kind == "DBIRTH":
            if not ed.born:
                self._rebirth((g, e), ed)
            else:
                self._seq_ok(ed, (g, e), p)
            amap: dict[int, tuple] = {}
            names = set()
            for m in p.metrics:
                j = KNOWN.get(m.name)
                if j is None:
                    self._bad(i, Fault.GARBLED, f"DBIRTH carries metric {m.name!r}, which vbatt does not know "
                                                f"(expected the metrics of docs/mqtt.md)")
                    self.aliases[i], self.born[i] = None, False
                    return
                names.add(m.name)
                if m.HasField("alias"):
                    amap[m.alias] = self._slot(j, m.datatype)
            missing = [f for f in FIELDS if f not in names]
            if missing:
                self._bad(i, Fault.GARBLED, f"DBIRTH lacks the metrics {missing}")
                self.aliases[i], self.born[i] = None, False
                return
            self.aliases[i] = amap
            self.born[i] = True
            self.force[i] = True  # a device that births may have restarted: its instruction at once
            self.suspect[i] = False
            self._store(i, p, None, now)
            return
        amap = self.aliases[i]
        if amap is None or not ed.born:
            if self.fault[i] in (0, Fault.TIMEOUT):
                self.fault[i] = int(Fault.NO_DATA)
                self.why[i] = "data before a birth: rebirth requested"
            self._rebirth((g, e), ed)
            return
        self._seq_ok(ed, (g, e), p)
        if not self.suspect[i]:
            self._store(i, p, amap, now)

    def _slot(self, j: int, dt: int) -> tuple:
        """Where metric j of datatype dt goes, resolved once per birth: (array or None, value attribute or None,
        sign bits, is status/ack_seq, j, dt)."""
        d = DM[j]
        attr = sp.VALUE_FIELD.get(dt)
        if attr is not None and attr not in ("int_value", "long_value", "float_value", "double_value",
                                             "boolean_value"):
            attr = None  # a string is no number: garbled when it comes
        arr = (self.values[d.field] if d.field is not None and not d.name.startswith("instruction/")
               else self.status.get(d.name))
        return arr, attr, sp.SIGNED_BITS.get(dt, 0), d.name == "status/ack_seq", j, dt

    def _store(self, i: int, p, amap, now: int) -> None:
        ack = False
        for m in p.metrics:
            name = m.name
            if amap is not None and not name:
                hit = amap.get(m.alias)
                if hit is None:
                    self._bad(i, Fault.GARBLED, f"metric alias {m.alias} is not in its birth")
                    return
            else:
                j = KNOWN.get(name)
                if j is None:
                    self._bad(i, Fault.GARBLED, f"metric {name!r} is not one vbatt knows")
                    return
                hit = self._slot(j, m.datatype or DM[j].datatype)
            arr, attr, bits, is_ack, j, dt = hit
            if attr is None:
                self._bad(i, Fault.GARBLED, f"metric {DM[j].name!r} has datatype {dt}")
                return
            if arr is None:
                continue
            if m.is_null:
                arr[i] = np.nan
            else:
                v = getattr(m, attr)
                if bits and v >= 1 << (bits - 1):
                    v -= 1 << bits
                arr[i] = v
            if is_ack:
                ack = True
        arrived = now
        ts = p.timestamp
        if ts:
            self.sampled_ms[i] = ts
            if self.trust_timestamps:
                # the data is as old as the node says, not as old as its arrival: a backlog in the broker or
                # in this process must age it toward stale, not pass it off as fresh
                age_ms = time.time_ns() // 1_000_000 - ts
                if age_ms > 0:
                    now = max(1, now - age_ms * 1_000_000)
        if ack:
            hit = np.flatnonzero((self.sent_hist_seq[i] == self.status["status/ack_seq"][i])
                                 & (self.sent_hist_ns[i] > 0))
            if len(hit):
                k = hit[0]
                self.rtt_ms[i] = (arrived - self.sent_hist_ns[i, k]) / 1e6
                self.sent_hist_ns[i, k] = 0  # once per instruction: later renewals' acks are no round trip of it
        self.got_ns[i] = now
        if self.fault[i] != 0:
            self.fault[i] = 0
            self.why[i] = ""

    # -- the link (the asyncio loop) -------------------------------------------------------------------
    def counted(self, k: int, fault: Fault) -> None:
        self.errors += 1  # the broker link failed: a failed exchange for every node behind it

    def describe(self, k: int) -> str:
        return f"broker {self.link.host}:{self.link.port}"

    def connected(self, k: int) -> bool:
        # a session that was lost still counts until exchange() reports the loss: the reconnect then waits
        # for the backoff instead of starting at once
        return self.session is not None

    async def connect(self, k: int) -> None:
        await self.disconnect(k)
        state = f"{sp.NAMESPACE}/STATE/{self.host_id}"
        ts = self.state_ts = time.time_ns() // 1_000_000
        if self.member is None:
            will = Will(state, sp.state_payload(False, ts), 1, True)
        else:
            will = Will(member_topic(self.host_id, self.member), sp.state_payload(False, ts), 1, True)
        s = Session(f"vbatt-host-{self.host_id}-{self.member or 0}-{id(self) & 0xFFFF:x}", host=self.link.host,
                    port=self.link.port, username=self.link.username, password=self.link.password,
                    tls=self.link.tls, on_message=self.on_message, keepalive_s=self.link.keepalive_s, will=will)
        with self.lock:
            self.session, self.state_online = s, False
            self.alive.clear()
        with self.lock:
            for ed in self.edges.values():
                ed.born, ed.next_seq, ed.rebirth_at = False, -1, 0.0
            self.aliases = [None] * self.nodes_n
            self.born[:] = False
            self.suspect[:] = False
            self.fault[:] = int(Fault.NO_DATA)
            self.why = ["waiting for a birth after connecting to the broker"] * self.nodes_n
        await s.connect()
        # what the edge nodes send, by message type: a `#` would bring back every NCMD and DCMD this host sends
        # (MQTT 3.1.1 has no "no local"), a message in per DCMD out for nothing
        at = [(g, e) for g, e in self.edges] if self.per_edge else [(g, "+") for g in self.groups]
        subs = [(f"{sp.NAMESPACE}/{g}/{kind}/{e}{'/+' if kind[0] == 'D' else ''}", 0)
                for g, e in at for kind in ("NBIRTH", "NDATA", "NDEATH", "DBIRTH", "DDATA", "DDEATH")]
        if self.member is None:
            subs += [(state, 1)] + [(member_topic(self.host_id, m), 1) for m in self.members]
        await s.subscribe(subs)
        with self.lock:
            if self.member is None:
                self._publish_state()  # online now when alone; else once every member's topic says online
            else:
                s.publish(member_topic(self.host_id, self.member), sp.state_payload(True, ts), 1, True)
            for key, ed in self.edges.items():
                self._rebirth(key, ed)

    async def disconnect(self, k: int) -> None:
        s, self.session = self.session, None
        if s is not None:
            if s.connected and (self.member is not None or self.state_online):  # an offline STATE stays
                topic = (f"{sp.NAMESPACE}/STATE/{self.host_id}" if self.member is None
                         else member_topic(self.host_id, self.member))
                s.publish(topic, sp.state_payload(False, self.state_ts), 1, True)
            await asyncio.to_thread(s.close, True)

    async def exchange(self, k: int) -> None:
        s = self.session
        if s is None or s.lost.is_set():
            raise LinkError(Fault.CONNECTION, s.lost_reason if s is not None else "not connected")
        self.clear(0)
        if self.have_instruction:
            self.send_due(asyncio.get_running_loop().time())

    def set_instruction(self, seq: int, outputs: dict[str, np.ndarray]) -> None:
        if seq == ss.RELEASE_SEQ:  # every DCMD of it would hand the devices back instead of instructing them
            raise ValueError(f"instruction seq {seq} is the hand-back (sunspec.RELEASE_SEQ): scan cycles count from 1")
        instr = np.column_stack([np.nan_to_num(outputs[k]) for k in OUTPUTS])
        if self.have_instruction:
            # each device's new scan instruction that send_due will not send: within the deadband of its last DCMD
            self.suppressed += int((self.born & ~self._moved(instr)).sum())
        self._instr = instr
        self._seq = int(seq)
        self.have_instruction = True

    def _moved(self, instr: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return ~(np.abs(instr - self.sent_w) <= self.deadband_w).all(axis=1)  # never sent (NaN): moved

    def send_due(self, now: float) -> int:
        """A DCMD to every born device whose instruction moved beyond the deadband, whose lease is half gone,
        or that birthed; returns how many."""
        with self.lock:  # births set `force` in paho's thread
            force = self.force & self.born
            self.force[force] = False
        since = now - self.sent_at
        spaced = since >= self.command_min_s
        changed = self.born & spaced & self._moved(self._instr) & ~force
        renew = self.born & (since >= self.renew_s) & ~changed & ~force
        # renewals due together (every device sent at once after a start) go out over a quarter of the lease,
        # the oldest first, and stay spread afterwards: bursts of DCMDs and of acknowledgements delay the data.
        # The allowance grows with the time since the last round (a late round sends more), and a renewal
        # three quarters of a lease old goes whatever the allowance
        elapsed = min(max(self.round_s, now - self._last_round), self.renew_s)
        self._last_round = now
        cap = int(np.ceil(2 * self.nodes_n * elapsed / self.renew_s))
        r = np.flatnonzero(renew)
        if len(r) > cap:
            urgent = since[r] >= 1.5 * self.renew_s
            rest = r[~urgent]
            k = max(0, cap - int(urgent.sum()))
            r = np.concatenate([r[urgent], rest[np.argpartition(self.sent_at[rest], k)[:k]] if k < len(rest) else rest])
        due = np.concatenate([np.flatnonzero(force), np.flatnonzero(changed), r])
        if not len(due):
            return 0
        self.dcmd["birth"] += int(force.sum())
        self.dcmd["changed"] += int(changed.sum())
        self.dcmd["renewed"] += len(r)
        self._send(due, now)
        return len(due)

    def _head(self, seq: int, timestamp_ms: int) -> bytes:
        """The part every DCMD of a round shares, encoded: its timestamp, seq, lease and this host's epoch."""
        p = sp.Payload(timestamp=timestamp_ms)
        p.metrics.add(name="instruction/seq", datatype=sp.DataType.UInt64, long_value=seq)
        p.metrics.add(name="instruction/lease_ms", datatype=sp.DataType.UInt32, int_value=self.lease_ms)
        p.metrics.add(name="instruction/epoch", datatype=sp.DataType.UInt64, long_value=self.epoch)
        return p.SerializeToString()

    def _send(self, due: np.ndarray, now: float) -> None:
        s = self.session
        t_ns = self.clock_ns()
        instr = self._instr
        # a DCMD is two encoded Payloads one after the other, which protobuf reads as one (its metrics appended):
        # what every DCMD of this round shares (timestamp, seq, lease, epoch), then the device's outputs, encoded
        # again only when they changed
        # stamped at the instant the round decided (`now`, the loop's monotonic clock), not later: a DCMD
        # held up in between (a loaded machine) would otherwise look sent closer to the last than it was
        decided_ms = time.time_ns() // 1_000_000 - max(0, int((time.monotonic() - now) * 1e3))
        head = self._head(self._seq, decided_ms)
        stale = due[~(self._out_w[due] == instr[due]).all(axis=1)]
        for i in stale.tolist():
            p = sp.Payload()
            for j, k in enumerate(OUTPUTS):
                p.metrics.add(name="instruction/" + k, datatype=sp.DataType.Double, double_value=float(instr[i, j]))
            self._out_pb[i] = p.SerializeToString()
        self._out_w[stale] = instr[stale]
        out = self._out_pb
        for i in due.tolist():
            # noted before the publish: paho's thread may take the device's acknowledgement before this
            # thread runs again (seen on a loaded machine: a round trip that never counted)
            if self.sent_seq[i] != self._seq:
                self.sent_seq[i] = self._seq
                k = int(self.requests[i]) % SENT_KEPT
                self.sent_hist_seq[i, k] = self._seq
                self.sent_hist_ns[i, k] = t_ns
            s.publish(self._dcmd[i], head + out[i], 0)
        self.requests[due] += 1
        self.sent_w[due] = instr[due]
        self.sent_at[due] = now

    # -- for the scan --------------------------------------------------------------------------------
    def fill(self, staging: dict[str, np.ndarray]) -> None:
        now = self.clock_ns()
        with self.lock:
            fault = self.fault.copy()
            vals = {k: v.copy() for k, v in self.values.items()}
            got = self.got_ns.copy()
            why = self.why
        # a reason is worded when its fault begins and kept while it lasts: a fleet gone silent together
        # must not cost a sentence per node at every fill
        prev = self.reasons
        if self.comm_fault[0]:
            fault[:] = self.comm_fault[0]
            reasons = [self.reason[0]] * self.nodes_n
        else:
            reasons = list(why)
            silent = (fault == 0) & (got > 0) & (now - got > self.silence_ns)
            fault[silent] = int(Fault.TIMEOUT)
            held = silent & (self.logged == Fault.TIMEOUT)
            for i in np.flatnonzero(held).tolist():
                reasons[i] = prev[i]
            for i in np.flatnonzero(silent & ~held):
                reasons[i] = f"no data for {(now - got[i]) / 1e6:.0f} ms (silent without NDEATH)"
        for name in FIELDS:
            f = node_field(name)
            v = vals[name]
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(v) | (v < f.lo) | (v > f.hi)
            new = bad & (fault == 0)
            fault[new] = int(Fault.BAD_VALUE)
            held = new & (self.logged == Fault.BAD_VALUE)
            for i in np.flatnonzero(held).tolist():
                reasons[i] = prev[i]
            for i in np.flatnonzero(new & ~held):
                reasons[i] = f"{name} = {float(v[i])!r} (expected a number in [{f.lo:g}, {f.hi:g}] {f.unit})"
            vals[name] = np.where(bad, 0.0, v)
        moved = np.flatnonzero(fault != self.logged)
        for i in moved[:5]:  # a few by name; a fleet that changes at once in one line per fault
            if fault[i]:
                log.warning("node %s/%s/%s: %s: %s", *self.nodes[i], Fault(int(fault[i])).name, reasons[i])
            else:
                log.info("node %s/%s/%s: data again", *self.nodes[i])
        if len(moved) > 5:
            for code in np.unique(fault[moved]):
                k = moved[fault[moved] == code]
                (log.warning if code else log.info)("%d nodes (%s, ...): %s", len(k), self.nodes[k[0]][2],
                                                    Fault(int(code)).name if code else "data again")
        self.logged[:] = fault
        self.reasons = reasons
        for k, v in vals.items():
            staging[k][:] = v
        staging["fault"][:] = fault
        staging["updated_ns"][:] = np.where(fault == 0, got, 0)
        staging["io_requests"][:] = self.requests
        staging["io_errors"][:] = self.errors
        staging["io_latency_ms"][:] = self.rtt_ms

    # -- the orderly stop ---------------------------------------------------------------------------------
    async def goodbye(self, k: int) -> None:
        """The link's last round is over (an orderly stop): every device that holds a lease of this host (a DCMD
        went to it less than a lease ago) is handed back: its last DCMD once more, with seq 0
        (sunspec.RELEASE_SEQ) and this host's epoch. Each answers `status/mode` RELEASED in a DDATA at once; the
        host waits for those answers for at most HAND_BACK_WAIT_S (a device that does not answer may still have
        taken it: its edge node says so as it stops). A device it cannot reach (no session, its edge node
        dead or not born again) keeps the lease of its last instruction, which then runs out on the node."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        with self.lock:
            leased = np.flatnonzero(self.sent_at > now - self.lease_ms / 1e3)
            s = self.session
            if s is None or s.lost.is_set() or not s.connected:
                why = s.lost_reason if s is not None and s.lost_reason else "not connected"
                for i in leased.tolist():
                    self.not_handed_back[i] = f"the broker link is down ({why})"
                return
            for i in leased[~self.born[leased]].tolist():
                self.not_handed_back[i] = self.why[i] or "not born"
            due = leased[self.born[leased]]
            heard = self.messages[due].copy()
        if not len(due):
            return
        head = self._head(ss.RELEASE_SEQ, time.time_ns() // 1_000_000)
        try:
            queued = np.array([s.publish(self._dcmd[i], head + self._out_pb[i], 0)  # the outputs it was sent last
                               for i in due.tolist()], bool)
            self.requests[due] += 1
            mode = self.status["status/mode"]
            deadline = now + HAND_BACK_WAIT_S
            while not (mode[due] == ss.Mode.RELEASED).all() and loop.time() < deadline and not s.lost.is_set():
                await asyncio.sleep(self.round_s)
        except Exception as exc:  # noqa: BLE001 (the last word must not end the stop)
            for i in due.tolist():
                self.not_handed_back[i] = f"{type(exc).__name__}: {exc}"
            return
        with self.lock:
            for i, was, sent in zip(due.tolist(), heard.tolist(), queued.tolist()):
                m = float(self.status["status/mode"][i])
                if m == ss.Mode.RELEASED:
                    self.handed_back[i] = True
                elif not sent:
                    self.not_handed_back[i] = f"its DCMD could not be sent ({s.lost_reason or 'the session refused it'})"
                elif self.messages[i] == was:
                    self.not_handed_back[i] = (f"the broker link dropped before it answered ({s.lost_reason})"
                                               if s.lost.is_set() else f"no answer within {HAND_BACK_WAIT_S:g} s")
                else:  # an edge node that does not know the hand-back refused it (an older (epoch, seq))
                    name = sp.MODE[int(m)] if m in range(len(sp.MODE)) else str(m)
                    self.not_handed_back[i] = (f"it answered status/mode {name}, not RELEASED (an edge node without "
                                               f"the hand-back)")

    def hand_back_report(self) -> None:
        """One line: how many devices were handed back, how many not and why (the first few by name)."""
        n = int(self.handed_back.sum())
        items = sorted(self.not_handed_back.items())
        s = "s" if n != 1 else ""
        if not items:
            if n:
                log.info("%d device%s handed back to their own control (status/mode RELEASED): no lease is left to "
                         "run out", n, s)
            return
        names = ", ".join(f"{'/'.join(self.nodes[i])} ({why})" for i, why in items[:LOG_NAMES])
        more = f" and {len(items) - LOG_NAMES} more" if len(items) > LOG_NAMES else ""
        log.warning("%d device%s handed back to their own control (status/mode RELEASED), %d not at the stop: %s%s: "
                    "the lease of their last instruction (%d ms) runs out", n, s, len(items), names, more,
                    self.lease_ms)


class MqttDriver(AsyncDriver):
    kind = "mqtt"

    async def open_links(self, io: IoContext) -> Host:
        d = self.cfg.drivers.mqtt
        every = mqtt_nodes(self.cfg, self.fleet)
        nodes = [every.get(i, (d.group, "?", self.fleet.ids[i])) for i in range(self.start, self.stop)]
        bad = None
        try:
            link = Link.of(d)
        except (OSError, ValueError) as exc:
            link, bad = Link(d.host, d.port, None, d.username, None), f"cannot load the TLS files: {exc}"
        if not d.secured:
            bad = "no TLS configured and plaintext not allowed: set drivers.mqtt.tls or 'plaintext: true'"
        # the host processes: the image's partitions of MQTT nodes, named by their first node; the first owns
        # the STATE, the others are its members
        parts = [str(a) for a, _b in io.img.spec.partitions if a in every]
        me = str(self.start)
        owner = parts[0] if parts else me
        h = Host(nodes, link, host_id=d.host_id, lease_ms=d.lease, command_ms=d.command_ms,
                 silence_ms=d.silence_ms, rebirth_min_ms=d.rebirth_min_ms,
                 backoff_s=(d.reconnect_min_ms / 1e3, d.reconnect_max_ms / 1e3), trust_timestamps=d.trust_timestamps,
                 deadband_w=d.deadband_w, command_min_ms=d.command_min_ms,
                 member=None if me == owner else me, members=tuple(p for p in parts if p != owner) if me == owner else (),
                 per_edge=len(parts) > 1)
        self._bad = bad
        if bad:
            h.mark(0, Fault.TLS, bad)
        self.period_s = d.publish_ms / 1e3
        return h

    def active(self) -> list[int]:
        return [] if self._bad else [0]

    def instruct(self, cycle: int, outputs: dict[str, np.ndarray]) -> None:
        self.links.set_instruction(cycle, outputs)

    def stage(self, io: IoContext) -> bool:
        self.links.fill(io.staging)
        return True

    async def flush(self, new: bool) -> None:
        # The scan's last outputs went out with the rounds of the stop's grace; the link then handed every device
        # back (Host.goodbye). Another DCMD now would take them under control again, with a lease nobody renews.
        self.links.hand_back_report()
