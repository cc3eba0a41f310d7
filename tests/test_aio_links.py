"""The async driver skeleton (drivers/aio.py) on its own: a tiny line protocol over real TCP on 127.0.0.1.

A transport that translates its failures raises LinkError; anything else is a bug in the
driver: it faults its own link (never the others), is logged once with its traceback, and
the link is dropped and retried like a lost connection.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from vbatt.drivers.aio import Backoff, LinkError, Links
from vbatt.drivers.faults import Fault


class LineLinks(Links):
    """Each link: connect to a port, a round is 'ping' -> one line back, which must be 'pong'."""

    log = logging.getLogger("vbatt.test.lines")

    def __init__(self, ports: list[int]):
        super().__init__(len(ports), interval_s=0.02, backoff_s=(0.05, 0.2))
        self.ports = ports
        self.conns: list = [None] * len(ports)
        self.rounds = [0] * len(ports)
        self.connects = [0] * len(ports)
        self.attempts = [0] * len(ports)

    def describe(self, k: int) -> str:
        return f"line {k}"

    def connected(self, k: int) -> bool:
        return self.conns[k] is not None

    async def connect(self, k: int) -> None:
        self.attempts[k] += 1
        try:
            self.conns[k] = await asyncio.open_connection("127.0.0.1", self.ports[k])
        except OSError as exc:
            raise LinkError(Fault.CONNECTION, f"cannot connect ({exc.strerror})") from None
        self.connects[k] += 1

    async def exchange(self, k: int) -> None:
        r, w = self.conns[k]
        w.write(b"ping\n")
        await w.drain()
        line = (await r.readline()).strip().decode()
        if not line:
            await self.disconnect(k)
            raise LinkError(Fault.CONNECTION, "closed by the peer")
        {"pong": None}[line]  # the bug: any other answer is a KeyError nobody translated
        self.rounds[k] += 1
        self.clear(k)

    async def disconnect(self, k: int) -> None:
        conn, self.conns[k] = self.conns[k], None
        if conn is not None:
            conn[1].close()


async def line_server(answer: bytes):
    open_conns = set()

    async def handle(r, w):
        open_conns.add(w)
        try:
            while await r.readline():
                w.write(answer)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            open_conns.discard(w)
            w.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], open_conns


async def until(pred, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_a_bug_in_one_link_faults_it_alone_loudly_once_and_it_is_retried(caplog):
    async def body():
        good, good_port, good_open = await line_server(b"pong\n")
        bad, bad_port, bad_open = await line_server(b"boom\n")
        links = LineLinks([good_port, bad_port])
        stop = asyncio.Event()
        tasks = [asyncio.create_task(links.link_task(k, stop)) for k in range(2)]
        await until(lambda: links.connects[1] >= 3, "three sessions of the buggy link")
        await until(lambda: links.rounds[0] >= 20, "twenty good rounds on the other link")
        assert links.comm_fault.tolist() == [0, Fault.CONNECTION]
        assert links.reason[1] == "KeyError: 'boom'"
        assert links.rounds[1] == 0
        stop.set()
        await asyncio.gather(*tasks)
        assert good_open, "the good link is still connected after its task ended"
        await links.aclose()
        await links.aclose()  # safe twice
        await until(lambda: not bad_open and not good_open, "every connection closed")
        for s in (good, bad):
            s.close()
            await s.wait_closed()

    with caplog.at_level(logging.WARNING, logger="vbatt.test.lines"):
        asyncio.run(body())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None, [r.getMessage() for r in caplog.records]
    assert "line 1: unexpected error in the driver" in errors[0].getMessage()
    assert not any("line 0" in r.getMessage() for r in caplog.records)


def test_an_unreachable_link_is_marked_and_logged_once_per_fault(caplog):
    async def body():
        srv, port, _ = await line_server(b"pong\n")
        srv.close()
        await srv.wait_closed()  # nobody listens there any more
        links = LineLinks([port])
        links.t0 -= 60  # past the quiet start-up: every first fault is a warning
        stop = asyncio.Event()
        task = asyncio.create_task(links.link_task(0, stop))
        await until(lambda: links.attempts[0] >= 3, "three attempts")
        assert links.comm_fault[0] == Fault.CONNECTION
        stop.set()
        await task
        return links

    with caplog.at_level(logging.INFO, logger="vbatt.test.lines"):
        links = asyncio.run(body())
    assert links.reason[0].startswith("cannot connect")
    assert links.connects == [0]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"line 0: CONNECTION: {links.reason[0]}"], lines


class ClosingLinks(LineLinks):
    """A reset (a ping the server had not read when it closed) is the same loss as a clean close."""

    async def exchange(self, k: int) -> None:
        try:
            await super().exchange(k)
        except ConnectionError:
            await self.disconnect(k)
            raise LinkError(Fault.CONNECTION, "closed by the peer") from None


def test_links_failing_together_are_logged_as_one_line_that_counts_them(caplog):
    """A switch that fails takes every device behind it at once: one line says how many and names a few."""
    async def body():
        srv, port, open_conns = await line_server(b"pong\n")
        links = ClosingLinks([port] * 6)
        links.log_gather_s = 60.0  # only the flush at the stop logs: the line cannot depend on timing
        stop = asyncio.Event()
        tasks = [asyncio.create_task(links.link_task(k, stop)) for k in range(6)]
        await until(lambda: min(links.rounds) >= 1, "every link answered")
        srv.close()
        for w in list(open_conns):
            w.close()
        await until(lambda: all(f == Fault.CONNECTION for f in links.comm_fault), "every link lost")
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "nothing logged before the flush"
        stop.set()
        await asyncio.gather(*tasks)
        await links.aclose()

    with caplog.at_level(logging.INFO, logger="vbatt.test.lines"):
        asyncio.run(body())
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    infos = [m for lv, m in lines if lv == logging.INFO]
    assert len(infos) == 1 and infos[0].startswith("6 links: data again (was NO_DATA): line "), lines
    warnings = [m for lv, m in lines if lv == logging.WARNING]
    assert len(warnings) == 1, lines
    head, names = warnings[0].split(": closed by the peer: ")
    assert head == "6 links: CONNECTION", warnings
    named, more = names.split(" and ")
    assert more == "3 more" and len(set(named.split(", "))) == 3 and all(n.startswith("line ") for n in named.split(", "))


class AddressedLinks(LineLinks):
    """A refused connection names its address, as a Modbus or OPC UA link's does."""

    async def connect(self, k: int) -> None:
        try:
            await super().connect(k)
        except LinkError:
            raise LinkError(Fault.CONNECTION, f"cannot connect to 127.0.0.1:{self.ports[k]}") from None


