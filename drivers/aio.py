"""The skeleton every asyncio I/O driver shares: links retried with backoff, faults, publishing.

Two layers, as python-can's BusABC.recv() wraps a bus's _recv_internal(): the base
does the timing and the bookkeeping, a driver fills small hooks.

`Links` runs one task per link (a device or a server connection), so a dead or
slow one only ever delays itself:

  wait until due -> connect() when not connected -> exchange() (one round)
  success: backoff back to its minimum, next round after `interval_s`
  failure: the fault code and reason are marked on the link (logged once per change);
           a link left unconnected is retried after the backoff delay, doubling
           from `backoff_s[0]` up to `backoff_s[1]`; a connected one at the next round
  stop:    goodbye() right after the link's last round (e.g. hand the device back), then
           what the links gathered for the log is logged, once, when the last link ends

`AsyncDriver` is the I/O process around it: one asyncio loop, the first publish at
once (every node NO_DATA until it answers), then every `period_s` the newest
instruction is taken from the image and the staged inputs handed to the scan; on
stop the link tasks end (each with its goodbye), the transport's flush hands on what
is left (OPC UA: the last instruction, the scan's safe state; Modbus, MQTT: their
nodes were handed back by their goodbyes, it only reports) and every link is closed.
Once it serves, the process freezes its startup heap (`freeze_startup_heap`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time

import numpy as np

from vbatt.kernel.seqblock import TornRead

from vbatt.drivers.base import Driver, IoContext
from vbatt.drivers.faults import Fault

__all__ = ["LinkError", "Backoff", "Links", "AsyncDriver", "freeze_startup_heap"]

QUIET_START_S = 5.0  # a device that does not answer yet during start-up (its agent may be starting) is logged quietly
LOG_NAMES = 3  # links named in a gathered log line


class LinkError(Exception):
    """A request, a connection or a discovery failed; `fault` says how (drivers.faults.Fault)."""

    def __init__(self, fault: Fault, reason: str):
        super().__init__(reason)
        self.fault = fault
        self.reason = reason


class Backoff:
    """The wait before the next connection attempt: `min_s`, doubling up to `max_s`, back to `min_s` on success."""

    def __init__(self, min_s: float, max_s: float):
        self.min_s, self.max_s = min_s, max_s
        self.delay_s = min_s

    def reset(self) -> None:
        self.delay_s = self.min_s

    def next(self) -> float:
        d = self.delay_s
        self.delay_s = min(d * 2, self.max_s)
        return d


def _joined(kind: str, detail: str) -> str:
    return f"{kind}: {detail}" if detail else kind


class Links:
    """Links retried with backoff, their fault codes and reasons. A transport fills the hooks below."""

    log: logging.Logger = logging.getLogger("vbatt.drivers")
    connect_timeout_s: float | None = None  # None: the transport's connect() bounds itself
    spread = True  # first rounds spread over the interval: no thundering herd
    drop_on_error = False  # True: every failure ends the session (it is made anew after the backoff)
    noun = "links"  # what a gathered log line counts
    # fault changes within this window are logged as one line per kind: a switch that fails takes thousands
    # of devices at once, and a line per device would bury everything else in the log
    log_gather_s = 0.5

    def __init__(self, n: int, *, interval_s: float, backoff_s: tuple[float, float]):
        self.n = n
        self.interval_s = interval_s
        self.backoff = backoff_s
        self.comm_fault = np.full(n, int(Fault.NO_DATA), np.uint32)
        self.reason = ["never heard from"] * n
        self._logged = [int(Fault.NO_DATA)] * n
        self.t0 = time.monotonic()
        # (level, fault kind) -> [(link, detail)], until the next gather
        self._pending: dict[tuple[int, str], list[tuple[int, str]]] = {}
        self._gathering = False
        self._running = 0  # link tasks running: the last one to end logs what was gathered

    # -- hooks ------------------------------------------------------------------------------------------
    def connected(self, k: int) -> bool:
        raise NotImplementedError

    async def connect(self, k: int) -> None:
        """Open link k (and learn what is needed to talk to it); raise on failure."""
        raise NotImplementedError

    async def exchange(self, k: int) -> None:
        """One round on the connected link k: read, send the instruction; raise on failure."""
        raise NotImplementedError

    async def disconnect(self, k: int) -> None:
        """Release link k's socket; safe on a closed link."""
        raise NotImplementedError

    async def goodbye(self, k: int) -> None:
        """Link k's rounds ended on an orderly stop (not on cancellation): the last word to its device, at once
        (e.g. hand it back, before the lease of its last instruction runs out). Must not raise."""

    def fault_of(self, exc: Exception) -> tuple[Fault, str] | None:
        """The fault code and reason of a failed round; None: no failure of the transport the driver knows
        (a bug), which faults the link CONNECTION, drops its connection and is logged with its traceback."""
        if isinstance(exc, LinkError):
            return exc.fault, exc.reason
        return None

    def counted(self, k: int, fault: Fault) -> None:
        """A failed round on link k, for the transport's request/error counters."""

    def changed(self, k: int) -> None:
        """Link k's fault changed (e.g. publish at once)."""

    def describe(self, k: int) -> str:
        return f"link {k}"

    # -- faults -----------------------------------------------------------------------------------------
    def mark(self, k: int, fault: Fault, reason: str) -> None:
        """Link k is faulty; logged once per change of the code, with the reason."""
        self.comm_fault[k] = int(fault)
        self.reason[k] = reason
        if self._logged[k] != int(fault):
            quiet = self._logged[k] == Fault.NO_DATA and time.monotonic() - self.t0 < QUIET_START_S \
                and fault in (Fault.CONNECTION, Fault.NO_DATA)
            self._logged[k] = int(fault)
            self._log(logging.INFO if quiet else logging.WARNING, Fault(fault).name, reason, k)
        self.changed(k)

    def clear(self, k: int) -> None:
        """Link k answers again."""
        if self._logged[k] not in (0, Fault.BAD_VALUE):  # bad values are judged (and logged) by the decoder
            self._log(logging.INFO if self._logged[k] == Fault.NO_DATA else logging.WARNING,
                      f"data again (was {Fault(self._logged[k]).name})", "", k)
            self._logged[k] = 0
        was = self.comm_fault[k]
        self.comm_fault[k] = 0
        self.reason[k] = ""
        if was:
            self.changed(k)

    def _log(self, level: int, kind: str, detail: str, k: int) -> None:
        """Log `kind: detail` for link k: at once outside a loop, else gathered with the same kind of other
        links (their details differ when they name an address: each connection refused names its own)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.log.log(level, "%s: %s", self.describe(k), _joined(kind, detail))
            return
        self._pending.setdefault((level, kind), []).append((k, detail))
        if not self._gathering:
            self._gathering = True
            loop.call_later(self.log_gather_s, self.flush_log)

    def flush_log(self) -> None:
        """Log what was gathered: one line per level and kind, naming the first links and counting the rest."""
        self._gathering = False
        pending, self._pending = self._pending, {}
        for (level, kind), got in pending.items():
            k0, d0 = got[0]
            if len(got) == 1:
                self.log.log(level, "%s: %s", self.describe(k0), _joined(kind, d0))
                continue
            names = ", ".join(self.describe(k) for k, _d in got[:LOG_NAMES])
            more = f" and {len(got) - LOG_NAMES} more" if len(got) > LOG_NAMES else ""
            if all(d == d0 for _k, d in got):
                self.log.log(level, "%d %s: %s: %s%s", len(got), self.noun, _joined(kind, d0), names, more)
            else:
                self.log.log(level, "%d %s: %s: %s%s (the first: %s)", len(got), self.noun, kind, names, more, d0)

    # -- the loop ---------------------------------------------------------------------------------------
    async def open(self, k: int) -> None:
        if self.connect_timeout_s is None:
            await self.connect(k)
        else:
            await asyncio.wait_for(self.connect(k), self.connect_timeout_s)

    async def round(self, k: int) -> None:
        """Connect when needed, then one exchange."""
        if not self.connected(k):
            await self.open(k)
        await self.exchange(k)

    async def link_task(self, k: int, stop: asyncio.Event) -> None:
        self._running += 1
        try:
            await self._link_rounds(k, stop)
            await self.goodbye(k)
        finally:
            self._running -= 1
            # nothing gathered is lost when the links stop, and the links that end one by one at a stop (each
            # after its round in flight) are still said together: a line per link would bury the log
            if self._running == 0:
                self.flush_log()

    async def _link_rounds(self, k: int, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + (self.interval_s * (k / max(1, self.n)) if self.spread else 0.0)
        backoff = Backoff(*self.backoff)
        while not stop.is_set():
            now = loop.time()
            if due > now:
                try:
                    await asyncio.wait_for(stop.wait(), due - now)
                    return
                except asyncio.TimeoutError:
                    pass
            try:
                await self.round(k)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure is a fault code on its own link, never the others' loss
                got = self.fault_of(exc)
                unexpected = got is None
                if unexpected:
                    got = Fault.CONNECTION, f"{type(exc).__name__}: {exc}".rstrip(": ")
                    if self.reason[k] != got[1]:  # loud, but once per kind, not once per retry
                        self.log.error("%s: unexpected error in the driver", self.describe(k), exc_info=exc)
                fault, reason = got
                self.counted(k, fault)
                self.mark(k, fault, reason)
                if self.drop_on_error or unexpected:
                    await self.disconnect(k)
                if not self.connected(k):  # reconnect with backoff
                    due = loop.time() + backoff.next()
                    continue
                due += self.interval_s
            else:
                backoff.reset()
                due += self.interval_s
            if due < loop.time() - self.interval_s:
                due = loop.time()  # fell behind: no burst

    async def aclose(self) -> None:
        """Close every link (safe twice): the sockets are released even when a goodbye fails."""
        await asyncio.gather(*(self.disconnect(k) for k in range(self.n)), return_exceptions=True)


def freeze_startup_heap() -> None:
    """Move what the process built to start (numpy, numba, pymodbus or asyncua, the config: a million long-lived
    objects) to the permanent generation. Else every full collection rescans them all while the loop stands
    still: 0.2-2 s on a loaded 2-core machine, long enough for every request in flight to time out and for
    every lease a fleet serves to run out at once. What a process makes later is collected as ever. Only in
    the main thread, which owns its process: a driver run in a thread of another program (a test) leaves that
    program's heap alone."""
    if threading.current_thread() is not threading.main_thread():
        return
    gc.collect()
    gc.freeze()


