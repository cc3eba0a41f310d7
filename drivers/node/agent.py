"""`vbatt node CONFIG`: the agent on a battery-backed device (docs/design.md §5).

It serves the node's SunSpec map (drivers/modbus/sunspec.py) over Modbus TCP (or
Modbus/TCP Security), refreshes it from a battery backend every tick, and
obeys the controller's instruction while its lease runs. Negotiation: the
agent *offers* (802 + the vendor model's offer points), the controller writes
the instruction block (Seq, LeaseMs, BatW, BusW, SrvW, ShedW) in one request,
the agent applies it inside that request and acknowledges `AckSeq`, so a
read in the same FC23 transaction already sees the acknowledgement. When the
lease runs out without renewal the node goes autonomous (own battery for own
load, no export), shows `Mode = AUTONOMOUS`, raises `Alm.LEASE_EXPIRED`,
counts `Expiries` and logs it. A new instruction takes it back. A controller that stops in order hands the
node back instead (an instruction with `Seq` 0, `sunspec.RELEASE_SEQ`): the node runs on its own at once, shows
`Mode = RELEASED`, and no lease runs out (nothing counted, no warning).

`AgentSet` serves many nodes from one backend and one asyncio loop: one node
for `vbatt node`, thousands for `vbatt fleet` and the embedded fleet.
Registers live in the pymodbus 3.16 SimDevice's own list (the deprecated
datastore contexts ignore updates once the server runs), written in place.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import struct
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
from pydantic import Field, ValidationError, create_model

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer, ModbusTlsServer
from pymodbus.simulator import DataType, SimData, SimDevice

from vbatt.config.base import NodeId, Strict, field_keys, field_type
from vbatt.kernel.fields import Role, Scope, fields, node_field
from vbatt.kernel.signals import stop_on_signals
from vbatt.config.yamlsrc import ConfigError, format_path, load_yaml_file

from vbatt.drivers.aio import freeze_startup_heap
from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.node.backends import Backend
from vbatt.drivers.modbus.config import TlsFiles
from vbatt.drivers.mqtt.config import EdgeConfig

__all__ = ["AgentSpec", "AgentSet", "register_blocks", "NodeAgentConfig", "TlsFiles", "load_node_config", "build_agent",
           "serve_agents", "run_node", "LEASE_MAX_MS", "stop_summary"]

log = logging.getLogger("vbatt.node")

M = ss.NODE_MAP
V = ss.VENDOR_ID
LEASE_MAX_MS = 3_600_000
CODEC = ss.CODEC  # the offer out, the instruction in: the same codec as the controller's driver
# the agent's own status points (no process-image fields)
_P = {name: M.at(V, name) for name in ("Mode", "Alm", "AckSeq", "LeaseLeftMs", "AppliedW", "Expiries")}
_B = {name: M.at(802, name) for name in ("SoH", "Hb", "State", "ChaSt", "LocRemCtl", "Evt1", "EvtVnd1")}
SEQ_REG = CODEC.seq_point.addr
_STATUS = struct.Struct(">HHIIfI")  # Mode, Alm, AckSeq, LeaseLeftMs, AppliedW, Expiries: 10 registers from Mode
assert _STATUS.size // 2 == _P["Expiries"].addr + 2 - _P["Mode"].addr
INSTR_FIRST, INSTR_END = CODEC.instr_first, CODEC.instr_end  # the controller writes [first, end)
# registers the agent refreshes every tick: 802 body .. vendor status, minus the points others may write
_DYN = (M.body(802), INSTR_FIRST)
_WRITABLE = {a for p in M.points.values() if p.point.writable for a in range(p.addr, p.addr + p.regs)}


def register_blocks(row, end: int) -> list[SimData]:
    """The node map's registers from M.base up to `end` as SimData blocks, each wholly writable (the
    instruction) or read-only (the offer), so that a write outside the instruction is refused."""
    blocks, a = [], M.base
    while a < end:
        w = a in _WRITABLE
        b = a
        while b < end and (b in _WRITABLE) == w:
            b += 1
        blocks.append(SimData(a, values=[int(x) for x in row[a - M.base:b - M.base]],
                              datatype=DataType.REGISTERS, readonly=not w))
        a = b
    return blocks


def _segments() -> list[tuple[int, int]]:
    segs: list[tuple[int, int]] = []
    for a in range(*_DYN):
        if a in _WRITABLE:
            continue
        if segs and segs[-1][1] == a:
            segs[-1] = (segs[-1][0], a + 1)
        else:
            segs.append((a, a + 1))
    return segs


DYN_SEGMENTS = _segments()


@dataclass
class AgentSpec:
    id: str
    host: str
    port: int
    unit_id: int = 1
    sslctx: ssl.SSLContext | None = None
    ident: dict[str, str] = field(default_factory=dict)


def stop_summary(m: np.ndarray) -> str:
    """Who decides each node's battery power as its agents stop (`m`: each node's Mode), e.g. 'stopping 100
    nodes: 100 handed back by the controller, 0 autonomous after a lapsed lease, 0 still controlled, 0 never
    instructed'."""
    return (f"stopping {len(m)} node{'s' if len(m) != 1 else ''}: {int((m == ss.Mode.RELEASED).sum())} handed "
            f"back by the controller, {int((m == ss.Mode.AUTONOMOUS).sum())} autonomous after a lapsed lease, "
            f"{int((m == ss.Mode.CONTROLLED).sum())} still controlled, {int((m == ss.Mode.WAITING).sum())} "
            f"never instructed")


