"""The controller's Modbus driver: polls SunSpec nodes, sends them the instruction with a lease.

Runs in its own I/O process (never in the scan process): one asyncio loop, one
pymodbus AsyncModbusTcpClient (or TLS client) and one task per device, so a dead
or slow device only ever delays itself (the loop, the backoff, the fault marking
and the publishing are drivers/aio.py's; this module is the Modbus part). Per device:

  connect (timeout; on failure back off `reconnect_min_ms` doubling up to `reconnect_max_ms`)
  -> discover: find 'SunS' (40000, 0, 50000), walk the model chain, require model 802,
     note the vbatt vendor model (offer + instruction block) when present
  -> every `poll_ms`: one request. With an instruction to send and the vendor model,
     FC23 writes the instruction block (Seq = scan cycle, LeaseMs, BatW, BusW, SrvW, ShedW)
     and reads 802 + vendor model in the same transaction (the agent acknowledges inside
     it); otherwise FC3 reads the same block.

On an orderly stop every device that holds an instruction is handed back at once, right
after its last poll: the instruction block once more with `Seq` 0 (sunspec.RELEASE_SEQ);
the agent runs on its own and shows Mode RELEASED in the same reply, so no lease runs out
behind a controller that stopped in order (docs/modbus.md).

Every `publish_ms` the newest replies are decoded for all nodes at once (vectorised),
validated against the field ranges of runtime/kernel/fields.py, and published with
`updated_ns` = arrival time of the reply, so the scan's staleness bound excludes
old data. Each failure sets a specific `Fault` on that node only, logged once per
change with the reason; requests/errors/latency are counted per node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import ssl
import struct
import time

import numpy as np
from pymodbus.client import AsyncModbusTcpClient, AsyncModbusTlsClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException

from vbatt.kernel.fields import node_field

from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.aio import LOG_NAMES, AsyncDriver, LinkError, Links
from vbatt.drivers.base import IoContext
from vbatt.drivers.faults import Fault
from vbatt.drivers.modbus.config import MAP_INPUTS, MAP_OUTPUTS, Endpoint, modbus_endpoints, rendezvous_path

__all__ = ["ModbusDriver", "DeviceLink", "Poller", "DeviceError"]

log = logging.getLogger("vbatt.modbus")

M = ss.NODE_MAP
V = ss.VENDOR_ID
BLOCK_START = M.models[802][0]  # 802 header
BLOCK_END = M.models[V][0] + 2 + M.models[V][1]  # end of the vendor model
BLOCK_802_END = M.models[802][0] + 2 + M.models[802][1]
ACK_SEQ = M.at(V, "AckSeq")
MODE = M.at(V, "Mode")
CODEC = ss.CODEC
W_FIRST, W_END = CODEC.instr_first, CODEC.instr_end  # the instruction block, written in one request
FIELDS = CODEC.fields  # the values published per node: the device measurements of the field table


class DeviceError(LinkError):
    """A request or the discovery failed; `fault` says how (drivers.faults.Fault)."""


_GATEWAY = (0x0A, 0x0B)  # gateway path unavailable / target failed to respond: nobody at that unit id
_FC = {"read_holding_registers": 3, "write_registers": 16, "readwrite_registers": 23}  # what a reply must carry


class DeviceLink:
    """One device: its client, its discovered layout, its counters. Translates pymodbus errors to Faults."""

    def __init__(self, ep: Endpoint, timeout_s: float, sslctx: ssl.SSLContext | None):
        self.ep = ep
        self.timeout_s = timeout_s
        self.sslctx = sslctx
        self.client: AsyncModbusTcpClient | None = None
        self.rx_bytes = 0  # bytes received since the last request was sent (garbage detection)
        self.rx_unit = -1  # unit id in the first reply frame since then
        self.rx_late = False
        self.tx_tid = b""
        self.rx_tid = b""
        self.keep_layout = False  # reconnecting after a timeout: the device is the same, skip discovery
        self.replies = 0  # good replies on this connection (a TLS peer that hangs up at once rejected us)
        self.layout: tuple[int, int, bool] | None = None  # (802 header addr, block count, vendor present)
        self.ident: dict[str, str] = {}

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if sending:
            self.rx_bytes = 0
            self.rx_unit = -1
            self.rx_late = False
            self.tx_tid = data[:2] if self.sslctx is None else b""
        else:
            if self.rx_bytes == 0 and len(data) >= 7 and self.sslctx is None and data[2:4] == b"\0\0":
                self.rx_unit = data[6]  # MBAP unit id of the reply (the TLS framing has no MBAP)
                self.rx_late = data[:2] != self.tx_tid  # a well-formed reply to an earlier request
                self.rx_tid = data[:2]
            self.rx_bytes += len(data)
        return data

    async def connect(self) -> None:
        self.close()
        if self.ep.port == 0:
            raise DeviceError(Fault.NO_DATA, "waiting for the embedded fleet to report its ports")
        kw = dict(port=self.ep.port, timeout=self.timeout_s, retries=0, reconnect_delay=0,
                  trace_packet=self._trace, name=self.ep.id)
        if self.sslctx is not None:
            c = AsyncModbusTlsClient(self.ep.host, sslctx=self.sslctx, **kw)
        else:
            c = AsyncModbusTcpClient(self.ep.host, **kw)
        self.client = c
        try:
            ok = await asyncio.wait_for(c.connect(), self.timeout_s * 2)
        except (asyncio.TimeoutError, OSError) as exc:
            ok = False
            why = str(exc) or type(exc).__name__
        else:
            why = "refused or unreachable"
        if not ok:
            self.close()
            if self.sslctx is not None and await self._tcp_open():
                raise DeviceError(Fault.TLS, f"TLS handshake with {self.ep.host}:{self.ep.port} failed "
                                             f"(certificate missing, wrong or untrusted)")
            raise DeviceError(Fault.CONNECTION, f"cannot connect to {self.ep.host}:{self.ep.port} ({why})")
        self.replies = 0

    async def _tcp_open(self) -> bool:
        try:
            _r, w = await asyncio.wait_for(asyncio.open_connection(self.ep.host, self.ep.port), self.timeout_s)
        except (OSError, asyncio.TimeoutError):
            return False
        w.close()
        return True

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            finally:
                self.client = None

    @property
    def connected(self) -> bool:
        return self.client is not None and self.client.connected

    async def call(self, fn: str, **kw) -> list[int]:
        """One request; returns the registers or raises DeviceError (and drops the connection where needed)."""
        c = self.client
        if c is None or not c.connected:
            raise DeviceError(Fault.CONNECTION, "not connected")
        try:
            # raises at once on a dropped connection; pymodbus times out itself after timeout_s (retries=0),
            # so no wait_for here: it would cost a task per request
            r = await getattr(c, fn)(device_id=self.ep.unit_id, **kw)
        except (asyncio.TimeoutError, ModbusIOException) as exc:
            msg = str(exc)
            got, unit, dropped, late = self.rx_bytes, self.rx_unit, not c.connected, self.rx_late
            self.close()  # a late reply must not be taken for the next request's
            self.keep_layout = self.layout is not None
            if late:
                raise DeviceError(Fault.TIMEOUT, f"no reply within {self.timeout_s * 1e3:.0f} ms (a late reply "
                                                 f"to an earlier request came instead)") from None
            if "device id" in msg or (got and unit >= 0 and unit != self.ep.unit_id):
                raise DeviceError(Fault.WRONG_UNIT, f"reply from another unit id than {self.ep.unit_id}") from None
            if got:
                raise DeviceError(Fault.GARBLED, f"{got} bytes received but no valid reply (short or garbled "
                                                 f"frame)") from None
            if self.replies == 0 and self.sslctx is not None and dropped:
                raise DeviceError(Fault.TLS, "the peer closed the TLS session before any reply (our certificate "
                                             "rejected?)") from None
            if dropped:  # the peer closed while our request was in flight: no timeout, a lost connection
                raise DeviceError(Fault.CONNECTION, "connection closed by the device before it replied") from None
            raise DeviceError(Fault.TIMEOUT, f"no reply within {self.timeout_s * 1e3:.0f} ms") from None
        except (ConnectionException, ConnectionError, OSError) as exc:
            self.close()
            if self.replies == 0 and self.sslctx is not None:
                raise DeviceError(Fault.TLS, f"TLS session dropped before any reply ({exc}): certificate "
                                             f"rejected by the peer?") from None
            raise DeviceError(Fault.CONNECTION, f"connection lost ({exc})") from None
        except ModbusException as exc:
            self.close()
            raise DeviceError(Fault.GARBLED, f"bad reply ({exc})") from None
        if self.rx_late:
            # pymodbus takes a reply with transaction id 0 as the answer to any request; ours start at 1
            self.close()
            raise DeviceError(Fault.GARBLED, f"reply with transaction id 0x{self.rx_tid.hex()} to request "
                                             f"0x{self.tx_tid.hex()}")
        if r.isError():
            code = getattr(r, "exception_code", 0)
            if code in _GATEWAY:
                raise DeviceError(Fault.WRONG_UNIT, f"no device at unit id {self.ep.unit_id} "
                                                    f"(exception 0x{code:02X})")
            raise DeviceError(Fault.EXCEPTION_REPLY, f"exception reply 0x{code:02X} to {fn}")
        fc = _FC.get(fn)
        if fc is not None and getattr(r, "function_code", fc) != fc:
            # pymodbus matches replies by transaction id only: an FC4 (input registers) frame would pass as FC3
            self.close()
            raise DeviceError(Fault.GARBLED, f"reply with function code {r.function_code} to {fn} "
                                             f"(expected {fc})")
        regs = list(getattr(r, "registers", []))
        want = kw.get("count", kw.get("read_count"))
        if want is not None and len(regs) != want:
            self.close()
            raise DeviceError(Fault.GARBLED, f"asked {want} registers, got {len(regs)}")
        self.replies += 1
        return regs

    async def discover(self) -> tuple[int, int, bool]:
        """Find 'SunS', walk the models; returns (802 header address, registers to read, vendor model present)."""
        bases = (self.ep.sunspec_base,) if self.ep.sunspec_base is not None else (40000, 0, 50000)
        base = None
        seen = []
        for b in bases:
            try:
                regs = await self.call("read_holding_registers", address=b, count=2)
            except DeviceError as exc:
                if exc.fault != Fault.EXCEPTION_REPLY or "0x02" not in exc.reason:
                    raise  # only "illegal address" means "not here"; a failing device is a failing device
                seen.append(f"{b}: illegal address")
                continue
            if tuple(regs) == ss.SUNS:
                base = b
                break
            seen.append(f"{b}: {regs[0]:04X} {regs[1]:04X}")
        if base is None:
            raise DeviceError(Fault.NO_SUNSPEC, f"no 'SunS' marker ({'; '.join(seen)})")
        addr, models = base + 2, {}
        for _ in range(64):
            mid, length = await self.call("read_holding_registers", address=addr, count=2)
            if mid == ss.END_ID:
                break
            if length == 0 or addr + 2 + length > 65535:
                raise DeviceError(Fault.NO_SUNSPEC, f"model {mid} at {addr} has length {length}: chain broken")
            models[mid] = (addr, length)
            addr += 2 + length
        else:
            raise DeviceError(Fault.NO_SUNSPEC, "model chain has no end model within 64 models")
        if 802 not in models or models[802][1] != ss.BATTERY.length:
            raise DeviceError(Fault.NO_SUNSPEC, f"no battery model 802 of length {ss.BATTERY.length} "
                                                f"(models found: {sorted(models)})")
        if 1 in models:
            a, n = models[1]
            c = await self.call("read_holding_registers", address=a + 2, count=min(n, 66))
            self.ident = {k: ss.decode_string(c[p.addr - M.body(1):p.addr - M.body(1) + p.regs])
                          for k in ("Mn", "Md", "SN", "Vr") for p in (M.at(1, k),)}
        hdr = models[802][0]
        vendor = V in models and models[V] == (hdr + 2 + ss.BATTERY.length, ss.VENDOR.length)
        count = (BLOCK_END if vendor else BLOCK_802_END) - BLOCK_START
        self.layout = (hdr, count, vendor)
        return self.layout


_FMT = {"uint16": ">H", "int16": ">h", "uint32": ">I", "int32": ">i", "float32": ">f"}


def _blocks(regs: dict) -> list[tuple[int, int]]:
    """(address, count) reads covering the mapped inputs, merged while a read stays <= 125 registers."""
    spans = sorted((r.address, r.address + r.regs) for name, r in regs.items() if name in MAP_INPUTS)
    out: list[tuple[int, int]] = []
    for a, e in spans:
        if out and e - out[-1][0] <= 125:
            out[-1] = (out[-1][0], max(out[-1][0] + out[-1][1], e) - out[-1][0])
        else:
            out.append((a, e - a))
    return out


def _unpack(reg, words: dict[int, int]) -> float:
    raw = b"".join(words[reg.address + k].to_bytes(2, "big") for k in range(reg.regs))
    return struct.unpack(_FMT[reg.type], raw)[0] * reg.scale + reg.offset


def _pack(reg, value: float) -> list[int]:
    raw_value = (value - reg.offset) / reg.scale
    if reg.type != "float32":
        lo, hi = {"uint16": (0, 0xFFFF), "int16": (-0x8000, 0x7FFF), "uint32": (0, 0xFFFFFFFF),
                  "int32": (-0x80000000, 0x7FFFFFFF)}[reg.type]
        raw_value = int(min(max(round(raw_value), lo), hi))
    raw = struct.pack(_FMT[reg.type], raw_value)
    return [int.from_bytes(raw[k:k + 2], "big") for k in range(0, len(raw), 2)]


class Poller(Links):
    """The driver's work for a set of endpoints, independent of the process image (tests use it directly)."""

    log = log
    noun = "nodes"

    def __init__(self, endpoints: list[Endpoint], *, poll_ms: float, timeout_ms: float, lease_ms: float,
                 reconnect_min_ms: float, reconnect_max_ms: float, contexts: list[ssl.SSLContext | None],
                 clock_ns=time.monotonic_ns):
        n = len(endpoints)
        super().__init__(n, interval_s=poll_ms / 1e3, backoff_s=(reconnect_min_ms / 1e3, reconnect_max_ms / 1e3))
        self.eps = endpoints
        self.lease_ms = int(lease_ms)
        self.clock_ns = clock_ns
        self.links = [DeviceLink(ep, timeout_ms / 1e3, ctx) for ep, ctx in zip(endpoints, contexts)]
        self.rows = np.zeros((n, M.size), np.uint16)  # each node's newest block, at our map's offsets
        self.vendor = np.zeros(n, bool)
        self.got_ns = np.zeros(n, np.int64)  # arrival of the newest good reply
        self.requests = np.zeros(n, np.uint64)
        self.errors = np.zeros(n, np.uint64)
        self.latency_ms = np.zeros(n)
        self.sent_seq = np.zeros(n, np.uint64)
        self.acked_seq = np.zeros(n, np.uint64)
        self.wbuf = np.zeros((n, M.size), np.uint16)  # the instruction to send, encoded
        self.have_instruction = False
        self.hand_back_on_stop = False  # the driver process sets it: an orderly stop hands every device back
        self.handed_back = np.zeros(n, bool)  # confirmed: the reply showed Mode RELEASED
        self.not_handed_back: dict[int, str] = {}  # a node that held an instruction -> why it was not handed back
        self.fresh = np.zeros(n, bool)  # a reply arrived since the last decode (bad values count once each)
        # nodes with an explicit register map: their values, decoded per reply
        self.mapped = np.array([ep.registers is not None for ep in endpoints], bool)
        self.mapped_vals = {k: np.full(n, np.nan) for k in FIELDS}
        self._outputs: dict[str, np.ndarray] = {}

    # -- the instruction ------------------------------------------------------------------------------
    def set_instruction(self, seq: int, outputs: dict[str, np.ndarray]) -> None:
        # Seq is 32 bits: after 2**32 - 1 cycles (497 days at 10 ms) it wraps to 1, never to ss.RELEASE_SEQ
        wire_seq = (seq - 1) % 0xFFFFFFFF + 1
        CODEC.encode_instruction(self.wbuf, np.full(self.n, wire_seq), np.full(self.n, self.lease_ms), outputs)
        self.have_instruction = True
        self._seq = seq
        self._outputs = {k: np.nan_to_num(v).copy() for k, v in outputs.items()}

    # -- per device (the hooks of Links) -------------------------------------------------------------------
    def describe(self, i: int) -> str:
        ep = self.eps[i]
        return f"node {ep.id} ({ep.host}:{ep.port} unit {ep.unit_id})"

    def connected(self, i: int) -> bool:
        return self.links[i].connected

    async def connect(self, i: int) -> None:
        link = self.links[i]
        if not link.keep_layout:
            link.layout = None
        link.keep_layout = False
        await link.connect()

    async def disconnect(self, i: int) -> None:
        self.links[i].close()

    def counted(self, i: int, fault: Fault) -> None:
        if fault != Fault.NO_DATA:  # waiting for the embedded fleet's ports is no request failing
            self.errors[i] += 1

    def _fail(self, i: int, exc: DeviceError) -> None:
        self.mark(i, exc.fault, exc.reason)

    def _ok(self, i: int) -> None:
        self.clear(i)

    async def _poll_mapped(self, i: int, link: DeviceLink) -> None:
        regs = link.ep.registers
        t = time.perf_counter()
        words: dict[int, int] = {}
        for a, count in _blocks(regs):
            self.requests[i] += 1
            got = await link.call("read_holding_registers", address=a, count=count)
            words.update(zip(range(a, a + count), got))
        if self.have_instruction:
            for name in MAP_OUTPUTS:
                if name in regs:
                    self.requests[i] += 1
                    await link.call("write_registers", address=regs[name].address,
                                    values=_pack(regs[name], float(self._outputs[name][i])))
            self.sent_seq[i] = self._seq
        self.latency_ms[i] = (time.perf_counter() - t) * 1e3
        for name in FIELDS:
            reg = regs.get(name)
            if reg is not None:
                self.mapped_vals[name][i] = _unpack(reg, words)
            else:  # not mapped: what a node without that measurement honestly offers
                self.mapped_vals[name][i] = CODEC.absent[name]
        self.got_ns[i] = self.clock_ns()
        self.fresh[i] = True
        self._ok(i)

    async def exchange(self, i: int) -> None:
        """One request (after discovery): FC23 with the instruction to a vendor-model device, FC3 otherwise."""
        link = self.links[i]
        if link.ep.registers is not None:
            await self._poll_mapped(i, link)
            return
        if link.layout is None:
            self.requests[i] += 1
            await link.discover()
        hdr, count, vendor = link.layout
        t = time.perf_counter()
        self.requests[i] += 1
        if vendor and self.have_instruction:
            off = W_FIRST - M.base
            vals = self.wbuf[i, off:off + (W_END - W_FIRST)].tolist()
            shift = hdr - BLOCK_START  # a device whose 802 starts elsewhere: same relative layout
            regs = await link.call("readwrite_registers", read_address=hdr, read_count=count,
                                   write_address=W_FIRST + shift, values=vals)
            self.sent_seq[i] = self._seq
        else:
            regs = await link.call("read_holding_registers", address=hdr, count=count)
        self.latency_ms[i] = (time.perf_counter() - t) * 1e3
        a = BLOCK_START - M.base
        self.rows[i, a:a + count] = regs
        self.vendor[i] = vendor
        if vendor:
            self.acked_seq[i] = int(ss.get_int(self.rows[i:i + 1], ACK_SEQ, M.base)[0])
        self.got_ns[i] = self.clock_ns()
        self.fresh[i] = True
        self._ok(i)

    async def device_task(self, i: int, stop: asyncio.Event) -> None:
        await self.link_task(i, stop)

    # -- the hand-back on an orderly stop ---------------------------------------------------------------------
    async def goodbye(self, i: int) -> None:
        """Hand node i back right after its last poll, before the lease of its last instruction runs out: the
        instruction block once more with Seq = ss.RELEASE_SEQ. Only a device that was sent an instruction holds
        a lease; one that cannot be reached now keeps it until it runs out (said by `hand_back_report`)."""
        link = self.links[i]
        if not self.hand_back_on_stop or not self.sent_seq[i] or link.ep.registers is not None:
            return
        row = self.wbuf[i:i + 1].copy()
        ss.put_int(row, CODEC.seq_point, M.base, [ss.RELEASE_SEQ])
        off = W_FIRST - M.base
        try:
            if not link.connected or link.layout is None:
                # its last request failed (a timeout drops the connection): one more try, as a round would
                await self.open(i)
                if link.layout is None:
                    await link.discover()
            hdr, count, _vendor = link.layout
            regs = await link.call("readwrite_registers", read_address=hdr, read_count=count,
                                   write_address=W_FIRST + hdr - BLOCK_START,
                                   values=row[0, off:off + W_END - W_FIRST].tolist())
        except DeviceError as exc:
            self.not_handed_back[i] = exc.reason
            return
        except Exception as exc:  # noqa: BLE001 (the last word must not end the stop of the other links)
            self.not_handed_back[i] = f"{type(exc).__name__}: {exc}"
            return
        a = BLOCK_START - M.base
        self.rows[i, a:a + count] = regs
        mode = int(ss.get_int(self.rows[i:i + 1], MODE, M.base)[0])
        if mode == ss.Mode.RELEASED:
            self.handed_back[i] = True
        else:  # an agent that does not know the hand-back took it as an instruction (or refused it)
            name = ss.Mode(mode).name if mode in set(ss.Mode) else str(mode)
            self.not_handed_back[i] = f"it answered Mode {name}, not RELEASED (an agent without the hand-back)"

    def hand_back_report(self) -> None:
        """One line for the nodes handed back, and one warning naming those that hold a lease still."""
        n = int(self.handed_back.sum())
        if n:
            log.info("%d node%s handed back to their own control (Mode RELEASED): no lease is left to run out",
                     n, "s" if n != 1 else "")
        items = sorted(self.not_handed_back.items())
        if len(items) == 1:
            log.warning("%s: not handed back at the stop (%s): the lease of its last instruction (%d ms) runs out",
                        self.describe(items[0][0]), items[0][1], self.lease_ms)
        elif items:
            names = ", ".join(self.describe(i) for i, _ in items[:LOG_NAMES])
            more = f" and {len(items) - LOG_NAMES} more" if len(items) > LOG_NAMES else ""
            log.warning("%d nodes not handed back at the stop: %s%s (the first: %s): the lease of their last "
                        "instruction (%d ms) runs out", len(items), names, more, items[0][1], self.lease_ms)

    # -- decode every node at once ------------------------------------------------------------------------
    def decode(self) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
        """Field arrays from the newest replies, and the fault of every node (comm or bad value)."""
        out = CODEC.decode_offer(self.rows, self.vendor)
        if self.mapped.any():
            for k in FIELDS:
                out[k] = np.where(self.mapped, self.mapped_vals[k], out[k])
        fault = self.comm_fault.copy()
        reasons = list(self.reason)
        ok = fault == 0
        for name in FIELDS:
            fld = node_field(name)
            v = out[name]
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(v) | ((v < fld.lo) if fld.lo is not None else False) | \
                      ((v > fld.hi) if fld.hi is not None else False)
            for i in np.flatnonzero(bad & ok):
                fault[i] = int(Fault.BAD_VALUE)
                reasons[i] = f"{name} = {float(v[i])!r} (expected a number in [{fld.lo:g}, {fld.hi:g}] {fld.unit})"
                ok[i] = False
            out[name] = np.where(bad, 0.0, v)
        self.errors += (fault == Fault.BAD_VALUE) & self.fresh
        self.fresh[:] = False
        for i in np.flatnonzero((fault == 0) & (np.asarray(self._logged) == Fault.BAD_VALUE)):
            log.warning("node %s: values valid again", self.eps[i].id)
            self._logged[i] = 0
        for i in np.flatnonzero(fault != 0):
            if fault[i] == Fault.BAD_VALUE and self._logged[i] != int(Fault.BAD_VALUE):
                self._logged[i] = int(Fault.BAD_VALUE)
                log.warning("node %s: BAD_VALUE: %s", self.eps[i].id, reasons[i])
        return out, fault, reasons

    def fill(self, staging: dict[str, np.ndarray]) -> None:
        vals, fault, _ = self.decode()
        for k, v in vals.items():
            staging[k][:] = v
        staging["fault"][:] = fault
        staging["updated_ns"][:] = np.where(fault == 0, self.got_ns, 0)
        staging["io_requests"][:] = self.requests
        staging["io_errors"][:] = self.errors
        staging["io_latency_ms"][:] = self.latency_ms

    async def close(self) -> None:
        await self.aclose()


