"""The hierarchy link: one process beside the scan of a controller in a tree (docs/hierarchy.md).

* **Uplink** (`hierarchy.uplink`): serves the controller's virtual battery upward as a node, with the
  node map of `vbatt node` (common model 1, battery model 802, vendor model 64251 with the offer and
  the leased instruction block; the offer is the aggregate of the process image) followed by the tree
  model 64252 (runtime/hierarchy/wire.py: the curves and the levels). The parent's `modbus` driver
  polls it like any node; the parent's link reads the curves and writes the levels.
* **Children** (`hierarchy.children`): reads every child's curves, adds them (the subtree's curves),
  and writes the levels to every child with a lease.
* **Levels**: taken from the parent while its lease runs; otherwise (the top, or a parent that stopped
  renewing) solved here from the subtree's curves and this controller's own main_limit_w. A leaf hands
  them to its `tree` program (Op.SET_MEMORY); a middle level forwards them.
* **Hand-back**: an orderly stop writes every child that holds its levels the hand-back (wire.py: LvSeq 0,
  LvLeaseMs 0); a child that reads one drops the levels at once and runs on its own, as after a lapse, but
  counts no fallback (tree_state 3, not 2: no TREE_FALLBACK alarm).
* **Main supply limit**: while controlled from above it is the controller's share of the feed (its net
  import under the tree's levels, or the parent's BusW when the parent sends no levels); when the
  parent's leases run out it goes back to the configured `plant.main_limit_w`, with a warning.

No I/O reaches the scan: the link reads the published image and writes through the command ring, as
an operator's setting does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.simulator import DataType, SimData, SimDevice

from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.node.agent import AgentSet, AgentSpec, _wrong_unit, register_blocks
from vbatt.drivers.node.backends import Backend
from vbatt.hierarchy.wire import HAND_BACK_SEQ, TREE_ID, TreeLayout
from vbatt.kernel.fields import Role, Scope, fields
from vbatt.kernel.image import Op, ProcessImage
from vbatt.kernel.signals import stop_on_signals
from vbatt.programs.codes import Alarm
from vbatt.programs.energy import EnergyParams
from vbatt.programs.energy.kernel import horizon_params
from vbatt.programs.energy.tree import T_AT
from vbatt.programs.hierarchy import classes as hc
from vbatt.programs.hierarchy.decisions import TreeDecider
from vbatt.programs.hierarchy.curves import Levels, Summary, battery_summary, node_limits, solve_levels, summarize
from vbatt.programs.hierarchy.feeder import narrow_levels, narrow_summary
from vbatt.programs.hierarchy.program import L_DIS, L_LAM, L_LEASED, L_MU, LEVELS

__all__ = ["ControllerBackend", "Uplink", "Link", "link_main", "PRODUCER"]

log = logging.getLogger("vbatt.hierarchy")
PRODUCER = 3  # command ring of the hierarchy link (0: reload/CLI, 1: OPC UA server)
M = ss.NODE_MAP
_SAFE = int(Alarm.SAFE_ALLOCATION)
_RANGED = {f.name: f for f in fields(Scope.NODE, Role.MEASUREMENT, ranged=True)}


def _uplink_tls(u):
    """The uplink's server side of Modbus/TCP Security (None: plaintext, said in the config). Files that
    cannot be read stop the link before it serves anything, naming the key."""
    if u.tls is None:
        return None
    from vbatt.drivers.certs import server_context

    try:
        return server_context(u.tls.ca, u.tls.cert, u.tls.key)
    except (OSError, ValueError) as exc:
        raise ValueError(f"hierarchy.uplink.tls: {exc}") from None


def _json_float(x: float):
    return x if math.isfinite(x) else str(x)  # "inf", "-inf": JSON has no infinities


class ControllerBackend(Backend):
    """The virtual battery as one node's offer: the aggregates of the published image."""

    kind = "controller"

    def __init__(self, feeder_w: float):
        super().__init__(1)
        self.feeder_w = feeder_w

    def refresh(self, v: dict) -> None:
        on = (v["node.online"] != 0)
        agg = {k[4:]: float(v[k][0]) for k in v if k.startswith("agg.")}

        def pick(name, default=0.0):
            x = v["node." + name][on]
            return x if x.size else np.array([default])

        vals = {
            "demand_w": agg["demand_w"], "forecast_w": agg["forecast_w"],
            "max_discharge_w": agg["available_discharge_w"], "max_charge_w": agg["available_charge_w"],
            "capacity_wh": float(pick("capacity_wh").sum()), "soc": agg["soc"],
            "temperature_c": float(pick("temperature_c", 25.0).max()), "voltage_v": float(pick("voltage_v").mean()),
            "current_a": float(np.clip(pick("current_a").sum(), -10000.0, 10000.0)),
            "link_max_w": self.feeder_w, "power_w": agg["battery_w"],
        }
        for k in self.offer:
            x = vals.get(k, 0.0)
            x = x if math.isfinite(x) else 0.0
            f = _RANGED.get(k)
            # one node's range (e.g. capacity_wh <= 1 GWh): a parent's driver refuses more as a bad value
            self.offer[k][0] = min(max(x, f.lo), f.hi) if f is not None else x

    def step(self, t_s: float, dt_s: float, battery_w: np.ndarray) -> None:
        pass  # the controller's own scan moves its batteries; the link refreshes the offer


