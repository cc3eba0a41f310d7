"""Nodes whose fields are variables of external OPC UA servers (docs/opcua_client.md).

One asyncio loop in the driver's I/O process, one task per server connection,
so a slow or dead server never delays another. Inputs arrive by subscription:
every publish response (data or keep-alive) proves the server is alive and the
last values still current, so it stamps `updated_ns` of the server's complete,
good nodes; a node whose data stops arriving goes stale in the scan by itself.
Outputs are written back when the scan published a new cycle and a value changed.
A failed connection faults the server's nodes with the most specific code and is
retried with exponential backoff (the skeleton of drivers/aio.py: a server
connection is a link, a session is made in `connect`, a round is one tick).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field

from asyncua import Client, ua
from asyncua.client.ua_client import UaClientState
from asyncua.common.subscription import Subscription
from asyncua.crypto import security_policies

from vbatt.kernel.fields import node_field
from vbatt.kernel.seqblock import TornRead

from vbatt.drivers.aio import AsyncDriver, Links
from vbatt.drivers.base import IoContext
from vbatt.drivers.faults import Fault
from vbatt.drivers.opcua.config import OpcuaNodeConfig, parse_node_id

__all__ = ["OpcuaClientDriver", "UntrustedServer", "fault_of", "TICK_S"]

log = logging.getLogger("vbatt.drivers.opcua")

TICK_S = 0.025  # how often a connection looks at liveness, outputs and the stop flag
CLOSE_TIMEOUT_S = 1.0  # an orderly goodbye to a server; the socket is dropped after that

# Status codes that mean "security or identity refused", not "network broken".
_SECURITY_WORDS = ("Certificate", "Security", "Identity", "UserAccess", "Nonce", "Signature")
_TIMEOUT_CODES = {ua.StatusCodes.BadTimeout, ua.StatusCodes.BadRequestTimeout}
_ITEM_CODES = {ua.StatusCodes.BadNodeIdUnknown, ua.StatusCodes.BadNodeIdInvalid,
               ua.StatusCodes.BadAttributeIdInvalid, ua.StatusCodes.BadTypeMismatch,
               ua.StatusCodes.BadOutOfRange, ua.StatusCodes.BadNotReadable, ua.StatusCodes.BadNotWritable}

# Integer types an output may have, with their limits (values are rounded and clamped);
# Float and Double take the value as it is, any other type is not written.
_INT_RANGE = {
    ua.VariantType.SByte: (-2**7, 2**7 - 1), ua.VariantType.Byte: (0, 2**8 - 1),
    ua.VariantType.Int16: (-2**15, 2**15 - 1), ua.VariantType.UInt16: (0, 2**16 - 1),
    ua.VariantType.Int32: (-2**31, 2**31 - 1), ua.VariantType.UInt32: (0, 2**32 - 1),
    ua.VariantType.Int64: (-2**63, 2**63 - 1), ua.VariantType.UInt64: (0, 2**64 - 1),
}
_FLOATS = (ua.VariantType.Float, ua.VariantType.Double)


class UntrustedServer(Exception):
    """The server presents another certificate than the pinned one, or offers no matching endpoint."""


def fault_of(exc: BaseException) -> Fault:
    """The most specific fault code for an exception out of a connection."""
    if isinstance(exc, UntrustedServer):
        return Fault.TLS
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return Fault.TIMEOUT
    if isinstance(exc, ua.UaStatusCodeError):
        code = exc.code
        name = ua.StatusCode(code).name
        if code in _TIMEOUT_CODES:
            return Fault.TIMEOUT
        if any(w in name for w in _SECURITY_WORDS):
            return Fault.TLS
        if code in _ITEM_CODES:
            return Fault.BAD_VALUE
        return Fault.CONNECTION
    if isinstance(exc, (ConnectionError, OSError, EOFError)):
        return Fault.CONNECTION
    if isinstance(exc, _CryptoError):
        return Fault.TLS
    if isinstance(exc, ua.UaError):
        return Fault.GARBLED  # a reply the protocol layer could not make sense of
    return Fault.CONNECTION


try:
    from cryptography.exceptions import InvalidKey, InvalidSignature

    _CryptoError: tuple[type, ...] = (InvalidSignature, InvalidKey)
except ImportError:  # pragma: no cover - cryptography is a dependency
    _CryptoError = ()


@dataclass
class _Item:
    """One mapped variable of one node."""

    node: int  # local index into the driver's node range
    name: str  # vbatt field name
    text: str  # NodeId as configured
    scale: float
    offset: float
    lo: float
    hi: float
    nodeid: object = None  # ua.NodeId resolved on the connected server
    seen: bool = False  # a good value arrived since the connection was made
    bad: str = ""  # why the last value was refused ("" = good)
    vtype: object = None  # outputs: the server variable's VariantType
    written: float = math.nan  # outputs: last value the server accepted


@dataclass
class _Server:
    """One connection and the nodes it carries."""

    endpoint: str
    cfg: OpcuaNodeConfig  # the first node's config (all share endpoint, security and user)
    index: int  # its link number (its fault and reason are the links' comm_fault, reason)
    nodes: list[int] = field(default_factory=list)
    inputs: list[_Item] = field(default_factory=list)
    outputs: list[_Item] = field(default_factory=list)
    client: Client | None = None
    lost: str = ""  # set by the subscription when the server reports it gone
    last_publish_ns: int = 0
    liveness_ns: int = 0
    written_cycle: int = -1
    next_write_ns: int = 0

    @property
    def name(self) -> str:
        return self.endpoint


class _Feed(Subscription):
    """A subscription that hands every publish response to the driver at once.

    The stock handler path spawns one task per changed value; here a response is
    applied in one call, and keep-alives (responses without data) are seen too.
    """

    def __init__(self, session, params, on_publish) -> None:
        super().__init__(session, params, handler=None, queue_maxsize=1)
        self._on_publish = on_publish

    async def publish_callback(self, publish_result: ua.PublishResult) -> None:
        self.last_publish_at = time.monotonic()
        msg = publish_result.NotificationMessage
        if msg.NotificationData:
            self.last_sequence_number = int(msg.SequenceNumber)
        self._on_publish(msg.NotificationData or ())


class _Sessions(Links):
    """The driver's server connections as links: connect = session + subscription, a round = one tick."""

    log = log
    spread = False
    drop_on_error = True  # a failed session is closed and made anew after the backoff

    def __init__(self, drv: "OpcuaClientDriver"):
        d = drv.dcfg
        super().__init__(len(drv.servers), interval_s=TICK_S,
                         backoff_s=(d.reconnect_min_ms / 1e3, d.reconnect_max_ms / 1e3))
        self.connect_timeout_s = d.connect_timeout_ms / 1e3
        self.drv, self.servers = drv, drv.servers

    def describe(self, k: int) -> str:
        return self.servers[k].name

    def connected(self, k: int) -> bool:
        return self.servers[k].client is not None

    async def connect(self, k: int) -> None:
        srv = self.servers[k]
        t0 = time.monotonic_ns()
        await self.drv._connect(srv)
        self.drv._count(srv, requests=1, latency_ns=time.monotonic_ns() - t0)
        log.info("%s: connected (%d nodes)", srv.name, len(srv.nodes))

    async def exchange(self, k: int) -> None:
        await self.drv._exchange(self.servers[k])

    async def disconnect(self, k: int) -> None:
        await self.drv._close(self.servers[k])

    def fault_of(self, exc: Exception) -> tuple[Fault, str]:
        return fault_of(exc), f"{type(exc).__name__}: {exc}".rstrip(": ")

    def counted(self, k: int, fault: Fault) -> None:
        self.drv._count(self.servers[k], requests=1, errors=1)

    def changed(self, k: int) -> None:
        self.drv._refresh(self.servers[k], stamp=False)