class AsyncDriver(Driver):
    """A driver whose I/O is one asyncio loop around a `Links`; the hooks below fill in the transport."""

    period_s = 0.02  # how often the instruction is taken and the inputs published
    stop_timeout_s: float | None = None  # how long the link tasks may take to end on stop; None: no limit

    links: Links

    # -- hooks ------------------------------------------------------------------------------------------
    async def open_links(self, io: IoContext) -> Links:
        """Build the links of this node range (no network yet: the scan waits for the first publish)."""
        raise NotImplementedError

    def active(self) -> list[int]:
        """The links to run (a link faulted for good at start, e.g. TLS files missing, is not)."""
        return list(range(self.links.n))

    def stage(self, io: IoContext) -> bool:
        """Fill `io.staging` with the newest data; True: publish it."""
        return False

    def instruct(self, cycle: int, outputs: dict[str, np.ndarray]) -> None:
        """A new instruction (scan cycle `cycle`) to send."""

    def tick(self, io: IoContext) -> None:
        """Once per period, before the instruction is taken."""

    async def flush(self, new: bool) -> None:
        """Hand the last instruction to every reachable device, briefly; new: it changed since the last tick."""

    # -- the process ------------------------------------------------------------------------------------
    def run(self, io: IoContext) -> None:
        asyncio.run(self._main(io))

    def _read_outputs(self, io: IoContext) -> int:
        try:
            return io.read_outputs()
        except TornRead:  # the scan overtook us many times: the next tick reads again
            return 0

    async def _main(self, io: IoContext) -> None:
        self.io = io
        self.links = await self.open_links(io)
        self.stage(io)
        io.publish()  # first publish at once: the scan waits for every driver's first publish
        freeze_startup_heap()
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self.links.link_task(k, stop)) for k in self.active()]
        last_cycle = -1
        loop = asyncio.get_running_loop()
        period = self.period_s
        due = loop.time()
        try:
            while not io.stopping():
                due += period
                await asyncio.sleep(max(0.0, due - loop.time()))
                self.tick(io)
                cycle = self._read_outputs(io)
                if cycle and cycle != last_cycle:
                    self.instruct(cycle, io.outputs)
                    last_cycle = cycle
                if self.stage(io):
                    io.publish()
                if loop.time() > due + period:
                    due = loop.time()
        finally:
            stop.set()
            if tasks:
                done, pending = await asyncio.wait(tasks, timeout=self.stop_timeout_s)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            try:
                cycle = self._read_outputs(io)
                new = bool(cycle) and cycle != last_cycle
                if new:
                    self.instruct(cycle, io.outputs)
                await self.flush(new)
            finally:
                await self.links.aclose()