class Uplink(AgentSet):
    """The node agent of the virtual battery: the node map, then the tree model, then the end model."""

    def __init__(self, backend: ControllerBackend, spec: AgentSpec, tree: TreeLayout, tick_ms: float):
        self.tree = tree
        super().__init__(backend, [spec], tick_ms=tick_ms)

    def _device(self, i: int):
        t = self.tree
        blocks = register_blocks(self.rows[i], M.base + M.size - 2)  # the end model gives way to the tree model
        head = [TREE_ID, t.length] + [0] * (t.levels_at - t.body)
        blocks.append(SimData(t.addr, values=head, datatype=DataType.REGISTERS, readonly=True))
        blocks.append(SimData(t.levels_at, values=[0] * (t.levels_len + t.dec_len), datatype=DataType.REGISTERS,
                              readonly=False))
        blocks.append(SimData(t.end, values=[ss.END_ID, 0], datatype=DataType.REGISTERS, readonly=True))
        own = SimDevice(id=self.specs[i].unit_id, simdata=blocks, action=partial(self._action, i))
        other = SimDevice(id=0, simdata=[SimData(M.base, count=t.end + 2 - M.base, values=0,
                                                 datatype=DataType.REGISTERS)], action=_wrong_unit)
        return own, other

    def put_summary(self, s: Summary, seq: int) -> None:
        head, knots = self.tree.encode_summary(s, seq)
        regs, t = self.regs[0], self.tree
        regs[t.knots_at - M.base:t.knots_at - M.base + len(knots)] = knots
        regs[t.body - M.base:t.body - M.base + len(head)] = head  # the header last: its SumSeq says "fresh"

    def levels_words(self) -> list[int]:
        t = self.tree
        return self.regs[0][t.levels_at - M.base:t.levels_at - M.base + t.levels_len + t.dec_len]


@dataclass
class Child:
    id: str
    host: str
    port: int
    unit: int
    client: AsyncModbusTcpClient | None = None
    summary: Summary | None = None
    seen_ns: int = 0
    fault: str = "no data yet"
    online: bool = False
    levels_sent: bool = False  # it holds levels of this link: an orderly stop hands them back


@dataclass
class State:
    leased: bool = False  # the parent's levels are leased
    parent_seq: int = 0
    deadline_ns: int = 0
    levels: Levels | None = None
    source: str = "none"  # parent / own / none
    main_limit_w: float = math.nan  # last pushed
    fallbacks: int = 0
    hand_backs: int = 0  # the parent handed the levels back (stopped in order): on its own, no fallback
    handed_back: bool = False  # on its own since the last hand-back (until levels come again)
    seq: int = 0
    applied: tuple = ()
    applied_energy: tuple = ()
    levels_now: Levels | None = None
    children: dict = field(default_factory=dict)