def contexts_for(endpoints: list[Endpoint]) -> tuple[list[ssl.SSLContext | None], dict[int, DeviceError]]:
    """Client TLS contexts; nodes without any security setting get a TLS fault instead of plaintext."""
    from vbatt.drivers.certs import client_context

    out: list[ssl.SSLContext | None] = []
    bad: dict[int, DeviceError] = {}
    cache: dict[tuple, ssl.SSLContext] = {}
    for i, ep in enumerate(endpoints):
        if ep.tls is not None:
            key = (ep.tls.ca, ep.tls.cert, ep.tls.key)
            try:
                if key not in cache:
                    cache[key] = client_context(*key)
                out.append(cache[key])
            except (OSError, ssl.SSLError) as exc:
                out.append(None)
                bad[i] = DeviceError(Fault.TLS, f"cannot load TLS files: {exc}")
        else:
            out.append(None)
            if not ep.plaintext:
                bad[i] = DeviceError(Fault.TLS, "no TLS configured and plaintext not allowed: set "
                                                "drivers.modbus.tls or 'plaintext: true'")
    return out, bad


def _embedded_ports(p: Poller, path, seen_mtime: int) -> int:
    """Take the ports the embedded fleet reported (again after it restarted); returns the file's mtime."""
    try:
        mtime = path.stat().st_mtime_ns
        if mtime == seen_mtime:
            return seen_mtime
        ports = [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return seen_mtime
    for i, link in enumerate(p.links):
        k = link.ep.embedded
        if k < 0:
            continue
        if k >= len(ports):
            log.error("embedded fleet reported %d ports; node %s is number %d", len(ports), link.ep.id, k)
            continue
        port = ports[k]
        if link.ep.port != port:
            link.close()
            link.ep = dataclasses.replace(link.ep, port=port)
            p.eps[i] = link.ep
    return mtime


def _quiet_decode_errors(loop, ctx: dict) -> None:
    if isinstance(ctx.get("exception"), ModbusException):
        log.debug("pymodbus: %s (%s)", ctx.get("message"), ctx.get("exception"))
        return
    loop.default_exception_handler(ctx)


class ModbusDriver(AsyncDriver):
    kind = "modbus"

    def run(self, io: IoContext) -> None:
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # we log every fault once, with its reason
        super().run(io)

    async def open_links(self, io: IoContext) -> Poller:
        d = self.cfg.drivers.modbus
        # pymodbus raises out of data_received on a garbled frame; asyncio then logs a traceback and
        # closes the transport. The request fails and is reported as GARBLED: no traceback in the log.
        asyncio.get_running_loop().set_exception_handler(_quiet_decode_errors)
        try:
            every = modbus_endpoints(self.cfg, self.fleet)
        except ValueError as exc:
            log.error("modbus driver: %s", exc)
            every = {}
        eps = [every.get(i) for i in range(self.start, self.stop)]
        missing = [self.fleet.ids[self.start + k] for k, e in enumerate(eps) if e is None]
        if missing:  # cannot happen with a validated config; never crash the run for it
            log.error("modbus driver: no endpoint for nodes %s", missing[:5])
        eps = [e or Endpoint(self.fleet.ids[self.start + k], "127.0.0.1", 1, 1, None, False) for k, e in enumerate(eps)]
        if d.poll_ms >= self.cfg.plant.stale_ms:
            log.warning("drivers.modbus.poll_ms (%g) >= plant.stale_ms (%g): nodes will flap offline between polls",
                        d.poll_ms, self.cfg.plant.stale_ms)
        ctxs, self._bad = contexts_for(eps)
        p = Poller(eps, poll_ms=d.poll_ms, timeout_ms=d.timeout_ms, lease_ms=d.lease,
                   reconnect_min_ms=d.reconnect_min_ms, reconnect_max_ms=d.reconnect_max_ms, contexts=ctxs)
        for i, exc in self._bad.items():
            p.mark(i, exc.fault, exc.reason)
        p.hand_back_on_stop = True
        self.period_s = d.publish_ms / 1e3
        self._rendezvous = rendezvous_path(io.img.name) if any(e.embedded >= 0 and e.port == 0 for e in eps) else None
        self._seen_mtime = 0
        return p

    def active(self) -> list[int]:
        return [i for i in range(self.links.n) if i not in self._bad]

    def tick(self, io: IoContext) -> None:
        if self._rendezvous is not None:
            self._seen_mtime = _embedded_ports(self.links, self._rendezvous, self._seen_mtime)

    def instruct(self, cycle: int, outputs: dict[str, np.ndarray]) -> None:
        self.links.set_instruction(cycle, outputs)

    def stage(self, io: IoContext) -> bool:
        self.links.fill(io.staging)
        return True

    async def flush(self, new: bool) -> None:
        # The scan's last outputs (the safe state) went out with the polls of the stop's grace; each link then
        # handed its node back (Poller.goodbye). Another poll now would take the nodes under control again,
        # with a lease that nobody renews.
        self.links.hand_back_report()
