"""Helpers shared by the Modbus tests: real agents and raw misbehaving servers on 127.0.0.1 (port 0)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

import numpy as np

from vbatt.config.plant import load_config_text
from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.node.backends.sim import SimBackend
from vbatt.drivers.modbus.driver import Poller
from vbatt.drivers.modbus.config import Endpoint
from vbatt.drivers.node.agent import AgentSet, AgentSpec
from vbatt.kernel.ports import free_port  # noqa: F401 (the tests that import their ports from here)

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # its per-frame debug dumps drown the failures

M = ss.NODE_MAP
V = ss.VENDOR_ID

TWO_NODES = """
nodes:
  - {id: A, demand_w: 200, max_discharge_w: 100, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
  - {id: B, demand_w: 50, max_discharge_w: 150, max_charge_w: 100, capacity_wh: 1000, soc: 0.6, link_max_w: 1000}
"""


def fleet_of(text: str = TWO_NODES):
    return load_config_text(text)[1]


class FakeNs:
    """An injected monotonic clock in ns that tests move by hand."""

    def __init__(self, t: int = 10**12):
        self.t = t

    def __call__(self) -> int:
        return self.t

    def advance_ms(self, ms: float) -> None:
        self.t += int(ms * 1e6)


@contextlib.asynccontextmanager
async def serving(fleet=None, *, sslctx=None, clock_ns=None, unit_id: int = 1, backend=None):
    fleet = fleet if fleet is not None else fleet_of()
    backend = backend if backend is not None else SimBackend(fleet, 0, len(fleet))
    specs = [AgentSpec(fleet.ids[i] if i < len(fleet) else f"n{i}", "127.0.0.1", 0, unit_id, sslctx)
             for i in range(backend.n)]
    kw = {"clock_ns": clock_ns} if clock_ns else {}
    agents = AgentSet(backend, specs, **kw)
    await agents.start()
    try:
        yield agents
    finally:
        await agents.stop()


def endpoint(port: int, name: str = "n", unit: int = 1, plaintext: bool = True, tls=None) -> Endpoint:
    return Endpoint(name, "127.0.0.1", port, unit, tls, plaintext)


def poller(eps, poll_ms: float = 50, timeout_ms: float = 200, lease_ms: float = 1000, contexts=None) -> Poller:
    return Poller(eps, poll_ms=poll_ms, timeout_ms=timeout_ms, lease_ms=lease_ms, reconnect_min_ms=50,
                  reconnect_max_ms=200, contexts=contexts or [None] * len(eps))


async def poll_for(p: Poller, seconds: float) -> None:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(p.device_task(i, stop)) for i in range(p.n)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks)


def staging(n: int) -> dict[str, np.ndarray]:
    from vbatt.kernel.image import DRIVER_INPUTS

    return {f.name: np.zeros(n, f.dtype) for f in DRIVER_INPUTS}


def instruction_words(seq: int, lease_ms: int, battery_w: float, bus_w: float = 0.0, served_w: float = 0.0,
                      shed_w: float = 0.0) -> tuple[int, list[int]]:
    """(address, registers) of a whole instruction block, as a controller writes it."""
    rows = np.zeros((1, M.size), np.uint16)
    ss.put_int(rows, M.at(V, "Seq"), M.base, [seq])
    ss.put_int(rows, M.at(V, "LeaseMs"), M.base, [lease_ms])
    for name, v in (("BatW", battery_w), ("BusW", bus_w), ("SrvW", served_w), ("ShedW", shed_w)):
        ss.put(rows, M.at(V, name), M.base, [v])
    a = M.at(V, "Seq").addr
    e = M.at(V, "ShedW").addr + 2
    return a, rows[0, a - M.base:e - M.base].tolist()


def point(regs: list[int], start: int, model: int, name: str, as_int: bool = False) -> float:
    """Decode one point from registers read from `start`."""
    rows = np.zeros((1, M.size), np.uint16)
    rows[0, start - M.base:start - M.base + len(regs)] = regs
    p = M.at(model, name)
    return int(ss.get_int(rows, p, M.base)[0]) if as_int else float(ss.get(rows, p, M.base)[0])


# -- raw servers that misbehave on purpose ------------------------------------------------------------
async def read_request(reader) -> bytes:
    """One whole Modbus TCP frame (MBAP header and PDU) from `reader`."""
    head = await reader.readexactly(7)
    return head + await reader.readexactly(struct.unpack(">H", head[4:6])[0] - 1)


async def answer_requests(reader, writer, reply) -> None:
    """Serve one connection: `reply(request_bytes)` gives the bytes to send back, None to stay
    silent, or "close" to hang up; until the peer goes."""
    try:
        while True:
            out = reply(await read_request(reader))
            if out == "close":
                break
            if out:
                writer.write(out)
                await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def raw_server(reply):
    """A TCP server on 127.0.0.1:0 answering with `reply` (see answer_requests)."""
    srv = await asyncio.start_server(lambda r, w: answer_requests(r, w, reply), "127.0.0.1", 0)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


def mbap(req: bytes, pdu: bytes, unit: int | None = None) -> bytes:
    tid = req[:2]
    return tid + b"\x00\x00" + struct.pack(">HB", len(pdu) + 1, req[6] if unit is None else unit) + pdu


def registers_reply(req: bytes, words: list[int]) -> bytes:
    fc = req[7]
    return mbap(req, bytes([fc, 2 * len(words)]) + b"".join(struct.pack(">H", w & 0xFFFF) for w in words))


def request_range(req: bytes) -> tuple[int, int]:
    """(address, count) of a read (FC3) or the read part of FC23."""
    addr, count = struct.unpack(">HH", req[8:12])
    return addr, count
