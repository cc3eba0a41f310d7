"""vbatt's OPC UA server: the model, bound to the published process image.

The server reads the image's published block at its own rate (`publish_ms`)
through the seqlock (never blocking the scan), compares it with the previous
copy and writes only the values that changed, with the scan's cycle time as
SourceTimestamp. Operator writes and method calls are validated here and reach
the scan as commands (`img.commands`, producer 1), applied between cycles.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import time
from datetime import datetime, timezone

import numpy as np
from asyncua import Server, ua
from asyncua.server.address_space import AttributeService

from vbatt.kernel.fields import Field, aggregate_field, node_field
from vbatt.kernel.image import Ctl, Mode, Op, ProcessImage, ScanState
from vbatt.kernel.seqblock import TornRead
from vbatt.kernel.stats import summarize

from vbatt.opcua_models import fastpath, sessions
from vbatt.opcua_models.addrspace import Instances, build_instances
from vbatt.opcua_models.alarms import Alarms
from vbatt.opcua_models.classobjects import ClassObjects, class_keys, model_change_event
from vbatt.opcua_models.config import SECURITY_POLICIES, OpcuaServerConfig, state_dir
from vbatt.opcua_models.history import HISTORY_FILE, BatchHistory
from vbatt.opcua_models.model import NS_URI, TYPE_IDS, aggregate_vars, node_vars, scan_vars
from vbatt.opcua_models.nodeset import nodeset_path
from vbatt.opcua_models.security import RoleRuleset, TrustList, UserStore, VbattUserManager, ensure_server_certificate

__all__ = ["VbattOpcuaServer", "PRODUCER", "Bad"]

log = logging.getLogger("vbatt.opcua")
PRODUCER = 1  # command ring reserved for the OPC UA server
GC_YOUNG_ALLOCS = 50_000
GC_FULL_S = 600.0
_GOOD = ua.StatusCode()
_UNCERTAIN = ua.StatusCode(ua.StatusCodes.UncertainLastUsableValue)
_INT_TYPES = (ua.VariantType.SByte, ua.VariantType.Byte, ua.VariantType.Int16, ua.VariantType.UInt16,
              ua.VariantType.Int32, ua.VariantType.UInt32, ua.VariantType.Int64, ua.VariantType.UInt64)
_MODE_NAMES = {Mode.RUN: "RUN", Mode.STOP: "STOP"}
_STATE_NAMES = {ScanState.INIT: "INIT", ScanState.WAITING: "WAITING", ScanState.RUNNING: "RUNNING",
                ScanState.DONE: "DONE", ScanState.FAILED: "FAILED"}


class Bad(Exception):
    """An operator request refused with an OPC UA status code; nothing was changed."""

    def __init__(self, code: int, why: str):
        super().__init__(why)
        self.code = code


class _OperatorWrites(AttributeService):
    """Value writes to vbatt's namespace go through validation and the command ring, never into the space."""

    def __init__(self, aspace, owner: "VbattOpcuaServer"):
        super().__init__(aspace)
        self.owner = owner

    async def write(self, params: ua.WriteParameters, user=None):
        out = []
        for wv in params.NodesToWrite:
            if wv.NodeId.NamespaceIndex == self.owner.ns and getattr(user, "vrole", None) is not None:
                out.append(self.owner.operator_write(wv, user))
            else:
                single = ua.WriteParameters(NodesToWrite=[wv])
                out += await (super().write(single, user) if user is not None else super().write(single))
        return out