def test_links_refused_together_are_one_line_though_each_names_its_own_address(caplog):
    """Every device behind a switch that fails is refused at its own address: still one line, with one
    address given as the first of them."""
    async def body():
        ports = []
        for _ in range(5):
            srv, port, _ = await line_server(b"pong\n")
            srv.close()
            await srv.wait_closed()  # nobody listens there any more
            ports.append(port)
        links = AddressedLinks(ports)
        links.t0 -= 60  # past the quiet start-up: every first fault is a warning
        links.log_gather_s = 60.0  # only the flush at the stop logs: the line cannot depend on timing
        stop = asyncio.Event()
        tasks = [asyncio.create_task(links.link_task(k, stop)) for k in range(5)]
        await until(lambda: all(f == Fault.CONNECTION for f in links.comm_fault), "every link refused")
        stop.set()
        await asyncio.gather(*tasks)
        return ports

    with caplog.at_level(logging.INFO, logger="vbatt.test.lines"):
        ports = asyncio.run(body())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    head, rest = lines[0].split(": ", 1)
    assert head == "5 links", lines
    kind, rest = rest.split(": ", 1)
    assert kind == "CONNECTION", lines
    names, first = rest.split(" (the first: ")
    named, more = names.split(" and ")
    assert more == "2 more" and len(set(named.split(", "))) == 3, lines
    assert first.rstrip(")") in {f"cannot connect to 127.0.0.1:{p}" for p in ports}, lines


class GatedLinks(Links):
    """No network: a link's first round times out, its second waits at its gate, then answers."""

    log = logging.getLogger("vbatt.test.gated")

    def __init__(self, n: int):
        super().__init__(n, interval_s=0.02, backoff_s=(0.05, 0.2))
        self.rounds = [0] * n
        self.waiting = [False] * n
        self.gates: list[asyncio.Event] = []
        self.said_goodbye: list[int] = []

    def describe(self, k: int) -> str:
        return f"gated {k}"

    def connected(self, k: int) -> bool:
        return True

    async def exchange(self, k: int) -> None:
        self.rounds[k] += 1
        if self.rounds[k] == 1:
            raise LinkError(Fault.TIMEOUT, "no reply within 10 ms")
        self.waiting[k] = True
        await self.gates[k].wait()
        self.clear(k)

    async def goodbye(self, k: int) -> None:
        self.said_goodbye.append(k)

    async def disconnect(self, k: int) -> None:
        pass


def test_links_that_end_one_by_one_at_a_stop_are_still_logged_together(caplog):
    """At a stop each link ends after its round in flight, one after the other: what they gathered is said
    once, when the last one ends (not a line per link), and each says its goodbye after its last round."""
    async def body():
        links = GatedLinks(4)
        links.t0 -= 60  # past the quiet start-up: every first fault is a warning
        links.log_gather_s = 60.0  # only the flush at the stop logs: the lines cannot depend on timing
        links.gates = [asyncio.Event() for _ in range(4)]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(links.link_task(k, stop)) for k in range(4)]
        await until(lambda: all(links.waiting), "every link in its second round")
        stop.set()
        for k in range(4):  # the rounds in flight end one after the other
            links.gates[k].set()
            await until(lambda: tasks[k].done(), f"link {k} ended")
        return links.said_goodbye

    with caplog.at_level(logging.INFO, logger="vbatt.test.gated"):
        goodbyes = asyncio.run(body())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("4 links: TIMEOUT: no reply within 10 ms: gated ") and lines[0].endswith("1 more"), lines
    assert lines[1].startswith("4 links: data again (was TIMEOUT): gated "), lines
    assert goodbyes == [0, 1, 2, 3]


def test_backoff_doubles_to_its_maximum_and_resets():
    b = Backoff(0.1, 0.5)
    assert [b.next() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    b.reset()
    assert b.next() == 0.1


@pytest.mark.parametrize("fault", [Fault.TIMEOUT, Fault.GARBLED])
def test_a_link_error_keeps_its_code_and_reason(fault):
    links = LineLinks([1])
    assert links.fault_of(LinkError(fault, "why")) == (fault, "why")
    assert links.fault_of(KeyError("x")) is None