class OpcuaClientDriver(AsyncDriver):
    kind = "opcua"
    period_s = TICK_S  # the main loop only takes the instruction; data is published as it arrives

    # -- setup -------------------------------------------------------------------
    def _plan(self, io: IoContext) -> list[_Server]:
        """Group this range's nodes by connection and list their mapped variables."""
        servers: dict[tuple, _Server] = {}
        entries = [e for e in self.cfg.nodes if isinstance(e, OpcuaNodeConfig)]
        by_id = {e.id: e for e in entries}
        for i, nid in enumerate(self.fleet.ids[self.start:self.stop]):
            ncfg = by_id[nid]
            srv = servers.setdefault(ncfg.connection_key(), _Server(ncfg.endpoint, ncfg, len(servers)))
            srv.nodes.append(i)
            for name, item in ncfg.inputs:
                if item is not None:
                    f = node_field(name)
                    srv.inputs.append(_Item(i, name, item.node_id, item.scale, item.offset, f.lo, f.hi))
            for name, item in ncfg.outputs:
                if item is not None:
                    srv.outputs.append(_Item(i, name, item.node_id, item.scale, item.offset, -math.inf, math.inf))
            for name, value in ncfg.constants:
                if value is not None:
                    io.staging[name][i] = value
        return list(servers.values())

    async def open_links(self, io: IoContext) -> Links:
        dcfg = self.cfg.drivers.opcua
        self.io = io
        self.dcfg = dcfg
        self.servers = self._plan(io)
        quiet_ms = dcfg.publishing_interval_ms * (dcfg.keepalive_count or 1)
        if quiet_ms >= self.cfg.plant.stale_ms:
            log.error("drivers.opcua: a keep-alive only every %g ms but plant.stale_ms is %g: unchanged nodes "
                      "will flap offline (lower publishing_interval_ms or keepalive_count)",
                      quiet_ms, self.cfg.plant.stale_ms)
        # a session being made may take its connect timeout; then it is cancelled and closed
        self.stop_timeout_s = dcfg.request_timeout_ms / 1e3 + CLOSE_TIMEOUT_S
        io.staging["fault"][:] = Fault.NO_DATA
        self.links = _Sessions(self)
        return self.links

    async def flush(self, new: bool) -> None:
        """Each live session sends the last instruction (the safe state) before the goodbye."""
        async def last(srv: _Server) -> None:
            try:
                await self._write(srv, final=True)
            except Exception as exc:  # a server that cannot take it any more: its fault, never a crash
                self.links.counted(srv.index, fault_of(exc))

        live = [srv for srv in self.servers if srv.client is not None]
        await asyncio.gather(*(last(srv) for srv in live))

    async def _connect(self, srv: _Server) -> None:
        dcfg, ncfg = self.dcfg, srv.cfg
        client = Client(srv.endpoint, timeout=dcfg.request_timeout_ms / 1e3)
        srv.client = client
        srv.lost = ""
        client.session_timeout = dcfg.session_timeout_ms
        client.name = client.description = "vbatt"
        sec = ncfg.security
        if sec is not None:
            await _check_server_certificate(srv.endpoint, sec, dcfg.request_timeout_ms / 1e3)
            uri = _certificate_uri(sec.certificate)
            if uri:  # servers check that the application URI is the certificate's
                client.application_uri = uri
            password = os.environ.get(sec.private_key_password_env) if sec.private_key_password_env else None
            await client.set_security(
                getattr(security_policies, f"SecurityPolicy{sec.policy}"), sec.certificate, sec.private_key,
                password, sec.server_certificate, getattr(ua.MessageSecurityMode, sec.mode))
        if ncfg.username is not None:
            client.set_user(ncfg.username)
            client.set_password(os.environ.get(ncfg.password_env, ""))
        await client.connect()
        await self._resolve(srv, client)
        await self._subscribe(srv, client)
        srv.written_cycle = -1  # a new session gets the whole instruction again
        for item in srv.outputs:
            item.written = math.nan

    async def _resolve(self, srv: _Server, client: Client) -> None:
        """NodeIds given by namespace URI get this server's index; outputs learn their data type."""
        ns_array: list[str] | None = None
        for item in srv.inputs + srv.outputs:
            item.seen, item.bad, item.vtype = False, "", None
            nid = parse_node_id(item.text)
            if getattr(nid, "ServerIndex", None):
                item.bad = "srv= (a NodeId on another server) is not supported"
                item.nodeid = None
                continue
            if getattr(nid, "NamespaceUri", None):  # only ExpandedNodeId has it
                if ns_array is None:
                    ns_array = await client.get_namespace_array()
                if nid.NamespaceUri not in ns_array:
                    item.bad = f"namespace {nid.NamespaceUri!r} is not on the server"
                    item.nodeid = None
                    continue
                nid = ua.NodeId(nid.Identifier, ns_array.index(nid.NamespaceUri), nid.NodeIdType)
            item.nodeid = ua.NodeId(nid.Identifier, nid.NamespaceIndex, nid.NodeIdType)
        outs = [it for it in srv.outputs if it.nodeid is not None]
        if outs:
            params = ua.ReadParameters()
            for it in outs:
                rv = ua.ReadValueId()
                rv.NodeId, rv.AttributeId = it.nodeid, ua.AttributeIds.DataType
                params.NodesToRead.append(rv)
            for it, dv in zip(outs, await client.uaclient.read(params)):
                if not dv.StatusCode.is_good():
                    it.bad = f"data type unreadable: {dv.StatusCode.name}"
                    continue
                dt = dv.Value.Value
                known = dt.NamespaceIndex == 0 and isinstance(dt.Identifier, int)
                vt = ua.VariantType(dt.Identifier) if known and dt.Identifier in ua.VariantType._value2member_map_ \
                    else ua.VariantType.Double
                if vt not in _FLOATS and vt not in _INT_RANGE:
                    it.bad = f"not a numeric variable ({vt.name})"
                    continue
                it.vtype = vt
        for it in srv.inputs + srv.outputs:
            if it.bad:
                log.error("%s: node %s: %s %s: %s", srv.name, self._node_id(it.node), it.name, it.text, it.bad)

    async def _subscribe(self, srv: _Server, client: Client) -> None:
        dcfg = self.dcfg
        interval = dcfg.publishing_interval_ms
        keepalive = dcfg.keepalive_count or max(1, int(self.cfg.plant.stale_ms / (3 * interval)))
        params = ua.CreateSubscriptionParameters()
        params.RequestedPublishingInterval = interval
        params.RequestedMaxKeepAliveCount = keepalive
        params.RequestedLifetimeCount = keepalive * 3
        params.MaxNotificationsPerPublish = 0  # no limit
        params.PublishingEnabled = True
        params.Priority = 0
        self.links.clear(srv.index)  # the first values may arrive before create returns
        sub = _Feed(client.uaclient.session, params, lambda data: self._on_publish(srv, data))
        result = await sub.init()
        # the server may revise the rate: judge liveness by what it promised
        period_ms = result.RevisedPublishingInterval * max(1, result.RevisedMaxKeepAliveCount)
        srv.liveness_ns = int(max(3 * period_ms, dcfg.request_timeout_ms) * 1e6)
        srv.last_publish_ns = time.monotonic_ns()
        live = [(h, it) for h, it in enumerate(srv.inputs) if it.nodeid is not None]
        if not live:
            self._refresh(srv, stamp=False)
            return
        sampling = interval if dcfg.sampling_interval_ms is None else dcfg.sampling_interval_ms
        requests = []
        for h, it in live:
            mp = ua.MonitoringParameters()
            mp.ClientHandle = h  # our index: a notification finds its item without a lookup table
            mp.SamplingInterval = sampling
            mp.QueueSize = 1
            mp.DiscardOldest = True
            mir = ua.MonitoredItemCreateRequest()
            mir.ItemToMonitor = ua.ReadValueId(NodeId=it.nodeid, AttributeId=ua.AttributeIds.Value)
            mir.MonitoringMode = ua.MonitoringMode.Reporting
            mir.RequestedParameters = mp
            requests.append(mir)
        results = await sub.create_monitored_items(requests)
        for (_, it), res in zip(live, results):
            if isinstance(res, ua.StatusCode):
                it.bad = f"cannot subscribe: {res.name}"
                log.error("%s: node %s: %s %s: %s", srv.name, self._node_id(it.node), it.name, it.text, it.bad)
        self._refresh(srv, stamp=False)

    async def _exchange(self, srv: _Server) -> None:
        """One tick: raise when the connection is gone or silent; send outputs when due."""
        client = srv.client
        assert client is not None
        if client.uaclient.state is not UaClientState.CONNECTED:
            raise ConnectionError(f"connection lost ({client.uaclient.state.value})")
        if srv.lost:
            raise ConnectionError(srv.lost)
        now = time.monotonic_ns()
        if now - srv.last_publish_ns > srv.liveness_ns:
            raise TimeoutError(f"no publish response for {(now - srv.last_publish_ns) / 1e6:.0f} ms")
        if srv.outputs and now >= srv.next_write_ns and self.io.output_cycle != srv.written_cycle:
            await self._write(srv)
            srv.next_write_ns = now + int(self.dcfg.write_interval_ms * 1e6)

    async def _write(self, srv: _Server, final: bool = False) -> None:
        io = self.io
        if final:
            with contextlib.suppress(TornRead):
                io.read_outputs()
        if not srv.outputs or io.output_cycle in (0, srv.written_cycle):
            return
        items, values = [], []
        for it in srv.outputs:
            if it.vtype is None:
                continue  # unknown NodeId or not a number: nothing to write to
            value = (float(io.outputs[it.name][it.node]) - it.offset) / it.scale
            if not math.isfinite(value):
                continue
            var = _variant(value, it.vtype)
            if float(var.Value) == it.written:
                continue
            items.append(it)
            values.append(var)
        srv.written_cycle = io.output_cycle
        if not items:
            return
        params = ua.WriteParameters()
        for it, var in zip(items, values):
            wv = ua.WriteValue()
            wv.NodeId, wv.AttributeId = it.nodeid, ua.AttributeIds.Value
            wv.Value = ua.DataValue(var)
            params.NodesToWrite.append(wv)
        t0 = time.monotonic_ns()
        timeout = self.dcfg.request_timeout_ms / 1e3
        statuses = await asyncio.wait_for(srv.client.uaclient.write(params),
                                          min(timeout, CLOSE_TIMEOUT_S) if final else timeout)
        latency = time.monotonic_ns() - t0
        touched: dict[int, int] = {}
        for it, var, st in zip(items, values, statuses):
            touched.setdefault(it.node, 0)
            if st.is_good():
                it.written = float(var.Value)
                if it.bad.startswith("write refused"):
                    it.bad = ""
            else:
                it.written = math.nan  # try again with the next instruction
                if not it.bad:
                    log.error("%s: node %s: write %s -> %s refused: %s", srv.name, self._node_id(it.node),
                              it.name, it.text, st.name)
                it.bad = f"write refused: {st.name}"
                touched[it.node] += 1
        st_ = io.staging
        for i, errs in touched.items():
            st_["io_requests"][i] += 1
            st_["io_errors"][i] += errs
            st_["io_latency_ms"][i] = latency / 1e6
        self._refresh(srv, stamp=False)

    async def _close(self, srv: _Server) -> None:
        client, srv.client = srv.client, None
        if client is None:
            return
        try:
            await asyncio.wait_for(client.disconnect(), CLOSE_TIMEOUT_S)
        except Exception:  # a dead server cannot say goodbye; the socket goes anyway
            pass
        finally:
            try:
                client.disconnect_socket()
            except Exception:
                pass

    # -- data ------------------------------------------------------------------------
    def _on_publish(self, srv: _Server, data) -> None:
        st = self.io.staging
        for notif in data:
            if isinstance(notif, ua.DataChangeNotification):
                for mi in notif.MonitoredItems:
                    if 0 <= mi.ClientHandle < len(srv.inputs):
                        it = srv.inputs[mi.ClientHandle]
                        self._accept(it, mi.Value, st)
                        st["io_requests"][it.node] += 1
            elif isinstance(notif, ua.StatusChangeNotification):
                if not notif.Status.is_good():
                    srv.lost = f"subscription ended by the server: {notif.Status.name}"
        srv.last_publish_ns = time.monotonic_ns()
        self._refresh(srv, stamp=not srv.lost)

    def _accept(self, it: _Item, dv, st) -> None:
        """Take one value, or say why not: Bad status, not a number, NaN, outside the field's range."""
        was = it.bad
        if dv is None or dv.StatusCode is None or not dv.StatusCode.is_good():
            it.bad = f"status {dv.StatusCode.name if dv is not None and dv.StatusCode else 'missing'}"
        else:
            raw = dv.Value.Value if dv.Value is not None else None
            if isinstance(raw, bool) or not isinstance(raw, (int, float)):
                it.bad = f"not a number: {type(raw).__name__}"
            else:
                try:
                    x = float(raw) * it.scale + it.offset
                except OverflowError:  # an integer beyond any float
                    x = math.inf
                if not math.isfinite(x):
                    it.bad = f"not finite: {raw!r}"
                elif not (it.lo <= x <= it.hi):
                    it.bad = f"{x:g} outside {it.lo:g}..{it.hi:g} (server value {raw!r}; check scale)"
                else:
                    st[it.name][it.node] = x
                    it.bad = ""
                    it.seen = True
        if it.bad:
            st["io_errors"][it.node] += 1
            if it.bad != was:
                log.warning("node %s: %s (%s): value refused: %s", self._node_id(it.node), it.name, it.text, it.bad)

    def _refresh(self, srv: _Server, stamp: bool) -> None:
        """Each node's fault from its connection and items; stamp fresh ones; publish."""
        st = self.io.staging
        now = self.io.clock.now_ns()  # the scan judges freshness on this clock
        fault = int(self.links.comm_fault[srv.index])
        worst: dict[int, int] = {i: fault for i in srv.nodes}
        if fault == Fault.NONE:
            for it in srv.inputs:
                if it.bad:
                    worst[it.node] = Fault.BAD_VALUE
                elif not it.seen and worst[it.node] == Fault.NONE:
                    worst[it.node] = Fault.NO_DATA
            for it in srv.outputs:
                if it.bad and worst[it.node] == Fault.NONE:
                    worst[it.node] = Fault.EXCEPTION_REPLY if it.bad.startswith("write refused") else Fault.BAD_VALUE
        for i, f in worst.items():
            st["fault"][i] = f
            if stamp and f == Fault.NONE:
                st["updated_ns"][i] = now
        self.io.publish()

    def _count(self, srv: _Server, requests: int = 0, errors: int = 0, latency_ns: int | None = None) -> None:
        st = self.io.staging
        for i in srv.nodes:
            st["io_requests"][i] += requests
            st["io_errors"][i] += errors
            if latency_ns is not None:
                st["io_latency_ms"][i] = latency_ns / 1e6

    def _node_id(self, i: int) -> str:
        return self.fleet.ids[self.start + i]


