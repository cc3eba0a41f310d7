"""A Sparkplug B edge node: battery nodes of an `AgentSet` published as its devices (docs/mqtt.md).

Sparkplug's edge node is the MQTT client, its devices the things behind it; here the edge node is
one `vbatt node` (one device, itself) or a slice of a `vbatt fleet` (one device per battery node, one
MQTT session for all of them), so a fleet process does not open a connection per node.

Per session: the will is the NDEATH with a new bdSeq; NBIRTH (seq 0, bdSeq, `Node Control/Rebirth`)
then a DBIRTH per device with every metric; then at every tick a DDATA per device with the metrics
that changed, and every metric at least every `period_ms`. seq runs 0..255 over all messages of
the edge node. An NCMD `Node Control/Rebirth` = true births everything again.

A DCMD is one instruction: `instruction/seq`, `instruction/lease_ms`, `instruction/epoch` and every
output field. It goes through the node agent's own `AgentSet.accept` (the same lease logic as over
Modbus: a lease that runs out makes the node autonomous). An instruction older than the one accepted
last ((epoch, seq) lower) is refused and counted: a replay after a broker restart is never applied;
the same (epoch, seq) renews the lease. The acknowledgement (`status/ack_seq`, mode, lease left) goes
out in a DDATA at once. A DCMD with seq 0 is the hand-back of a host that stops in order: the agent's
`AgentSet.release`, `status/mode` RELEASED at once, no expiry.

The agents keep their time while the broker is out of reach: a lease runs out on a node cut off from
its controller as it does on one whose controller died.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

import numpy as np

from vbatt.drivers.aio import Backoff, LinkError
from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.mqtt import sparkplug as sp
from vbatt.drivers.mqtt.client import Session, Will, tls_context
from vbatt.drivers.node.agent import AgentSet, stop_summary
from vbatt.kernel.signals import stop_on_signals

__all__ = ["EdgeNode", "Link"]

log = logging.getLogger("vbatt.mqtt.edge")

DM = sp.DEVICE_METRICS
COL = {m.name: j for j, m in enumerate(DM)}
INT_COLS = np.array([m.datatype not in (sp.DataType.Double, sp.DataType.Float) for m in DM])
_ATTR = [sp.VALUE_FIELD[m.datatype] for m in DM]
OUTPUTS = tuple(m.field for m in sp.COMMAND_METRICS if m.field)


class Link:
    """How to reach the broker: host, port, TLS context or None, user, password, keepalive."""

    def __init__(self, host: str, port: int, tls, username: str | None, password: str | None, keepalive_s: int = 10):
        self.host, self.port, self.tls, self.username, self.password = host, port, tls, username, password
        self.keepalive_s = keepalive_s

    @classmethod
    def of(cls, b, username: str | None = None, password: str | None = None) -> "Link":
        """From a BrokerLink config (its TLS files loaded now: a bad file is an error before anything runs)."""
        ctx = tls_context(b.tls.ca, b.tls.cert, b.tls.key) if b.tls is not None else None
        return cls(b.host, b.port, ctx, username or b.username, password or b.secret(), b.keepalive_s)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class EdgeNode:
    """Edge node `edge` of `group` publishing the nodes of `agents` as devices `devices` (same order)."""

    def __init__(self, agents: AgentSet, link: Link, *, group: str, edge: str, devices: list[str],
                 period_ms: float = 10_000.0, primary_host: str | None = None, reconnect_s=(0.25, 4.0)):
        if len(devices) != agents.n:
            raise ValueError(f"{len(devices)} device ids for {agents.n} nodes")
        self.agents, self.link = agents, link
        self.group, self.edge, self.devices = group, edge, list(devices)
        self.period_s = period_ms / 1e3
        self.primary_host = primary_host
        self.reconnect_s = reconnect_s
        n = agents.n
        self.epoch = np.zeros(n, np.uint64)  # epoch of the instruction accepted last
        self.refused = np.zeros(n, np.int64)
        self.applied: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # (epoch, seq) newly applied, in order
        self.sent = np.full((n, len(DM)), np.nan)  # what the host last got of each metric
        self.full_due = 0.0
        self.bdseq = -1
        self.seq = 0
        self.session: Session | None = None
        self.births = 0  # NBIRTHs sent (tests)
        self.connected = asyncio.Event()
        self._host_online = primary_host is None
        self._host_ts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dcmd = {sp.topic(group, "DCMD", edge, d).encode(): i for i, d in enumerate(devices)}
        self._ncmd = sp.topic(group, "NCMD", edge).encode()
        self._state = f"{sp.NAMESPACE}/STATE/{primary_host}".encode() if primary_host else None
        self._ddata = [sp.topic(group, "DDATA", edge, d) for d in devices]
        self._want_birth = False

    # -- values ----------------------------------------------------------------------------------------
    def values(self, now_ns: int, rows: np.ndarray | None = None) -> np.ndarray:
        """Every device metric of the nodes `rows` (all: None), one row each (order of DEVICE_METRICS)."""
        a, o = self.agents, self.agents.backend.offer
        r = slice(None) if rows is None else rows
        n = a.n if rows is None else len(rows)
        v = np.empty((n, len(DM)))
        for j, m in enumerate(DM):
            if m.field is not None and not m.name.startswith("instruction/"):
                v[:, j] = o[m.field][r]
            elif m.name.startswith("device/"):
                v[:, j] = o[m.name[7:]][r]
        mode = a.mode[r]
        v[:, COL["status/mode"]] = mode
        v[:, COL["status/alarm"]] = a.alarm[r]
        v[:, COL["status/ack_seq"]] = a.seq[r]
        v[:, COL["status/ack_epoch"]] = self.epoch[r]
        v[:, COL["status/lease_left_ms"]] = np.where(mode == ss.Mode.CONTROLLED,
                                                     np.clip((a.deadline_ns[r] - now_ns) // 1_000_000, 0, None), 0)
        v[:, COL["status/applied_w"]] = a.applied_w[r]
        v[:, COL["status/expiries"]] = a.expiries[r]
        v[:, COL["status/refused"]] = self.refused[r]
        v[:, COL["instruction/seq"]] = a.seq[r]
        v[:, COL["instruction/lease_ms"]] = a.lease_ms[r]
        v[:, COL["instruction/epoch"]] = self.epoch[r]
        for k in OUTPUTS:
            v[:, COL["instruction/" + k]] = a.cmd[k][r]
        return v

    def row(self, i: int, now_ns: int) -> np.ndarray:
        """values() of node i alone, with scalar reads: the acknowledgement path runs once per command."""
        a, o, ep = self.agents, self.agents.backend.offer, self.epoch
        mode = int(a.mode[i])
        left = max(0, (int(a.deadline_ns[i]) - now_ns) // 1_000_000) if mode == ss.Mode.CONTROLLED else 0
        status = {"status/mode": mode, "status/alarm": a.alarm[i], "status/ack_seq": a.seq[i],
                  "status/ack_epoch": ep[i], "status/lease_left_ms": left, "status/applied_w": a.applied_w[i],
                  "status/expiries": a.expiries[i], "status/refused": self.refused[i],
                  "instruction/seq": a.seq[i], "instruction/lease_ms": a.lease_ms[i], "instruction/epoch": ep[i]}
        return np.array([o[m.field][i] if m.field is not None and not m.name.startswith("instruction/")
                         else o[m.name[7:]][i] if m.name.startswith("device/")
                         else a.cmd[m.field][i] if m.field is not None
                         else status[m.name] for m in DM], np.float64)

    # -- messages --------------------------------------------------------------------------------------
    def _next_seq(self) -> int:
        s = self.seq
        self.seq = (s + 1) % 256
        return s

    def _publish(self, topic: str, p, qos: int = 0) -> None:
        if self.session is not None:
            self.session.publish(topic, p.SerializeToString(), qos)

    def _death(self) -> bytes:
        p = sp.Payload()
        p.timestamp = _now_ms()
        m = p.metrics.add(name=sp.BDSEQ.name, datatype=sp.BDSEQ.datatype)
        m.long_value = self.bdseq
        return p.SerializeToString()

    def _metric(self, p, d, value, alias: int, birth: bool):
        m = p.metrics.add(alias=alias)
        if birth:
            m.name, m.datatype = d.name, d.datatype
            if d.unit:
                m.properties.keys.append("engUnit")
                m.properties.values.add(type=sp.DataType.String, string_value=d.unit)
        if isinstance(value, float) and math.isnan(value):
            m.is_null = True
        else:
            sp.set_value(m, d.datatype, value)
        return m

    def birth(self) -> None:
        """NBIRTH then every DBIRTH (after a connect, or on a rebirth request)."""
        self.seq = 0
        ts = _now_ms()
        p = sp.Payload(timestamp=ts, seq=self._next_seq())
        self._metric(p, sp.BDSEQ, self.bdseq, 0, True)
        self._metric(p, sp.REBIRTH, False, 1, True)
        self._publish(sp.topic(self.group, "NBIRTH", self.edge), p)
        self.births += 1
        v = self.values(self.agents.clock_ns())
        for i, d in enumerate(self.devices):
            p = sp.Payload(timestamp=ts, seq=self._next_seq())
            base = (i + 1) * sp.ALIAS_STRIDE
            for j, m in enumerate(DM):
                self._metric(p, m, self._py(j, v[i, j]), base + j, True)
            self._publish(sp.topic(self.group, "DBIRTH", self.edge, d), p)
        self.sent[:] = v
        self.full_due = time.monotonic() + self.period_s
        self._want_birth = False

    @staticmethod
    def _py(j: int, x: float):
        if INT_COLS[j]:
            return 0 if math.isnan(x) else int(x)
        return float(x)

    def report(self, rows: list[int] | None = None, full: bool = False) -> int:
        """DDATA for every device (or `rows`) whose metrics changed; all of them when `full`. Returns messages."""
        if self.session is None or not self.session.connected or self._want_birth:
            return 0
        now_ns = self.agents.clock_ns()
        idx = np.arange(self.agents.n) if rows is None else np.asarray(rows, np.int64)
        v = self.row(int(idx[0]), now_ns)[None, :] if len(idx) == 1 else self.values(now_ns, idx)
        was = self.sent[idx]
        changed = ~((v == was) | (np.isnan(v) & np.isnan(was)))
        lease = COL["status/lease_left_ms"]
        changed[:, lease] = False  # counts down every tick: sent with the others, not alone
        if full:
            changed[:] = True
        ts = _now_ms()
        sent = 0
        for r in np.flatnonzero(changed.any(axis=1)):
            i = int(idx[r])
            cols = np.flatnonzero(changed[r])
            if not full:
                cols = np.append(cols, lease)
            p = sp.Payload(timestamp=ts, seq=self._next_seq())
            base = (i + 1) * sp.ALIAS_STRIDE
            row = v[r]
            for j in cols:
                m = p.metrics.add(alias=base + int(j))
                x = row[j]
                if x != x:
                    m.is_null = True
                elif INT_COLS[j]:
                    setattr(m, _ATTR[j], int(x))
                else:
                    m.double_value = x
            self._publish(self._ddata[i], p)
            self.sent[i, cols] = row[cols]
            sent += 1
        return sent

    # -- commands (the network thread hands them to the loop) -----------------------------------------
    def _on_message(self, topic: bytes, payload: bytes) -> None:
        self._loop.call_soon_threadsafe(self._command, topic, payload)

    def _command(self, topic: bytes, payload: bytes) -> None:
        if topic == self._state:
            try:
                st = json.loads(payload)
                online, ts = bool(st["online"]), int(st["timestamp"])
            except (ValueError, KeyError, TypeError):
                log.warning("edge %s: unreadable STATE of host %s: %r", self.edge, self.primary_host, payload[:80])
                return
            was = self._host_online
            self._host_online = online
            if online and (not was or ts != self._host_ts):
                self._host_ts = ts
                log.info("edge %s: primary host %s online: birth", self.edge, self.primary_host)
                self._want_birth = True
            return
        try:
            p = sp.Payload.FromString(payload)
        except Exception:  # noqa: BLE001 (protobuf's DecodeError, or worse)
            log.warning("edge %s: garbled command on %s", self.edge, topic.decode(errors="replace"))
            return
        if topic == self._ncmd:
            for m in p.metrics:
                if m.name == sp.REBIRTH.name and m.boolean_value:
                    log.info("edge %s: rebirth requested", self.edge)
                    self._want_birth = True
            return
        i = self._dcmd.get(topic)
        if i is not None:
            self.instruct(i, p)

    def instruct(self, i: int, p) -> str | None:
        """Device i takes the instruction in DCMD payload `p`; None, or why it was refused."""
        got: dict[str, float] = {}
        base = (i + 1) * sp.ALIAS_STRIDE
        for m in p.metrics:
            name = m.name if m.HasField("name") else (DM[m.alias - base].name
                                                      if 0 <= m.alias - base < len(DM) else "")
            j = COL.get(name)
            if j is None or not name.startswith("instruction/"):
                return self._refuse(i, f"metric {name or m.alias!r} is not an instruction metric")
            try:
                got[name[12:]] = sp.get_value(m, DM[j].datatype) if not m.is_null else math.nan
            except ValueError as exc:
                return self._refuse(i, str(exc))
        missing = [k for k in ("seq", "lease_ms", *OUTPUTS) if k not in got]
        if missing:
            return self._refuse(i, f"half an instruction: missing {missing}")
        key = (int(got.get("epoch", 0)), int(got["seq"]))
        last = (int(self.epoch[i]), int(self.agents.seq[i]))
        cmd = {k: float(got[k]) for k in OUTPUTS}
        if key[1] == ss.RELEASE_SEQ:
            return self._hand_back(i, key[0], int(got["lease_ms"]), cmd)
        if self.agents.mode[i] != ss.Mode.WAITING and key < last:
            return self._refuse(i, f"instruction {key} is older than the one accepted last {last}")
        why = self.agents.accept(i, key[1], int(got["lease_ms"]), cmd)
        if why is not None:
            return self._refuse(i, why)
        if key != last or not self.applied[i]:
            self.applied[i].append(key)
            del self.applied[i][:-64]
        self.epoch[i] = key[0]
        self.agents.applied_w[i] = self.agents.cmd["battery_w"][i]  # controlled now: applied now, not at the tick
        self.report([i])  # the acknowledgement, at once
        return None

    def _hand_back(self, i: int, epoch: int, lease: int, cmd: dict[str, float]) -> str | None:
        """Device i is handed back by a host that stops in order (seq 0): the node agent's own `release`, as over
        Modbus. It ends the instruction of its own epoch or a later one; one of an earlier epoch is a replay of an
        earlier controller's stop (a broker restart), refused as an older instruction is. Its seq, 0, is no
        instruction: `status/ack_seq` and `status/ack_epoch` keep the one the node followed, and the next
        instruction (seq > 0) of that epoch or a later one takes the node back."""
        if epoch < int(self.epoch[i]):
            return self._refuse(i, f"hand-back of epoch {epoch} is older than the instruction accepted last "
                                   f"(epoch {int(self.epoch[i])})")
        why = self.agents.release(i, lease, cmd)
        if why is not None:
            return self._refuse(i, why)
        self.report([i])  # RELEASED, at once
        return None

    def _refuse(self, i: int, why: str) -> str:
        self.refused[i] += 1
        if self.refused[i] <= 3 or self.refused[i] % 1000 == 0:
            log.warning("edge %s device %s: command refused: %s", self.edge, self.devices[i], why)
        self.report([i])
        return why

    # -- the session -----------------------------------------------------------------------------------
    async def _connect(self) -> None:
        self.bdseq = (self.bdseq + 1) % 256
        s = Session(f"{self.group}-{self.edge}", host=self.link.host, port=self.link.port,
                    username=self.link.username, password=self.link.password, tls=self.link.tls,
                    on_message=self._on_message, keepalive_s=self.link.keepalive_s,
                    will=Will(sp.topic(self.group, "NDEATH", self.edge), self._death(), 1, False))
        self.session = s
        await s.connect()
        subs = [(sp.topic(self.group, "NCMD", self.edge), 1), (sp.topic(self.group, "DCMD", self.edge, "+"), 1)]
        if self.primary_host:
            subs.append((f"{sp.NAMESPACE}/STATE/{self.primary_host}", 1))
            self._host_online = False
        await s.subscribe(subs)
        self._want_birth = self._host_online
        self.connected.set()

    async def run(self, stop: asyncio.Event, tick: bool = True) -> None:
        """Connect (again after a loss, with backoff), birth, tick the agents and report until `stop`."""
        self._loop = asyncio.get_running_loop()
        backoff = Backoff(*self.reconnect_s)
        period = self.agents.tick_ms / 1e3
        last_reason = ""
        while not stop.is_set():
            # no broker: the leases still run, so that a node cut off from its controller goes on its own
            offline = asyncio.create_task(self._tick_offline(period)) if tick else None
            try:
                await self._connect()
            except LinkError as exc:
                if exc.reason != last_reason:
                    log.warning("edge %s: %s", self.edge, exc.reason)
                    last_reason = exc.reason
                self._drop()
                try:
                    await asyncio.wait_for(stop.wait(), backoff.next())
                except asyncio.TimeoutError:
                    pass
                continue
            finally:
                if offline is not None:
                    offline.cancel()
            backoff.reset()
            last_reason = ""
            log.info("edge %s: connected to %s:%d (bdSeq %d)", self.edge, self.link.host, self.link.port, self.bdseq)
            due = self._loop.time()
            while not stop.is_set() and not self.session.lost.is_set():
                if self._want_birth and self._host_online:
                    self.birth()
                due += period
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, min(due - self._loop.time(), 0.05)))
                    break
                except asyncio.TimeoutError:
                    pass
                if self._loop.time() < due:
                    due -= period
                    continue
                if tick:
                    self.agents.tick()
                full = time.monotonic() >= self.full_due
                if full:
                    self.full_due = time.monotonic() + self.period_s
                self.report(full=full)
                if self._loop.time() > due + period:
                    due = self._loop.time()
            if not stop.is_set():
                log.warning("edge %s: %s; reconnecting", self.edge, self.session.lost_reason)
            self.connected.clear()
            self._drop(clean=stop.is_set())

    async def _tick_offline(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            self.agents.tick()

    def _drop(self, clean: bool = False) -> None:
        s, self.session = self.session, None
        if s is not None:
            if clean and s.connected:
                # a clean goodbye: Sparkplug wants the NDEATH published before the DISCONNECT
                s.publish(sp.topic(self.group, "NDEATH", self.edge), self._death(), 1)
            s.close(clean=True)


# -- `vbatt node` with `mqtt:` and `vbatt fleet` of `driver: mqtt` templates --------------------------------
def check_edge_config(cfg, located) -> None:
    """The `mqtt:` section of a node config: secured (or plaintext on loopback), TLS files readable."""
    from vbatt.config.yamlsrc import ConfigError

    m = cfg.mqtt
    if not m.secured:
        raise ConfigError([f"{located.where(('mqtt',))}: mqtt: say how to secure the broker link: "
                           f"'tls: {{ca: ...}}' or 'plaintext: true' (loopback only)"])
    try:
        Link.of(m)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{located.where(('mqtt', 'tls'))}: mqtt.tls: {exc}"]) from None


async def _serve(edges: list[EdgeNode], on_ready=None) -> None:
    stop = asyncio.Event()
    stop_on_signals(stop)
    tasks = [asyncio.create_task(e.run(stop)) for e in edges]
    if on_ready:
        async def all_connected():
            for e in edges:
                await e.connected.wait()

        waits = [asyncio.create_task(all_connected()), asyncio.create_task(stop.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        if not stop.is_set():
            on_ready()
    await asyncio.gather(*tasks)
    # as the agents of a Modbus fleet do: who controls each node now (the controller's hand-back, or a lapse)
    for e in edges:
        e.agents.log_handed_back()
    log.info("%s", stop_summary(np.concatenate([e.agents.mode for e in edges])))


def run_edge_node(cfg, agents: AgentSet, ready_file: str | None = None) -> None:
    """`vbatt node CONFIG` with `mqtt:`: the node as device of its own edge node, until SIGINT/SIGTERM."""
    from pathlib import Path

    m = cfg.mqtt
    edge_id = m.edge_node or cfg.id
    e = EdgeNode(agents, Link.of(m, username=m.username or edge_id), group=m.group, edge=edge_id,
                 devices=[m.device or cfg.id], period_ms=m.period_ms, primary_host=m.primary_host)

    def ready() -> None:
        log.warning("node %s: Sparkplug B edge node %s/%s on %s:%d (%s)", cfg.id, m.group, edge_id, m.host, m.port,
                    "TLS" if m.tls else "plaintext")
        if ready_file:
            Path(ready_file).write_text(f"{m.port}\n")

    try:
        asyncio.run(_serve([e], ready))
    finally:
        agents.backend.close()


def fleet_edges(cfg, fleet, only: int | None = None, seed: int = 0) -> list[EdgeNode]:
    """The edge nodes serving the `driver: mqtt` template nodes (drivers.mqtt.fleet), or only edge `only`."""
    from vbatt.drivers.mqtt.config import mqtt_nodes
    from vbatt.drivers.node.agent import AgentSpec
    from vbatt.drivers.node.backends.sim import SimBackend
    from vbatt.drivers.node.fleet import sub_fleet

    d = cfg.drivers.mqtt
    f = d.fleet
    served = [i for i, entry in _template_indices(cfg) if entry == "mqtt"]
    if not served:
        raise ValueError("no template with 'driver: mqtt' in this config: nothing for the fleet to serve")
    where = mqtt_nodes(cfg, fleet)
    groups: dict[str, list[int]] = {}
    for i in served:
        groups.setdefault(where[i][1], []).append(i)
    names_ = list(groups)
    if only is not None:
        if not 0 <= only < len(names_):
            raise ValueError(f"--edge {only}: this config has edge nodes 0..{len(names_) - 1}")
        names_ = [names_[only]]
    pw = f.password
    if f.password_file is not None:
        from pathlib import Path

        pw = Path(f.password_file).read_text().splitlines()[0]
    out = []
    for k, name in enumerate(names_):
        idx = groups[name]
        sub = sub_fleet(fleet, idx)
        agents = AgentSet(SimBackend(sub, 0, len(idx), seed=seed + k),
                          [AgentSpec(x, "127.0.0.1", 0) for x in sub.ids], tick_ms=f.tick_ms)
        link = Link.of(d, username=f.username or name, password=pw)
        out.append(EdgeNode(agents, link, group=d.group, edge=name, devices=list(sub.ids), period_ms=f.period_ms,
                            primary_host=d.host_id))
    return out


def _template_indices(cfg):
    i = 0
    for entry in cfg.nodes:
        t = getattr(entry, "template", None)
        if t is not None:
            for _ in range(t.count):
                yield i, t.driver
                i += 1
        else:
            i += 1  # a node of its own: served by whatever device it names, not by the fleet


def fleet_edges_main(cfg, fleet, only: int | None = None, ready_file: str | None = None) -> None:
    """`vbatt fleet CONFIG` for `driver: mqtt` templates: serve the edge nodes until SIGINT/SIGTERM."""
    from pathlib import Path

    edges = fleet_edges(cfg, fleet, only)

    def ready() -> None:
        log.info("fleet: %d edge node(s), %d devices", len(edges), sum(e.agents.n for e in edges))
        if ready_file:
            Path(ready_file).write_text("".join(f"{e.edge}\n" for e in edges))

    asyncio.run(_serve(edges, ready))