class Link:
    def __init__(self, cfg, fleet, img: ProcessImage, *, clock_ns=time.monotonic_ns):
        self.cfg, self.h, self.img, self.clock_ns = cfg, cfg.hierarchy, img, clock_ns
        self.role = self.h.role
        self.tree = TreeLayout(self.h.classes, self.h.max_knots)
        # its feeder to the parent's bus (docs/hierarchy.md "Feeder limits"): +inf at the top
        self.feeder_w = float(self.h.uplink.feeder_w) if self.h.uplink is not None else math.inf
        self.alone_limit_w = min(float(cfg.plant.main_limit_w), self.feeder_w)  # its main limit on its own
        alloc = next((e.params for e in cfg.programs if e.id == "allocation"), None)
        self.soc_min = alloc.soc_min if alloc is not None else 0.1
        self.soc_max = alloc.soc_max if alloc is not None else 1.0
        self.st = State()
        self.rounds_ms: deque[float] = deque(maxlen=600)  # the link's round times, for the status
        self._ring_full = False
        self.uplink: Uplink | None = None
        if self.h.uplink is not None:
            u = self.h.uplink
            spec = AgentSpec(f"vbatt-{Path(cfg.source).stem}", u.host, u.port, u.unit_id, _uplink_tls(u),
                             ident={"Md": "vbatt-controller", "Opt": self.role})
            self.uplink = Uplink(ControllerBackend(u.feeder_w), spec, self.tree, u.tick_ms)
        self.children: list[Child] = []
        for cid in self.h.children:
            e = next(n for n in cfg.nodes if getattr(n, "id", None) == cid)
            self.children.append(Child(cid, e.host, e.port, e.unit_id))
        if self.role == "leaf":
            self.levels_index = img.spec.memory_index(f"tree.{LEVELS}")
        # the tree's energy decisions: a leaf hands them to its energy program, a level with children makes
        # them when it is the top of its subtree (with its own energy parameters, else the defaults)
        names = img.spec.memory_names()
        self.energy_index = names.index("energy.tree") if "energy.tree" in names else None
        en = next((e.params for e in cfg.programs if e.id == "energy"), None)
        # it waits for a whole tree (every child present, every leaf on the tree's decisions) for ten leases
        # at least: a child that does not come within that is gone, and the rules run on the rest
        # (its class demand forecast too: the top forecasts the tree's summed demand as a flat controller)
        en = en if en is not None else EnergyParams()
        self.horizon_s = en.horizon_s  # the pooled energy's least horizon, for its energy offer through its feeder
        self.decider = TreeDecider(self.h.classes, en.reset_hold_s, en.restore_s,
                                   pace_s=self.h.poll_ms / 1e3, wait_s=max(30.0, 10 * self.h.lease_ms / 1e3),
                                   hp=horizon_params(en), bins=en.demand_season_bins if en.demand_season_s else 0,
                                   horizon_s=en.horizon_s, power_on=en.power_runtime) \
            if self.role != "leaf" else None
        # the wall time of a round for the class forecast's profile: the injected clock plus one offset, as
        # the scan's wall_s (vbatt.kernel.scan)
        self.wall_offset_s = time.time() - self.clock_ns() * 1e-9
        self._out: list[tuple] = []  # this round's commands, pushed together or not at all
        self._state_sent: int | None = None  # the tree_state last sent, until the image has it
        self._last_decided: tuple | None = None  # what the last "decisions" trace line said
        self._decided_ns: int | None = None

    # -- children ------------------------------------------------------------------------------------
    async def _read(self, c: Child, fn: str, **kw):
        r = await getattr(c.client, fn)(device_id=c.unit, **kw)
        if r.isError():
            raise OSError(f"{fn}: Modbus exception {r}")
        return r.registers if hasattr(r, "registers") else None

    async def _poll(self, c: Child, levels: Levels | None) -> None:
        t = self.tree
        try:
            if c.client is None or not c.client.connected:
                c.client = AsyncModbusTcpClient(c.host, port=c.port, timeout=min(self.h.lease_ms / 2e3, max(0.3, self.h.poll_ms / 1e3)),
                                                retries=0, reconnect_delay=0)
                if not await c.client.connect():
                    raise OSError(f"cannot connect to {c.host}:{c.port}")
            hdr: list[int] = []
            for a in range(0, 2 + t.head_len + t.cls_len, 120):  # the header and the energy offer
                hdr += await self._read(c, "read_holding_registers", address=t.addr + a,
                                        count=min(120, 2 + t.head_len + t.cls_len - a))
                t.check_length(hdr[0], hdr[1])
            head = t.decode_head(hdr[2:2 + t.head_len])
            need = 8 * sum(head["counts"])
            words: list[int] = []
            for a in range(0, need, 120):
                words += await self._read(c, "read_holding_registers", address=t.knots_at + a,
                                          count=min(120, need - a))
            c.summary = t.decode_summary(head, words, t.decode_energy(hdr[2 + t.head_len:]))
            if levels is not None:
                await self._send_levels(c, levels)
            c.seen_ns = self.clock_ns()
            if not c.online:
                log.warning("child %s (%s:%d): online", c.id, c.host, c.port)
            c.online, c.fault = True, ""
        except Exception as exc:  # noqa: BLE001 (any failure of one child is that child's fault)
            why = str(exc) or type(exc).__name__
            if c.client is not None:
                c.client.close()
                c.client = None
            if c.online or c.fault != why:
                log.warning("child %s (%s:%d): %s", c.id, c.host, c.port, why)
            c.fault = why
        if c.online and self.clock_ns() - c.seen_ns > self.h.lease_ms * 1_000_000:
            c.online = False  # offline: its curves leave the sum, the rest is re-planned
            log.warning("child %s: no answer for %d ms: offline, re-planned without it", c.id, self.h.lease_ms)

    # -- the leaf's own curves -----------------------------------------------------------------------
    def own_summary(self, v: dict) -> Summary:
        n = {k[5:]: v[k] for k in v if k.startswith("node.")}
        use = (n["online"] != 0) & (n["trip"] == 0) & ((n["alarm"].astype(np.int64) & _SAFE) == 0)
        nl = node_limits(n["priority"][use], n["demand_w"][use], n["lo_w"][use], n["hi_w"][use],
                         n["link_max_w"][use], n["soc"][use], n["capacity_wh"][use], n["serve_max_w"][use],
                         soc_min=self.soc_min, soc_max=self.soc_max)
        base = summarize(nl)
        base.classes = {p: c for p, c in base.classes.items() if 0 <= p < self.h.classes}
        s = battery_summary(nl, base, n["served_w"][use])
        s.bus_w, s.battery_w = float(n["bus_w"].sum()), float(n["battery_w"].sum())
        s.energy = hc.offer_of(v, self.h.classes)
        return s

    # -- one round -----------------------------------------------------------------------------------
    def _push(self, op: int, node: int = -1, value: float = 0.0, arg: int = 0) -> None:
        self._out.append((op, node, value, arg))

    def _flush(self) -> None:
        """The round's commands into the ring, all or none. A command that did not fit must not count as
        applied: the values the link remembers as sent (levels, decisions, main limit, tree_state) are
        then forgotten and all of them go again next round (once, values the ring had no room for stayed
        out while the lease around them was renewed: a leaf used decisions it never received)."""
        out, self._out = self._out, []
        if not out:
            return
        ring = self.img.commands
        if ring.room(PRODUCER) < len(out):
            if not self._ring_full:  # once per episode (a scan still compiling would log it 20 times a second)
                log.warning("command ring of the hierarchy link is full: the scan is not running")
            self._ring_full = True
            self.st.applied, self.st.applied_energy, self.st.main_limit_w = (), (), math.nan
            self._state_sent = None
            return
        for cmd in out:
            ring.push(PRODUCER, *cmd)
        if self._ring_full:
            log.warning("command ring of the hierarchy link: the scan takes commands again")
        self._ring_full = False

    def tree_state(self) -> int:
        """The aggregate tree_state: 0 no parent (the top, or a child before its parent's first levels),
        1 controlled from above, 2 fallback (the parent's lease ran out: on its own main_limit_w), 3 handed back
        (the parent stopped in order: on its own, no fault)."""
        if self.uplink is None:
            return 0
        if self.st.leased:
            return 1
        return 3 if self.st.handed_back else (2 if self.st.fallbacks else 0)

    def _tree_state(self, v: dict) -> None:
        want = self.tree_state()
        if int(v["agg.tree_state"][0]) != want and want != self._state_sent:
            self._push(Op.SET_TREE_STATE, -1, float(want))
            self._state_sent = want
        elif int(v["agg.tree_state"][0]) == want:
            self._state_sent = None  # the image has it; a later difference (a restart) is sent again

    def _parent_levels(self, now: int) -> Levels | None:
        st = self.st
        if self.uplink is not None:
            seq, lease, lv = self.tree.decode_levels(self.uplink.levels_words())
            if self.tree.is_hand_back(seq, lease) and st.parent_seq != HAND_BACK_SEQ:
                # the parent stopped in order: its levels go now, not when their lease would have run out
                st.parent_seq, st.deadline_ns, st.levels, st.handed_back = HAND_BACK_SEQ, 0, None, True
                st.hand_backs += 1
                st.leased = False  # (no lapse to count below)
                log.info("parent handed the levels back (it stopped in order): on this controller's own "
                         "main_limit_w %.1f W", self.alone_limit_w)
            elif seq != st.parent_seq and 0 < lease <= 3_600_000 and all(not math.isnan(m) for m in lv.shed.values()) \
                    and not math.isnan(lv.lam):
                st.parent_seq, st.deadline_ns, st.levels = seq, now + lease * 1_000_000, lv
        leased = self.uplink is not None and st.levels is not None and now <= st.deadline_ns
        if st.leased and not leased:
            st.fallbacks += 1
            log.warning("parent stopped renewing the levels (lease ran out): on this controller's own "
                        "main_limit_w %.1f W", self.alone_limit_w)
        elif leased and not st.leased:
            st.handed_back = False
            log.warning("levels from the parent: controlled from above")
        st.leased = leased
        return st.levels if leased else None

    def _trace(self, event: str, **kw) -> None:
        if self.h.trace_file:
            with open(self.h.trace_file, "a") as f:
                f.write(json.dumps({"wall_s": time.time(), "event": event, **kw}) + "\n")

    async def round(self) -> None:
        now = self.clock_ns()
        t0 = time.perf_counter()
        v, _ = self.img.read_published()
        self.cycle = int(v["cycle"][0])
        parent = self._parent_levels(now)
        lv = parent
        if self.role == "leaf":
            summary = self.own_summary(v)
            lv = narrow_levels(summary, self.feeder_w, parent) if parent is not None else None  # what it applies
            self._apply_leaf(lv, now)
        else:
            await asyncio.gather(*(self._poll(c, None) for c in self.children))
            here = [c.summary for c in self.children if c.online and c.summary is not None]
            summary = Summary.total(here)
            if summary.energy is not None:  # the configured children missing from the sums, at every level
                summary.energy[:, hc.C_ABSENT] += len(self.children) - len(here)
            if parent is None:  # the top, or a level whose parent is gone: its own limit for its subtree
                limit = float(v["agg.main_limit_w"][0]) if self.uplink is None else self.alone_limit_w
                lv, _main = solve_levels(summary, limit)
                lv = self._decide(summary, lv, limit, now)
            else:
                self._decided_ns = None
                if parent.energy is not None:  # forwarded; their clocks and latches kept for a fallback
                    self.decider.adopt(parent.energy, summary.energy)
                lv = narrow_levels(summary, self.feeder_w, parent)  # its own where its feeder binds
            await asyncio.gather(*(self._write_levels(c, lv) for c in self.children if c.online))
        self.st.levels_now, self.st.source = lv, ("parent" if parent is not None else
                                                  ("own" if lv is not None else "none"))
        self._main_limit(summary, parent is not None)
        self._tree_state(v)
        self._flush()
        if self.uplink is not None:
            self.uplink.backend.refresh(v)
            self.uplink.tick(now)
            try:  # its offer through its feeder, at the levels it received last
                self.uplink.put_summary(narrow_summary(summary, self.feeder_w, parent, self.horizon_s), self.st.seq)
            except OverflowError as exc:
                log.warning("%s", exc)
        key = (round(summary.served_w, 6), round(summary.own_w, 6),
               tuple(round(c.hi, 6) for _, c in sorted(summary.classes.items())))
        if key != getattr(self, "_last_key", None):
            self._last_key = key
            self._trace("curves", served_w=summary.served_w)
        # a change beyond rounding (the weights drift a little every cycle while batteries discharge)
        q = lambda x: float(f"{x:.9g}") if math.isfinite(x) else x  # noqa: E731
        lkey = None if lv is None else (q(lv.lam), lv.dis, tuple((k, q(m)) for k, m in sorted(lv.shed.items())))
        if lkey != getattr(self, "_last_levels", None):
            self._last_levels = lkey
            self._trace("levels", lam=None if lv is None else _json_float(lv.lam),
                        shed=None if lv is None else {str(k): _json_float(m) for k, m in sorted(lv.shed.items())})
        self.summary = summary
        # per priority class over the whole subtree (the top: the whole tree), by the energy rules
        # (the top of its subtree: the rows of its own decisions, the flat controller's)
        decided = lv is not None and lv.energy is not None and parent is None and self.decider is not None
        self.classes = (self.decider.rows if decided else
                        hc.rows(summary.energy) if summary.energy is not None else [])
        self.round_ms = (time.perf_counter() - t0) * 1e3
        self.rounds_ms.append(self.round_ms)

    async def _send_levels(self, c: Child, lv: Levels) -> None:
        """The energy decisions first (they are taken with the levels' new LvSeq), then the levels."""
        t = self.tree
        if lv.energy is not None:
            words = t.encode_decisions(lv.energy)
            for a in range(0, len(words), 120):
                await self._read(c, "write_registers", address=t.dec_at + a, values=words[a:a + 120])
        self.st.seq = t.next_seq(self.st.seq)
        c.levels_sent = True  # (before the write: one that fails may still have reached the child)
        await self._read(c, "write_registers", address=t.levels_at,
                         values=t.encode_levels(lv, self.st.seq, self.h.lease_ms))

    async def hand_back(self) -> None:
        """The orderly stop: every child that was written levels gets the hand-back, so that none of them
        waits out the lease and takes the stop for a dead parent. A child it cannot reach now keeps its
        lease, which runs out (said in one warning)."""
        async def one(c: Child) -> str | None:
            try:
                if c.client is None or not c.client.connected:
                    return "not connected"
                await self._read(c, "write_registers", address=self.tree.levels_at,
                                 values=self.tree.encode_hand_back())
                return None
            except Exception as exc:  # noqa: BLE001 (one child's failure must not stop the others' hand-back)
                return str(exc) or type(exc).__name__
        kids = [c for c in self.children if c.levels_sent]
        why = await asyncio.gather(*(one(c) for c in kids))
        done = [c.id for c, w in zip(kids, why) if w is None]
        if done:
            log.info("levels handed back to %d child%s: %s", len(done), "ren" if len(done) != 1 else "",
                     ", ".join(done))
        for c, w in zip(kids, why):
            if w is not None:
                log.warning("child %s: levels not handed back (%s): their lease runs out", c.id, w)

    async def _write_levels(self, c: Child, lv: Levels) -> None:
        try:
            await self._send_levels(c, lv)
        except Exception as exc:  # noqa: BLE001
            log.info("child %s: levels not written: %s", c.id, exc)

    def _decide(self, summary: Summary, lv: Levels, limit_w: float, now_ns: int) -> Levels:
        """The top of its subtree: the class rules on the subtree's energy offer with its own main supply
        limit; the decisions travel with the levels."""
        dt_s = self.h.poll_ms / 1e3 if self._decided_ns is None else (now_ns - self._decided_ns) * 1e-9
        self._decided_ns = now_ns
        if summary.energy is None:
            return lv
        dec = self.decider.round(summary.energy, limit_w, dt_s, now_ns * 1e-9 + self.wall_offset_s)
        # the trace says what the class rules ran on whenever that or a latch changes
        o, d = summary.energy, self.decider
        key = (d.mode, tuple(bool(r["latched"]) for r in d.rows), tuple(o[:, hc.C_LEAVES]),
               tuple(o[:, hc.C_ON_TREE]), tuple(o[:, hc.C_ABSENT]))
        if key != self._last_decided:
            self._last_decided = key
            self._trace("decisions", mode=d.mode, dt_s=dt_s, leaves=float(o[:, hc.C_LEAVES].max()),
                        on_tree=float(o[:, hc.C_ON_TREE].min()), absent=float(o[:, hc.C_ABSENT].max()),
                        latched=[r["priority"] for r in d.rows if r["latched"]],
                        clock_s={str(r["priority"]): r["clock_s"] for r in d.rows},
                        frac={str(r["priority"]): r["frac"] for r in d.rows})
        return lv if dec is None else dataclasses.replace(lv, energy=dec)

    def _apply_leaf(self, lv: Levels | None, now_ns: int) -> None:
        k = self.h.classes
        want = (1.0 if lv.dis else 0.0, lv.lam) + tuple(lv.mu(c) for c in range(k)) if lv else ()
        if want != self.st.applied and lv is not None:
            # values first, the deadline last (the scan applies the commands in order)
            self._push(Op.SET_MEMORY, L_LEASED, 0.0, self.levels_index)
            for j, x in enumerate(want, start=L_DIS):
                self._push(Op.SET_MEMORY, j, x, self.levels_index)
        # the parent's lease as a wall-clock deadline, renewed every round (0: none)
        deadline = time.time() + (self.st.deadline_ns - now_ns) * 1e-9 if lv is not None else 0.0
        self._push(Op.SET_MEMORY, L_LEASED, deadline, self.levels_index)
        self.st.applied = want
        if self.energy_index is not None:
            self._apply_energy(lv.energy if lv is not None else None, deadline)

    def _apply_energy(self, dec: np.ndarray | None, deadline: float) -> None:
        """The tree's energy decisions into the energy program's memory `tree` (programs/energy/tree.py):
        the values that changed, then the lease (0: none, the leaf decides on its own)."""
        if dec is None:
            if self.st.applied_energy:
                self._push(Op.SET_MEMORY, 0, 0.0, self.energy_index)
                self.st.applied_energy = ()
            return
        want = tuple(float(x) for x in dec.reshape(-1))
        old = self.st.applied_energy
        for j, x in enumerate(want):
            same = bool(old) and (old[j] == x or (math.isnan(old[j]) and math.isnan(x)))
            if not same:
                self._push(Op.SET_MEMORY, T_AT + j, x, self.energy_index)
        self._push(Op.SET_MEMORY, 0, deadline, self.energy_index)
        self.st.applied_energy = want

    def _main_limit(self, s: Summary, exact: bool) -> None:
        u = self.uplink
        if u is None:
            return  # the top's limit is its operator's (plant.main_limit_w, OPC UA, reload)
        if exact:
            want = max(0.0, s.bus_w)  # its share of the feed under the tree's levels
        elif u is not None and u.mode[0] == ss.Mode.CONTROLLED:
            want = min(max(0.0, float(u.cmd["bus_w"][0])), self.feeder_w)  # the parent's instruction (no levels)
        else:
            want = self.alone_limit_w  # on its own: what its feeder carries at most
        if not (abs(want - self.st.main_limit_w) <= 1e-9 * (1.0 + abs(want))):
            self._push(Op.SET_MAIN_LIMIT, -1, want)
            self.st.main_limit_w = want

    def status(self) -> dict:
        lv = self.st.levels_now
        s = getattr(self, "summary", None)
        return {
            "role": self.role, "round_ms": getattr(self, "round_ms", None),
            "round_ms_p50": float(np.median(self.rounds_ms)) if self.rounds_ms else None,
            "round_ms_max": max(self.rounds_ms) if self.rounds_ms else None, "cycle": getattr(self, "cycle", 0), "wall_s": time.time(), "levels_from": self.st.source, "leased_from_parent": self.st.leased,
            "tree_state": self.tree_state(),
            "fallbacks": self.st.fallbacks,
            "hand_backs": self.st.hand_backs,
            "main_limit_w": self.st.main_limit_w if math.isfinite(self.st.main_limit_w) else None,
            "uplink_mode": (ss.Mode(int(self.uplink.mode[0])).name if self.uplink is not None else None),
            "uplink_port": (self.uplink.ports[0] if self.uplink is not None and self.uplink.ports else None),
            "levels": None if lv is None else {"lam": _json_float(lv.lam), "discharge": lv.dis,
                                               "shed": {str(k): _json_float(m) for k, m in lv.shed.items()}},
            "subtree": None if s is None else {"own_w": s.own_w, "served_w": s.served_w, "bus_w": s.bus_w,
                                               "battery_w": s.battery_w},
            "classes": getattr(self, "classes", []),
            # the energy decisions this level makes (the top of its subtree): waiting (neutral decisions
            # until the whole tree is on them), deciding, held (the tree not whole: the last ones), partial
            # (the rules on part of the tree after waiting); clean_rounds: rounds in a row on the whole tree
            "decisions": None if self.decider is None or self.st.source != "own" else {
                "mode": self.decider.mode, "clean_rounds": self.decider.clean_rounds,
                # the power runtime per priority (s from now; "inf": none binds) and how many of its
                # questions the whole tree answered (docs/hierarchy.md "Energy across levels")
                "power_s": {str(r["priority"]): _json_float(float(self.decider.power_s[r["priority"]]))
                            for r in self.decider.rows},
                "answers": self.decider.answers},
            "absent": None if s is None or s.energy is None else int(s.energy[:, hc.C_ABSENT].max()),
            "children": {c.id: {"online": c.online, "fault": c.fault,
                                "bus_w": c.summary.bus_w if c.summary else None,
                                "battery_w": c.summary.battery_w if c.summary else None} for c in self.children},
        }

    async def run(self, stop: asyncio.Event) -> None:
        if self.uplink is not None:
            await self.uplink.start()
            u = self.h.uplink
            log.warning("uplink: serving the virtual battery on %s:%d (unit %d, role %s)", u.host,
                        self.uplink.ports[0], u.unit_id, self.role)
            if u.ready_file:
                Path(u.ready_file).write_text(f"{self.uplink.ports[0]}\n")
        loop = asyncio.get_running_loop()
        period = self.h.poll_ms / 1e3
        due = loop.time()
        try:
            while not stop.is_set():
                await self.round()
                if self.h.status_file:
                    tmp = self.h.status_file + ".tmp"
                    Path(tmp).write_text(json.dumps(self.status(), indent=1))
                    os.replace(tmp, self.h.status_file)
                due += period
                if loop.time() > due + period:
                    due = loop.time()
                try:
                    await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
                except asyncio.TimeoutError:
                    pass
        finally:
            if stop.is_set():  # an orderly stop (not an error in a round): the levels go back to the children
                await self.hand_back()
            if self.uplink is not None:
                await self.uplink.stop()
            for c in self.children:
                if c.client is not None:
                    c.client.close()


def link_main(cfg, fleet, image_name: str, spec, level: int = logging.WARNING) -> None:
    from vbatt.kernel.rt import set_parent_death_signal

    set_parent_death_signal(signal.SIGTERM)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # a child's failure is logged once, by the link
    img = ProcessImage.attach(image_name, spec)

    async def main() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await Link(cfg, fleet, img).run(stop)

    try:
        asyncio.run(main())
    finally:
        img.close()
