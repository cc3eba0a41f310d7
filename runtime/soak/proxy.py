"""A Modbus TCP proxy per node between the controller and its agent, whose mode the soak switches.

The soak injects link faults here instead of in the agents (no agent code changes):

* ``pass``    forward both ways;
* ``silent``  accept and read requests, never answer (replies from the agent are dropped);
* ``garble``  replace each reply by a broken one (cut short, or noise behind a valid header);
* ``slow``    hold each reply ``slow_s`` before forwarding it (order kept);
* ``hot``     forward, but the vendor model's ``TmpC`` in every reply reads ``hot_c``: the node
              looks over-temperature to the controller, which must trip and latch it.

Frames are split on the MBAP header (7 bytes: tid, pid, length, unit) in both directions, so a
reply is changed whole, and the read address of each request is remembered by transaction id
(the reply does not carry it). When the agent dies, the controller's connection is closed too;
a connection the controller opens while the agent is down is accepted and closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct

from vbatt.drivers.modbus import sunspec as ss

__all__ = ["NodeProxy", "MODES", "TMPC_ADDR"]

MODES = ("pass", "silent", "garble", "slow", "hot")
TMPC_ADDR = ss.NODE_MAP.at(ss.VENDOR_ID, "TmpC").addr
_MBAP = struct.Struct(">HHHB")
CONNECT_TIMEOUT_S = 1.0


def _frames(buf: bytearray) -> list[bytes]:
    """Whole MBAP frames at the head of `buf` (removed from it); a bogus length drops the buffer."""
    out = []
    while len(buf) >= 7:
        _tid, _pid, length, _unit = _MBAP.unpack_from(buf)
        if length < 2 or length > 300:
            buf.clear()  # not Modbus TCP at all: nothing to resynchronise on
            break
        end = 6 + length
        if len(buf) < end:
            break
        out.append(bytes(buf[:end]))
        del buf[:end]
    return out


async def _framed(reader: asyncio.StreamReader):
    """The whole frames of each chunk read, until the peer closes (a chunk may hold none)."""
    buf = bytearray()
    while data := await reader.read(4096):
        buf += data
        yield _frames(buf)


class NodeProxy:
    """Listens on 127.0.0.1:`port` (0 = a free one) and forwards to 127.0.0.1:`upstream_port`."""

    def __init__(self, node_id: str, upstream_port: int, *, seed: int = 0, hot_c: float = 75.0):
        self.node_id = node_id
        self.upstream_port = upstream_port
        self.mode = "pass"
        self.slow_s = 0.0
        self.hot_c = hot_c
        self.rng = random.Random(seed)
        self.port = 0
        self.connections = 0
        self.replies = 0
        self.changed = 0  # replies garbled, dropped or rewritten
        self._server: asyncio.base_events.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def set_mode(self, mode: str, slow_s: float = 0.0) -> None:
        if mode not in MODES:
            raise ValueError(f"proxy mode {mode!r}: expected one of {MODES}")
        self.mode, self.slow_s = mode, slow_s

    def drop_connections(self) -> None:
        """Close every open pair (the agent went away: the controller must see it)."""
        for down, up in list(self._pairs):
            down.close()
            if up is not None:
                up.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.drop_connections()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)

    # -- one controller connection ------------------------------------------------------------
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            try:
                ur, uw = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.upstream_port),
                                                CONNECT_TIMEOUT_S)
            except (OSError, asyncio.TimeoutError):
                return  # agent down: accept and close, like a gateway without its device
            pair = (writer, uw)
            self._pairs.add(pair)
            reads: dict[int, tuple[int, int]] = {}  # tid -> (function, read address)
            try:
                up = asyncio.ensure_future(self._requests(reader, uw, reads))
                down = asyncio.ensure_future(self._replies(ur, writer, reads))
                done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                for t in done:
                    t.exception()  # a reset connection is the normal end of a pair
            finally:
                self._pairs.discard(pair)
                uw.close()
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _requests(self, reader: asyncio.StreamReader, uw: asyncio.StreamWriter, reads: dict) -> None:
        async for frames in _framed(reader):
            for f in frames:
                tid = _MBAP.unpack_from(f)[0]
                fc = f[7]
                if fc in (3, 23) and len(f) >= 10:
                    reads[tid & 0xFFFF] = (fc, struct.unpack_from(">H", f, 8)[0])
                    if len(reads) > 64:
                        reads.pop(next(iter(reads)))
                uw.write(f)
            await uw.drain()

    async def _replies(self, ur: asyncio.StreamReader, writer: asyncio.StreamWriter, reads: dict) -> None:
        async for frames in _framed(ur):
            for f in frames:
                self.replies += 1
                mode = self.mode
                if mode == "silent":
                    self.changed += 1
                    continue
                if mode == "garble":
                    self.changed += 1
                    f = self._garble(f)
                elif mode == "hot":
                    f = self._hot(f, reads.pop(_MBAP.unpack_from(f)[0], None))
                elif mode == "slow" and self.slow_s > 0:
                    await asyncio.sleep(self.slow_s)  # replies stay in order: one connection, one queue
                writer.write(f)
            await writer.drain()

    def _garble(self, f: bytes) -> bytes:
        if self.rng.random() < 0.5:
            return f[:max(8, len(f) // 2)]  # cut short: the header promises more than comes
        noise = bytes(self.rng.getrandbits(8) for _ in range(len(f) - 7))
        return f[:7] + noise

    def _hot(self, f: bytes, req: tuple[int, int] | None) -> bytes:
        if req is None or len(f) < 9 or f[7] != req[0]:
            return f
        start, nbytes = req[1], f[8]
        off = TMPC_ADDR - start
        if off < 0 or 2 * off + 4 > nbytes:
            return f
        b = bytearray(f)
        struct.pack_into(">f", b, 9 + 2 * off, self.hot_c)
        self.changed += 1
        return bytes(b)


@contextlib.asynccontextmanager
async def proxies(node_ids: list[str], upstream: list[int], seed: int = 0):
    """Start one proxy per node (tests); closed on exit."""
    ps = [NodeProxy(n, u, seed=seed + k) for k, (n, u) in enumerate(zip(node_ids, upstream))]
    try:
        for p in ps:
            await p.start()
        yield ps
    finally:
        for p in ps:
            await p.close()