class VbattOpcuaServer:
    def __init__(self, cfg: OpcuaServerConfig, img: ProcessImage, node_ids, *, cycle_ms: float = 0.0,
                 classes: tuple[int, ...] | None = None):
        """classes: the priorities shown as class objects at the start; default: those of the nodes when
        the energy program publishes its class results (none without it). A class the program publishes
        later gets its object then (classobjects.py)."""
        self.cfg = cfg
        self.img = img
        self.node_ids = list(node_ids)
        self.index = {nid: i for i, nid in enumerate(self.node_ids)}
        self.cycle_ms = cycle_ms
        self.state = state_dir(cfg)
        self.server: Server | None = None
        self.inst: Instances | None = None
        self.alarms: Alarms | None = None
        self.history: BatchHistory | None = None
        self.ns = -1
        self._task: asyncio.Task | None = None
        self._stopping = False
        # two byte images of the published block, swapped every update: no allocation per tick
        n = img.spec.work_layout().size
        self._bufs = [np.zeros(n, np.uint8), np.zeros(n, np.uint8)]
        self._views = [img.spec.work_layout().views(b) for b in self._bufs]
        self._cur = 0
        self._last_seq = -1
        self._first = True
        self._scan_last: dict[str, object] = {}
        self._next_stats = 0.0
        self._next_gc = math.inf
        self._next_sample = 0.0
        self._next_flush = 0.0
        self.has_classes = all(k in self._views[0] for k in class_keys().values())
        if classes is None:
            classes = tuple(int(p) for p in np.unique(img.node["priority"])) if self.has_classes else ()
        self.classes = tuple(classes) if self.has_classes else ()
        self.class_objects: ClassObjects | None = None
        self.updates = 0  # values written into the address space (statistics, benchmarks)
        self.ticks = 0

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.cfg.host}:{self.cfg.port}/"

    async def start(self) -> None:
        cfg = self.cfg
        users = UserStore(self.state / "users.json")
        trust = TrustList(self.state)
        cert, key, _ = ensure_server_certificate(self.state, cfg.application_uri)
        mgr = VbattUserManager(users, trust, cfg.allow_anonymous, require_cert="None" not in cfg.security)
        server = self.server = Server(user_manager=mgr)
        server.iserver.bind_condition_methods = True  # ConditionRefresh (off in stock asyncua)
        server.iserver.allow_remote_admin = False
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("vbatt OPC UA server")
        server.product_uri = "urn:vbatt"
        server.manufacturer_name = "vbatt"
        await server.set_application_uri(cfg.application_uri)
        server.set_security_policy([getattr(ua.SecurityPolicyType, SECURITY_POLICIES[p]) for p in cfg.security],
                                   permission_ruleset=RoleRuleset())
        server.set_identity_tokens([ua.UserNameIdentityToken] + ([ua.AnonymousIdentityToken]
                                                                 if cfg.allow_anonymous else []))
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))
        server.set_certificate_validator(trust.validate)

        t0 = time.perf_counter()
        # The address space is millions of long-lived objects at 10,000 nodes: the cyclic GC
        # would rescan them during the build and on every later collection. Build without it,
        # then move them to the permanent generation.
        gc.disable()
        try:
            await server.import_xml(str(nodeset_path()))
            self.ns = await server.get_namespace_index(NS_URI)
            aspace = server.iserver.aspace
            self.inst = build_instances(aspace, self.ns, self.node_ids, self.classes)
            self.class_objects = ClassObjects(self.inst) if self.has_classes else None
        finally:
            gc.enable()
        gc.collect()
        gc.freeze()
        # Every tick makes tens of thousands of short-lived objects (values, notifications) that
        # die by reference count; with the stock thresholds the collector ran ~4,000 times in 20 s
        # with three clients (28 % of the server's time, pauses up to 315 ms). Collect the young
        # generations rarely, the old one on a timer (update()).
        gc.set_threshold(GC_YOUNG_ALLOCS, 50, 1_000_000)
        self._next_gc = time.monotonic() + GC_FULL_S
        log.info("address space: %d nodes built in %.2f s", len(self.node_ids), time.perf_counter() - t0)
        server.iserver.attribute_service = _OperatorWrites(aspace, self)
        handlers = {"ResetTrip": self._m_reset_trip, "SetPriority": self._m_set_priority,
                    "SetMainSupplyLimit": self._m_set_main_limit, "SetMode": self._m_set_mode,
                    "AcknowledgeAlarm": self._m_ack, "Reload": self._m_reload,
                    "SetRideThrough": self._m_set_ride_through}
        for name, nid in self.inst.methods.items():
            aspace.add_method_callback(nid, self._guard(handlers[name]))
        if cfg.history.enabled:
            scale = {v.name: v.scale for v in aggregate_vars() if v.historized}
            self.history = BatchHistory(self.state / HISTORY_FILE, {**self.inst.historized,
                                                                    **self.inst.class_historized}, scale,
                                        retention_s=cfg.history.retention_days * 86400)
            server.iserver.history_manager.set_storage(self.history)
            self.history.open()
        self.alarms = Alarms(server.iserver.isession, self.ns, self.node_ids, self.inst.node_objects,
                             self.inst.vb, self._push_ack)
        await self.alarms.init()
        fastpath.install()
        sessions.install(server.iserver)  # each request runs as the session its token names
        await server.start()
        await self.update()
        log.info("OPC UA server listening on %s (%s)", self.endpoint, ", ".join(cfg.security))

    async def serve(self) -> None:
        """Update at `publish_ms` (absolute deadlines, missed ticks skipped) until `stop()` or IO_STOP."""
        period = self.cfg.publish_ms / 1e3
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self._stopping and not self.img.ctl[Ctl.IO_STOP]:
            await self.update()
            due += period
            now = loop.time()
            if now > due:
                due += math.ceil((now - due) / period) * period
            await asyncio.sleep(due - now)

    async def stop(self) -> None:
        self._stopping = True
        if self.history is not None:
            self.history.close()
        if self.server is not None:
            await self.server.stop()
            self.server = None

    # -- image -> address space ------------------------------------------------------------------------
    def _source_time(self, t_mono_ns: int) -> datetime:
        now_mono = time.monotonic_ns()
        wall = time.time_ns() - (now_mono - t_mono_ns) if 0 < t_mono_ns <= now_mono else time.time_ns()
        return datetime.fromtimestamp(wall / 1e9, tz=timezone.utc)

    async def update(self) -> int:
        """One tick: copy the published image, write what changed; returns values written."""
        self.ticks += 1
        if time.monotonic() >= self._next_gc:  # cyclic garbage (sessions, failed requests) of the old generation
            t = time.perf_counter()
            gc.collect()
            self._next_gc = time.monotonic() + GC_FULL_S
            log.debug("full garbage collection: %.0f ms", (time.perf_counter() - t) * 1e3)
        written = await self._update_scan()
        if self.alarms is not None:
            await self.alarms.watchdog(bool(self.img.ctl[Ctl.WATCHDOG]))
        nxt = 1 - self._cur
        try:
            seq = self.img.pub.read_raw(self._bufs[nxt])
        except TornRead:
            return written
        if seq == self._last_seq or seq == 0:
            return written
        self._last_seq = seq
        new, old = self._views[nxt], self._views[self._cur]
        self._cur = nxt
        src = self._source_time(int(new["time_ns"][0]))
        now = datetime.now(timezone.utc)
        first = self._first
        self._first = False
        online, online_old = new["node.online"], old["node.online"]
        flipped = online != online_old
        for v in node_vars():
            a, b = new["node." + v.name], old["node." + v.name]
            if first:
                idx = np.arange(a.shape[0])
            else:
                mask = a != b
                if a.dtype.kind == "f":
                    mask &= ~(np.isnan(a) & np.isnan(b))
                if v.field.kind.value == "input":
                    mask |= flipped
                idx = np.flatnonzero(mask)
            if idx.size == 0:
                continue
            input_field = v.field.kind.value == "input" and v.name != "online"
            vals = a[idx]
            vals = (vals * v.scale).tolist() if v.scale != 1.0 else vals.astype(bool).tolist() \
                if v.vtype == ua.VariantType.Boolean else vals.tolist()
            status = online[idx].tolist() if input_field else None
            written += await self._write(self.inst.node_values[v.name], idx.tolist(), vals, v.vtype, src, now, status)
            # Let the subscriptions publish between fields: a tick of 1,000 nodes holds the event
            # loop for a few hundred ms with three clients, and their values would wait for the end.
            await asyncio.sleep(0)
        for v in aggregate_vars():
            a, b = new["agg." + v.name], old["agg." + v.name]
            if first or (a[0] != b[0] and not (math.isnan(a[0]) and math.isnan(b[0]))):
                written += await self._write([self.inst.agg_values[v.name]], [0], [float(a[0]) * v.scale],
                                             v.vtype, src, now, None)
        rows, added, gone = self._sync_classes(new)
        if self.class_objects is not None:
            written += await self.class_objects.write(rows, gone, src, now, self._write)
        if added:  # told once the new objects hold their first values
            ev = model_change_event(self.inst, [self.inst.class_objects[p] for p in added],
                                    ua.NodeId(TYPE_IDS["PriorityClassType"], self.ns))
            await self.server.iserver.isession.subscription_service.trigger_event(ev)
        if self.history is not None:
            await self._historize(new, rows)
        if self.alarms is not None:
            await self.alarms.update(new["node.trip"], new["node.alarm"])
            await self.alarms.tree_fallback(int(new["agg.tree_state"][0]) == 2)
            if self.class_objects is not None:
                await self.alarms.ride_through(rows, self.inst.class_objects, gone)
        self.updates += written
        return written

    @staticmethod
    async def _write(avs, idx, vals, vt, src, now, online) -> int:
        pending: dict = {}
        fastpath.write_values(avs, idx, vals, vt, online, _GOOD, _UNCERTAIN, src, now, pending)
        await fastpath.flush(pending)
        return len(idx)

    def _sync_classes(self, views) -> tuple[dict[int, dict[str, object]], list[int], list[int]]:
        """The class rows published (priority -> {var: value}), the classes that appeared (each gets
        its object and its history record) and the classes gone since the last update."""
        if self.class_objects is None:
            return {}, [], []
        rows = self.class_objects.rows(views)
        added = self.class_objects.add_new(rows)
        if added and self.history is not None:
            self.history.names.update(self.inst.class_historized)
        return rows, added, self.class_objects.vanished(rows)

    async def _historize(self, views, rows) -> None:
        t = time.monotonic()
        if t >= self._next_sample:
            self._next_sample = t + self.cfg.history.sample_ms / 1e3
            t_ns = int(self._source_time(int(views["time_ns"][0])).timestamp() * 1e9)
            for name in self.inst.historized.values():
                self.history.append(name, t_ns, float(views["agg." + name][0]))
            for name in self.inst.class_historized.values():
                _, p, var = name.split(".")
                if int(p) in rows:
                    self.history.append(name, t_ns, rows[int(p)][var])
        if t >= self._next_flush:
            self._next_flush = t + self.cfg.history.flush_s
            self.history.flush()

    async def _update_scan(self) -> int:
        ctl = self.img.ctl
        vals: dict[str, object] = {
            "mode": _MODE_NAMES.get(int(ctl[Ctl.MODE]), str(int(ctl[Ctl.MODE]))),
            "state": _STATE_NAMES.get(int(ctl[Ctl.STATE]), str(int(ctl[Ctl.STATE]))),
            "cycles": int(ctl[Ctl.CYCLES]), "overruns": int(ctl[Ctl.OVERRUNS]),
            "watchdog": bool(ctl[Ctl.WATCHDOG]), "safe_state": bool(ctl[Ctl.SAFE_STATE]),
            "program_faults": int(ctl[Ctl.PROGRAM_FAULTS]), "torn_reads": int(ctl[Ctl.TORN_READS]),
            "cycle_ms": float(self.cycle_ms),
        }
        t = time.monotonic()
        if t >= self._next_stats and "stats.hist" in self.img.mem:
            self._next_stats = t + self.cfg.stats_ms / 1e3
            s = summarize(self.img.mem)
            for metric in ("exec", "wake", "jitter"):
                win = s[f"{metric}_us"]["window"]
                for q in ("p50", "p99", "max"):
                    vals[f"{metric}_{q}_us"] = float(win.get(q, 0.0))
        now = datetime.now(timezone.utc)
        n = 0
        for v in scan_vars():
            if v.name in vals and self._scan_last.get(v.name) != vals[v.name]:
                self._scan_last[v.name] = vals[v.name]
                n += await self._write([self.inst.scan_values[v.name]], [0], [vals[v.name]], v.vtype, now, now, None)
        return n

    # -- operator requests -----------------------------------------------------------------------------
    def _push(self, op: int, node: int = -1, value: float = 0.0, arg: int = 0) -> None:
        try:
            self.img.commands.push(PRODUCER, op, node=node, value=value, arg=arg)
        except BufferError as exc:
            raise Bad(ua.StatusCodes.BadTooManyOperations, str(exc)) from None

    def _push_ack(self, node: int, bits: int) -> None:
        self._push(Op.ACK_ALARM, node=node, arg=bits)

    def operator_write(self, wv: ua.WriteValue, user) -> ua.StatusCode:
        try:
            if getattr(user, "vrole", None) != "operator":
                raise Bad(ua.StatusCodes.BadUserAccessDenied, "only operators write")
            target = self.inst.writable.get(wv.NodeId)
            if target is None or wv.AttributeId != ua.AttributeIds.Value:
                raise Bad(ua.StatusCodes.BadNotWritable, f"{wv.NodeId.to_string()} is not writable")
            if wv.IndexRange:
                raise Bad(ua.StatusCodes.BadWriteNotSupported, "no index range on scalars")
            scope, name, node = target
            var = wv.Value.Value if wv.Value is not None else None
            f = node_field(name) if scope == "node" else aggregate_field(name)  # writable = operator_settable
            self._push(getattr(Op, f.command), node=node, value=float(self._setting(f, var, exact=True)))
        except Bad as exc:
            log.warning("write to %s refused: %s", wv.NodeId.to_string(), exc)
            return ua.StatusCode(exc.code)
        return ua.StatusCode()

    def _node(self, var) -> int:
        if not isinstance(var, ua.Variant) or var.VariantType != ua.VariantType.String:
            raise Bad(ua.StatusCodes.BadTypeMismatch, "node_id: expected a String")
        i = self.index.get(var.Value)
        if i is None:
            raise Bad(ua.StatusCodes.BadNodeIdUnknown, f"no node {var.Value!r}")
        return i

    @staticmethod
    def _setting(f: Field, var, exact: bool = False) -> int | float:
        """The value of an operator setting, checked against its field: type and range (table)."""
        if f.np_dtype.kind in "iu":
            if not isinstance(var, ua.Variant) or var.VariantType not in _INT_TYPES or isinstance(var.Value, bool):
                raise Bad(ua.StatusCodes.BadTypeMismatch, f"{f.name}: expected an integer")
            if not (f.lo <= var.Value <= f.hi):
                raise Bad(ua.StatusCodes.BadOutOfRange, f"{f.name} {var.Value}: expected {f.lo:g}..{f.hi:g}")
            return int(var.Value)
        ok = (ua.VariantType.Double,) if exact else (ua.VariantType.Double, ua.VariantType.Float)
        if not isinstance(var, ua.Variant) or var.VariantType not in ok:
            raise Bad(ua.StatusCodes.BadTypeMismatch, f"{f.name}: expected a Double ({f.unit})")
        x = float(var.Value)
        if not math.isfinite(x) or not (f.lo <= x <= f.hi):
            raise Bad(ua.StatusCodes.BadOutOfRange, f"{f.name} {x!r}: expected {f.lo:g}..{f.hi:g} {f.unit}")
        return x

    def _guard(self, fn):
        async def call(parent, *args):
            try:
                return await fn(*args)
            except Bad as exc:
                log.warning("method %s refused: %s", fn.__name__, exc)
                return ua.StatusCode(exc.code)
            except TypeError:  # wrong number of arguments
                return ua.StatusCode(ua.StatusCodes.BadArgumentsMissing)
        call.__name__ = fn.__name__
        return call

    async def _m_reset_trip(self, node_id):
        self._push(Op.RESET_TRIP, node=self._node(node_id))
        return []

    async def _m_set_priority(self, node_id, priority):
        i = self._node(node_id)
        f = node_field("priority")
        self._push(getattr(Op, f.command), node=i, value=float(self._setting(f, priority)))
        return []

    async def _m_set_main_limit(self, watts):
        f = aggregate_field("main_limit_w")
        self._push(getattr(Op, f.command), value=self._setting(f, watts))
        return []

    async def _m_set_mode(self, mode):
        if not isinstance(mode, ua.Variant) or mode.VariantType != ua.VariantType.String:
            raise Bad(ua.StatusCodes.BadTypeMismatch, "mode: expected a String, RUN or STOP")
        m = {"RUN": Mode.RUN, "STOP": Mode.STOP}.get(str(mode.Value).upper())
        if m is None:
            raise Bad(ua.StatusCodes.BadOutOfRange, f"mode {mode.Value!r}: expected RUN or STOP")
        self._push(Op.SET_MODE, value=float(m))
        return []

    async def _m_reload(self, path):
        """Same protocol as `vbatt reload`: the supervisor (our parent) validates, diffs and applies."""
        from vbatt.supervise.reload import send

        if not isinstance(path, ua.Variant) or path.VariantType != ua.VariantType.String or not path.Value:
            raise Bad(ua.StatusCodes.BadTypeMismatch, "config_path: expected a String")
        if not os.path.isfile(path.Value):
            raise Bad(ua.StatusCodes.BadInvalidArgument, f"config_path {path.Value!r}: no such file on the controller")
        answer = await asyncio.get_running_loop().run_in_executor(None, send, os.getppid(), path.Value)
        if not answer["ok"]:
            raise Bad(ua.StatusCodes.BadInvalidState if "refused" in answer["message"]
                      else ua.StatusCodes.BadConfigurationError, answer["message"])
        log.warning("reload through OPC UA: %s", answer["message"])
        return []

    async def _m_set_ride_through(self, priority, seconds):
        """The energy program's target of a class: Op.SET_MEMORY on its setting (programs/energy)."""
        from vbatt.supervise.reload import RIDE_THROUGH_MEMORY

        if not isinstance(priority, ua.Variant) or priority.VariantType not in _INT_TYPES \
                or isinstance(priority.Value, bool):
            raise Bad(ua.StatusCodes.BadTypeMismatch, "priority: expected an integer")
        if not isinstance(seconds, ua.Variant) or seconds.VariantType != ua.VariantType.Double:
            raise Bad(ua.StatusCodes.BadTypeMismatch, "seconds: expected a Double (s)")
        if RIDE_THROUGH_MEMORY not in self.img.spec.memory_names():
            raise Bad(ua.StatusCodes.BadInvalidState, "the energy program does not run: no ride-through targets")
        p, x = int(priority.Value), float(seconds.Value)
        present = sorted(int(q) for q in np.unique(self._views[self._cur]["node.priority"]))
        if p not in present:
            raise Bad(ua.StatusCodes.BadOutOfRange, f"priority {p}: no node has it (classes: {present})")
        if not math.isfinite(x) or x < 0:
            raise Bad(ua.StatusCodes.BadOutOfRange, f"seconds {x!r}: expected a number >= 0")
        self._push(Op.SET_MEMORY, node=p, value=x, arg=self.img.spec.memory_index(RIDE_THROUGH_MEMORY))
        return []

    async def _m_ack(self, node_id, bits):
        i = self._node(node_id)
        if not isinstance(bits, ua.Variant) or bits.VariantType not in _INT_TYPES or not 0 <= bits.Value < 2**32:
            raise Bad(ua.StatusCodes.BadTypeMismatch, "alarm_bits: expected a UInt32")
        n = await self.alarms.acknowledge_node(i, int(bits.Value))
        if n == 0:
            self._push(Op.ACK_ALARM, node=i, arg=int(bits.Value) or 0xFFFFFFFF)
        return []