def _variant(value: float, vtype) -> ua.Variant:
    if vtype in _INT_RANGE:
        lo, hi = _INT_RANGE[vtype]
        return ua.Variant(int(min(hi, max(lo, round(value)))), vtype)
    return ua.Variant(value, vtype or ua.VariantType.Double)


def _certificate_uri(path: str) -> str | None:
    from cryptography import x509

    data = open(path, "rb").read()
    cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


async def _check_server_certificate(endpoint: str, sec, timeout_s: float) -> None:
    """Ask the server (over the unsecured discovery channel) which certificate it has, before trusting it.

    Without this an impostor's key only shows as a handshake that never answers
    (a TIMEOUT); with it the fault says what is wrong.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    data = open(sec.server_certificate, "rb").read()
    pinned = (x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data
              else x509.load_der_x509_certificate(data)).public_bytes(Encoding.DER)
    endpoints = await Client(endpoint, timeout=timeout_s).connect_and_get_server_endpoints()
    policy_uri = getattr(security_policies, f"SecurityPolicy{sec.policy}").URI
    mode = getattr(ua.MessageSecurityMode, sec.mode)
    offered = [e for e in endpoints if e.SecurityPolicyUri == policy_uri and e.SecurityMode == mode]
    if not offered:
        raise UntrustedServer(f"the server offers no {sec.policy} {sec.mode} endpoint")
    if not any((e.ServerCertificate or b"")[:len(pinned)] == pinned for e in offered):
        raise UntrustedServer(f"the server's certificate is not the trusted one ({sec.server_certificate})")