class AgentSet:
    """Node agents of `len(specs)` nodes sharing one backend (node i = backend row i)."""

    def __init__(self, backend: Backend, specs: list[AgentSpec], *, tick_ms: float = 100.0,
                 clock_ns=time.monotonic_ns) -> None:
        if backend.n != len(specs):
            raise ValueError(f"backend serves {backend.n} nodes, got {len(specs)} agent specs")
        n = self.n = len(specs)
        self.backend, self.specs, self.tick_ms, self.clock_ns = backend, specs, tick_ms, clock_ns
        idents = [{"Mn": "vbatt", "Md": f"vbatt-node-{backend.kind}", "Vr": _version(), "SN": s.id,
                   "Opt": backend.kind, "DA": str(s.unit_id), **s.ident} for s in specs]
        self.rows = ss.static_rows(n, idents)
        self.mode = np.full(n, int(ss.Mode.WAITING), np.int64)
        self.alarm = np.zeros(n, np.int64)
        self.seq = np.zeros(n, np.uint64)
        self.lease_ms = np.zeros(n, np.int64)
        self.deadline_ns = np.zeros(n, np.int64)
        self.expiries = np.zeros(n, np.int64)
        self.cmd = {k: np.zeros(n) for k in CODEC.outputs}
        self.applied_w = np.zeros(n)
        self.instructions = np.zeros(n, np.int64)  # instructions accepted (tests, logs)
        self.releases = np.zeros(n, np.int64)  # hand-backs accepted (tests, logs)
        self._handed_back: list[int] = []  # nodes handed back since the last tick: logged together
        self.regs: list[list[int]] = []
        self.servers: list[ModbusTcpServer] = []
        self.ports: list[int] = []
        self.t0_ns = clock_ns()
        self.last_ns = self.t0_ns
        self._encode(self.t0_ns)

    # -- serving -------------------------------------------------------------------------------
    def _device(self, i: int) -> tuple[SimDevice, SimDevice]:
        blocks = register_blocks(self.rows[i], M.base + M.size)
        own = SimDevice(id=self.specs[i].unit_id, simdata=blocks, action=partial(self._action, i))
        # any other unit id: a gateway's "target failed to respond", so the controller can say "wrong unit"
        other = SimDevice(id=0, simdata=[SimData(M.base, count=M.size, values=0, datatype=DataType.REGISTERS)],
                          action=_wrong_unit)
        return own, other

    async def start(self) -> None:
        for i, s in enumerate(self.specs):
            devices = list(self._device(i)) if s.unit_id != 0 else [self._device(i)[0]]
            if s.sslctx is not None:
                srv = ModbusTlsServer(devices, address=(s.host, s.port), sslctx=s.sslctx)
            else:
                srv = ModbusTcpServer(devices, address=(s.host, s.port))
            try:
                await srv.serve_forever(background=True)
            except RuntimeError:
                await self.stop()
                raise OSError(f"node {s.id}: cannot listen on {s.host}:{s.port} (port in use or address "
                              f"not local)") from None
            self.servers.append(srv)
            self.ports.append(srv.transport.sockets[0].getsockname()[1])
            self.regs.append(srv.context.devices[s.unit_id].block["x"][2])
        self._push()

    async def stop(self) -> None:
        self.log_handed_back()
        if self.servers:
            log.info("%s", self.summary())
        for srv in self.servers:
            await srv.shutdown()
        self.servers.clear()

    def summary(self) -> str:
        return stop_summary(self.mode)

    # -- the instruction, applied inside the write request --------------------------------------
    async def _action(self, i: int, fc: int, start: int, address: int, count: int, regs: list[int],
                      values) -> ExcCodes | None:
        if values is None or address + count <= INSTR_FIRST or address >= INSTR_END:
            return None  # reads, and writes outside the instruction block, need nothing
        if fc not in (6, 16, 23):
            return ExcCodes.ILLEGAL_FUNCTION  # coils written over the instruction registers
        if not (address <= INSTR_FIRST and address + count >= INSTR_END):
            # half an instruction is no instruction; a part without Seq would sit there unapplied
            return ExcCodes.ILLEGAL_VALUE
        # plain struct, not numpy: this runs inside every instruction request (thousands per second)
        off = INSTR_FIRST - address
        seq, lease, cmd = CODEC.decode_instruction(values[off:off + INSTR_END - INSTR_FIRST])
        refused = self.release(i, lease, cmd) if seq == ss.RELEASE_SEQ else self.accept(i, seq, lease, cmd)
        self._status_into(i, regs, start)
        return ExcCodes.ILLEGAL_VALUE if refused else None

    def accept(self, i: int, seq: int, lease: int, cmd: dict[str, float]) -> str | None:
        """Node i takes instruction `seq` (its outputs `cmd`) with a lease of `lease` ms, whatever the transport;
        returns None, or why it was refused (NaN, or a lease out of range): then nothing changes but the alarm."""
        why = self._refused(i, seq, lease, cmd)
        if why is not None:
            return why
        now = self.clock_ns()
        for k, v in cmd.items():
            self.cmd[k][i] = v
        if self.mode[i] in (ss.Mode.AUTONOMOUS, ss.Mode.RELEASED):
            # after a lapse one agent warns, a fleet says it per node at INFO (its expiry summary is the warning);
            # a controller back after an orderly hand-back is routine
            loud = self.mode[i] == ss.Mode.AUTONOMOUS and len(self.specs) == 1
            (log.warning if loud else log.info)(
                "node %s: instruction seq %d received: controlled again", self.specs[i].id, seq)
        self.seq[i], self.lease_ms[i] = seq, lease
        self.deadline_ns[i] = now + lease * 1_000_000
        self.mode[i] = ss.Mode.CONTROLLED
        self.alarm[i] &= ~int(ss.Alarm.BAD_INSTRUCTION | ss.Alarm.LEASE_EXPIRED)
        self.instructions[i] += 1
        return None

    def _refused(self, i: int, seq: int, lease: int, cmd: dict[str, float]) -> str | None:
        if not all(math.isfinite(v) for v in cmd.values()) or not (0 < lease <= LEASE_MAX_MS):
            self.alarm[i] |= ss.Alarm.BAD_INSTRUCTION
            log.warning("node %s: refused instruction seq %d (lease %d ms, %s): NaN or lease out of (0, %d]",
                        self.specs[i].id, seq, lease, cmd, LEASE_MAX_MS)
            return f"NaN or lease {lease} ms out of (0, {LEASE_MAX_MS}]"
        return None

    def release(self, i: int, lease: int, cmd: dict[str, float]) -> str | None:
        """Node i is handed back by its controller (the instruction block with Seq = ss.RELEASE_SEQ, written as the
        controller stops in order): it runs on its own at once, as after a lease that ran out (own battery for
        own load, no export), but shows Mode RELEASED and counts no expiry: an orderly stop is no fault. The
        block is checked as any instruction (a NaN or a lease out of range refuses it and changes nothing);
        `AckSeq` keeps the last instruction the node followed. A new instruction takes the node back."""
        why = self._refused(i, ss.RELEASE_SEQ, lease, cmd)
        if why is not None:
            return why
        if self.mode[i] != ss.Mode.RELEASED:
            self._handed_back.append(i)
        self.mode[i] = ss.Mode.RELEASED
        self.deadline_ns[i] = self.clock_ns()
        self.alarm[i] &= ~int(ss.Alarm.BAD_INSTRUCTION | ss.Alarm.LEASE_EXPIRED)
        self.releases[i] += 1
        return None

    def log_handed_back(self) -> None:
        """The nodes handed back since the last tick, in one line (a stopping controller hands back thousands);
        at INFO, also for a single agent: an orderly stop is routine, no fault to warn of."""
        idx, self._handed_back = self._handed_back, []
        if len(idx) == 1:
            log.info("node %s: handed back by the controller (after instruction %d): autonomous (own battery for own "
                     "load, no export)", self.specs[idx[0]].id, self.seq[idx[0]])
        elif idx:
            log.info("%d nodes (%s, ...): handed back by the controller: autonomous (own battery for own load, no "
                     "export)", len(idx), ", ".join(self.specs[i].id for i in idx[:3]))

    def _status_into(self, i: int, regs: list[int], start: int) -> None:
        """Write node i's status points into its live registers (ack visible at once)."""
        controlled = self.mode[i] == ss.Mode.CONTROLLED
        left = max(0, int(self.deadline_ns[i] - self.clock_ns()) // 1_000_000) if controlled else 0
        raw = _STATUS.pack(int(self.mode[i]), int(self.alarm[i]) & 0xFFFF, int(self.seq[i]) & 0xFFFFFFFF,
                           min(left, 0xFFFFFFFE), float(self.applied_w[i]), int(self.expiries[i]) & 0xFFFFFFFF)
        a = _P["Mode"].addr - start
        regs[a:a + _STATUS.size // 2] = struct.unpack(f">{_STATUS.size // 2}H", raw)

    # -- the tick: lease, backend, registers ---------------------------------------------------------
    def decide(self, now_ns: int) -> np.ndarray:
        """The battery power every node applies now; moves expired leases to autonomous."""
        self.log_handed_back()
        expired = (self.mode == ss.Mode.CONTROLLED) & (now_ns > self.deadline_ns)
        idx = np.flatnonzero(expired)
        for i in idx:
            (log.warning if len(idx) <= 3 else log.info)(
                "node %s: lease of instruction %d (%d ms) ran out without renewal: autonomous "
                "(own battery for own load, no export)", self.specs[i].id, self.seq[i], self.lease_ms[i])
        if len(idx) > 3:
            log.warning("%d nodes (%s, ...): lease ran out without renewal: autonomous (own battery for own "
                        "load, no export)", len(idx), ", ".join(self.specs[i].id for i in idx[:3]))
        self.mode[expired] = ss.Mode.AUTONOMOUS
        self.alarm[expired] |= ss.Alarm.LEASE_EXPIRED
        self.expiries[expired] += 1
        o = self.backend.offer
        own = np.minimum(np.nan_to_num(o["demand_w"]), np.nan_to_num(o["max_discharge_w"]))
        controlled = self.mode == ss.Mode.CONTROLLED
        self.applied_w[:] = np.where(controlled, self.cmd["battery_w"], own)
        return self.applied_w

    def tick(self, now_ns: int | None = None) -> None:
        now = self.clock_ns() if now_ns is None else now_ns
        command = self.decide(now)
        dt = (now - self.last_ns) * 1e-9
        self.backend.step((now - self.t0_ns) * 1e-9, dt, command)
        bad = ~self.backend.ok
        self.alarm[bad] |= ss.Alarm.BACKEND
        self.alarm[~bad] &= ~int(ss.Alarm.BACKEND)
        self.last_ns = now
        self._encode(now)
        self._push()

    def _encode_status(self, rows: np.ndarray, sl: slice, now_ns: int) -> None:
        ss.put_int(rows, _P["Mode"], M.base, self.mode[sl])
        ss.put_int(rows, _P["Alm"], M.base, self.alarm[sl])
        ss.put_int(rows, _P["AckSeq"], M.base, self.seq[sl])
        left = np.clip((self.deadline_ns[sl] - now_ns) // 1_000_000, 0, None)
        ss.put_int(rows, _P["LeaseLeftMs"], M.base, np.where(self.mode[sl] == ss.Mode.CONTROLLED, left, 0))
        ss.put(rows, _P["AppliedW"], M.base, self.applied_w[sl])
        ss.put_int(rows, _P["Expiries"], M.base, self.expiries[sl])

    def _encode(self, now_ns: int) -> None:
        o, r = self.backend.offer, self.rows
        CODEC.encode_offer(r, o)
        ss.put(r, _B["SoH"], M.base, np.full(self.n, 100.0))  # % (the backends do not estimate health)
        hb = ((now_ns - self.t0_ns) // 1_000_000_000) & 0xFFFF
        ss.put_int(r, _B["Hb"], M.base, np.full(self.n, hb))
        # ChaSt (802 enum): 3 = DISCHARGING, 4 = CHARGING, 6 = HOLDING; State 2 = CONNECTED
        p = np.nan_to_num(o["power_w"])
        ss.put_int(r, _B["ChaSt"], M.base, np.where(p > 0, 3, np.where(p < 0, 4, 6)))
        ss.put_int(r, _B["State"], M.base, np.full(self.n, 2))
        ss.put_int(r, _B["Evt1"], M.base, np.zeros(self.n))  # no standard battery event
        ss.put_int(r, _B["EvtVnd1"], M.base, self.alarm)  # the agent's Alm bits, for plain SunSpec readers
        ss.put_int(r, _B["LocRemCtl"], M.base, np.where(self.mode == ss.Mode.CONTROLLED, 1, 0))
        self._encode_status(r, slice(None), now_ns)

    def _push(self) -> None:
        """Copy the refreshed registers into every server's live list (the instruction block is not touched)."""
        base = M.base
        for i, regs in enumerate(self.regs):
            row = self.rows[i]
            for a, b in DYN_SEGMENTS:
                regs[a - base:b - base] = row[a - base:b - base].tolist()

    async def run(self, stop: asyncio.Event) -> None:
        period = self.tick_ms / 1e3
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not stop.is_set():
            due += period
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
                break
            except asyncio.TimeoutError:
                pass
            if self.backend.controllable:
                self.tick()
            else:  # UPS / sysfs reads block on I/O: keep the servers answering meanwhile
                now = self.clock_ns()
                await asyncio.to_thread(self.backend.step, (now - self.t0_ns) * 1e-9, 0.0, self.decide(now))
                self.last_ns = now
                self._encode(now)
                self._push()
            if loop.time() > due + period:
                due = loop.time()  # fell behind: no burst


async def _wrong_unit(fc, start, address, count, regs, values) -> ExcCodes:
    return ExcCodes.GATEWAY_NO_RESPONSE


def _version() -> str:
    try:
        import vbatt

        return str(vbatt.__version__)
    except Exception:  # noqa: BLE001 (a version string is cosmetic)
        return "0"


# -- `vbatt node CONFIG` -------------------------------------------------------------------------------
class SimBackendConfig(create_model("_SimValues", __base__=Strict,
                                    **field_keys(fields(Scope.NODE, Role.MEASUREMENT, configured=True)))):
    """The simulated battery: its configured measurements (keys, ranges, defaults from the field table)."""

    kind: Literal["sim"]
    demand_profile: dict | None = None
    physics: dict = {}


def _range_of(name: str):
    return field_type(node_field(name))


class SysfsBackendConfig(Strict):
    """A laptop battery (Linux sysfs); what it cannot measure is configured, in the field table's ranges."""

    kind: Literal["sysfs"]
    path: str = "/sys/class/power_supply/BAT0"
    demand_w: _range_of("demand_w") = 0.0
    max_discharge_w: _range_of("max_discharge_w") = 0.0
    max_charge_w: _range_of("max_charge_w") = 0.0
    link_max_w: _range_of("link_max_w") = 0.0


class NutBackendConfig(Strict):
    """A UPS (Network UPS Tools); what it cannot measure is configured, in the field table's ranges."""

    kind: Literal["nut"]
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 3493
    ups: str
    nominal_w: Annotated[float, Field(gt=0)] | None = None
    capacity_wh: Annotated[float, Field(gt=0, le=node_field("capacity_wh").hi)] | None = None
    max_discharge_w: _range_of("max_discharge_w") = 0.0
    max_charge_w: _range_of("max_charge_w") = 0.0
    link_max_w: _range_of("link_max_w") = 0.0
    timeout_s: Annotated[float, Field(gt=0, le=30)] = 1.0


class NodeAgentConfig(Strict):
    """The YAML of `vbatt node`: one node, its listener, its security and its battery backend."""

    id: NodeId
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 502
    unit_id: Annotated[int, Field(ge=1, le=247)] = 1
    tick_ms: Annotated[float, Field(gt=0, le=10_000)] = 100.0
    plaintext: bool = False
    tls: TlsFiles | None = None
    backend: Annotated[Union[SimBackendConfig, SysfsBackendConfig, NutBackendConfig], Field(discriminator="kind")]
    # publish over MQTT Sparkplug B as an edge node instead of serving Modbus (docs/mqtt.md)
    mqtt: EdgeConfig | None = None


def load_node_config(path: str | Path) -> NodeAgentConfig:
    located = load_yaml_file(path)
    try:
        cfg = NodeAgentConfig.model_validate(located.data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors(include_url=False):
            loc = tuple(p for p in e["loc"] if p not in ("sim", "sysfs", "nut"))
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"{located.where(loc)}: {format_path(loc)}: {msg}")
        raise ConfigError(problems) from None
    if cfg.mqtt is not None:
        from vbatt.drivers.mqtt.edge import check_edge_config

        check_edge_config(cfg, located)
        return cfg
    if cfg.plaintext == (cfg.tls is not None):
        raise ConfigError([f"{located.source}: say how to secure the link: either 'tls: {{ca, cert, key}}' "
                           f"(Modbus/TCP Security) or 'plaintext: true' (got "
                           f"{'both' if cfg.plaintext else 'neither'})"])
    if cfg.tls is not None:  # unreadable TLS files are a config error (exit 2), found before serving
        from vbatt.drivers.certs import server_context

        try:
            server_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
        except (OSError, ValueError) as exc:
            raise ConfigError([f"{located.where(('tls',))}: tls: {exc}"]) from None
    return cfg


def _sim_fleet_of_one(b: SimBackendConfig, node_id: str):
    from vbatt.config.plant import Fleet, NodeConfig, RANGED

    nc = NodeConfig.model_validate({"id": node_id, **b.model_dump(exclude={"kind"}, exclude_none=True)})
    values = {k: np.asarray([getattr(nc, k)], dtype=node_field(k).np_dtype) for k in RANGED}
    return Fleet([node_id], values, ["sim"], [nc.demand_profile], [nc.physics])


def build_agent(cfg: NodeAgentConfig) -> AgentSet:
    from vbatt.drivers.certs import server_context

    b = cfg.backend
    if isinstance(b, SimBackendConfig):
        from vbatt.drivers.node.backends.sim import SimBackend

        backend: Backend = SimBackend(_sim_fleet_of_one(b, cfg.id), 0, 1)
    elif isinstance(b, SysfsBackendConfig):
        from vbatt.drivers.node.backends.sysfs import SysfsBackend

        backend = SysfsBackend(b.path, b.demand_w, b.max_discharge_w, b.max_charge_w, b.link_max_w)
    else:
        from vbatt.drivers.node.backends.nut import NutBackend

        backend = NutBackend(b.host, b.port, b.ups, nominal_w=b.nominal_w, capacity_wh=b.capacity_wh,
                             max_discharge_w=b.max_discharge_w, max_charge_w=b.max_charge_w,
                             link_max_w=b.link_max_w, timeout_s=b.timeout_s)
    ctx = server_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key) if cfg.tls else None
    spec = AgentSpec(cfg.id, cfg.host, cfg.port, cfg.unit_id, ctx)
    return AgentSet(backend, [spec], tick_ms=cfg.tick_ms)


async def serve_until_signalled(agents: AgentSet, on_ready=None) -> None:
    """Serve until SIGINT or SIGTERM (the `vbatt node` and `vbatt fleet` processes)."""
    stop = asyncio.Event()
    stop_on_signals(stop)
    await serve_agents(agents, stop, on_ready)


async def serve_agents(agents: AgentSet, stop: asyncio.Event, on_ready=None) -> None:
    await agents.start()
    freeze_startup_heap()  # no full collection of the startup heap stalls every node of a fleet at once
    if on_ready:
        on_ready(agents)
    try:
        await agents.run(stop)
    finally:
        await agents.stop()
        agents.backend.close()


def run_node(cfg: NodeAgentConfig, ready_file: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""
    agents = build_agent(cfg)
    if cfg.mqtt is not None:
        from vbatt.drivers.mqtt.edge import run_edge_node

        run_edge_node(cfg, agents, ready_file)
        return

    def ready(a: AgentSet) -> None:
        log.warning("node %s: serving SunSpec on %s:%d (unit %d, %s, backend %s)", cfg.id, cfg.host, a.ports[0],
                    cfg.unit_id, "TLS" if cfg.tls else "plaintext", a.backend.kind)
        if ready_file:
            Path(ready_file).write_text(f"{a.ports[0]}\n")

    asyncio.run(serve_until_signalled(agents, ready))
