"""One conformance suite run against every driver, as python-can runs one suite against every bus.

`DriverConformance` holds the cases; a subclass per driver (sim, modbus, opcua) brings a
real device (a Modbus agent of drivers/node on 127.0.0.1, the OPC UA demo server in its
own process) and says how to make each fault its transport can produce. A case that
cannot apply to a driver is skipped with the reason the subclass gives; a meta case checks
that every fault code and every part of the instruction is either exercised or explained.

The driver runs as in `vbatt run`: `run(io)` on a real shared-memory image, here in a
thread; the test plays the scan. Every wait polls a condition against a generous deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import wait_until
from mqtt_support import Loop  # an asyncio loop in a thread of its own, for devices served in this process
from test_modbus_support import fleet_of, free_port, mbap, raw_server, registers_reply, request_range
from vbatt.config.plant import load_config
from vbatt.drivers.base import IoContext
from vbatt.drivers.faults import Fault
from vbatt.drivers.registry import driver_class
from vbatt.kernel.image import ImageSpec, ProcessImage

pytestmark = pytest.mark.timeout(120)

WAIT_S = 15.0  # generous: anything awaited here takes well under a second on an idle machine
INSTRUCTION = ("battery_w", "bus_w", "served_w", "shed_w", "sequence", "lease_ms")
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 0.4  # reconnect_min_ms / reconnect_max_ms of every plant below




class Run:
    """The driver registered as `kind` on a real image, in a thread of this process."""

    def __init__(self, path: Path, kind: str):
        cfg, fleet = load_config(path)
        n = len(fleet)
        self.img = ProcessImage.create(ImageSpec(n_nodes=n, partitions=((0, n),), node_ids=tuple(fleet.ids)))
        self.io = IoContext(self.img, 0)
        self.driver = driver_class(kind)(cfg, fleet, 0, n)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.driver.run(self.io)
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            self.error = exc

    def inputs(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.img.inputs[0].seq:
            self.img.inputs[0].read(lambda arrays: out.update({k: v.copy() for k, v in arrays.items()}))
        out["_seq"] = self.img.inputs[0].seq
        return out

    def wait(self, pred, what: str, timeout: float = WAIT_S) -> dict[str, np.ndarray]:
        deadline = time.monotonic() + timeout
        inp: dict = {}
        while time.monotonic() < deadline:
            assert self.error is None, self.error
            inp = self.inputs()
            if "fault" in inp and pred(inp):
                return inp
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; last inputs: "
                             f"{ {k: (v.tolist() if hasattr(v, 'tolist') else v) for k, v in inp.items()} }")

    def command(self, cycle: int, **outputs: float) -> None:
        """Publish an instruction as the scan would."""
        for name, value in outputs.items():
            self.img.node[name][:] = value
        self.img.cycle[0] = cycle
        self.img.publish()

    def stop(self) -> None:
        self.io.request_stop()
        self.thread.join(20)
        alive = self.thread.is_alive()
        if not alive:
            self.img.close()
        assert not alive, "the driver did not return after stop"
        assert self.error is None, self.error


@contextlib.contextmanager
def mute_listener():
    """Accepts TCP (the kernel completes the handshake), never says a word: the worst kind of device."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def _arrived(conn: socket.socket) -> float:
    """When the connection's handshake completed (time.monotonic() seconds), from the kernel's TCP_INFO
    (tcpi_last_ack_recv: ms since the last ACK it received, the handshake's for a connection just accepted),
    not when this thread got to accept it: on a loaded machine that came up to 0.2 s late, and the gaps
    between attempts looked shorter than the driver's backoff (0.21 s against 0.4 s)."""
    try:
        info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        return time.monotonic() - struct.unpack_from("=I", info, 56)[0] / 1e3
    except (AttributeError, OSError, struct.error):  # no TCP_INFO here: when it was accepted
        return time.monotonic()


class HangUp:
    """A listener on `port` that accepts every connection and closes it at once, noting when it arrived."""

    def __init__(self, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.accepts: list[float] = []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepts.append(_arrived(conn))
            conn.close()

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.sock.close()


def established_to(port: int) -> int:
    """Client-side TCP connections of this machine to 127.0.0.1:`port` that are still open (/proc/net/tcp)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            remote, state = parts[2], parts[3]
            if int(remote.rsplit(":", 1)[1], 16) == port and state == "01":  # 01: ESTABLISHED
                n += 1
    return n


class DriverConformance:
    """The cases. A subclass sets `kind` and fills the hooks; `cannot` says which faults its transport
    cannot produce (and why), `not_carried` which parts of the instruction it does not send (and why)."""

    kind: str
    connected = True  # False: no connection to lose, reconnect or close (the case is skipped with `why_not`)
    why_not = ""
    makes: set[Fault] = set()  # the faults `provoke` makes
    cannot: dict[Fault, str] = {}
    not_carried: dict[str, str] = {}
    # every fault code some driver may set but no transport produces
    NOT_A_TRANSPORT_FAULT = {
        Fault.NONE: "not a fault (the healthy case is test_first_data_reaches_the_input_block)",
        Fault.DRIVER_FAILED: "set by the supervisor when a driver process dies, not by a driver",
    }

    # -- hooks -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def device(self):
        """A real device; yields an object with `port`, `stop()`, `start()` (same port again)."""
        raise NotImplementedError

    def plant(self, dev) -> str:
        """A plant YAML with one node served by `dev`."""
        raise NotImplementedError

    def expected(self, dev) -> dict[str, float]:
        """Input values the node must show when healthy."""
        raise NotImplementedError

    def received(self, dev) -> dict[str, float]:
        """What the device holds of the instruction (keys of INSTRUCTION it carries)."""
        raise NotImplementedError

    def provoke(self, fault: Fault, stack: contextlib.ExitStack, tmp: Path):
        """(plant YAML whose node gets `fault`, then(run) or None) for each fault not in `cannot`."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------------
    @pytest.fixture
    def start(self, tmp_path):
        runs: list[Run] = []

        def make(text: str) -> Run:
            p = tmp_path / f"plant{len(runs)}.yaml"
            p.write_text(text)
            r = Run(p, self.kind)
            runs.append(r)
            return r

        yield make
        for r in runs:
            if r.thread.is_alive():
                r.stop()

    def _needs_connection(self) -> None:
        if not self.connected:
            pytest.skip(self.why_not)

    # -- the cases -------------------------------------------------------------------------------------
    def test_every_fault_code_and_instruction_part_is_covered_or_explained(self):
        explained = set(self.cannot) | set(self.NOT_A_TRANSPORT_FAULT)
        assert not self.makes & explained, "a fault both made and explained away"
        assert self.makes | explained == set(Fault), f"neither made nor explained: {set(Fault) - self.makes - explained}"
        assert all(self.cannot.values()) and all(self.not_carried.values()), "a skip without a reason"
        assert set(self.not_carried) <= set(INSTRUCTION)

    def test_first_data_reaches_the_input_block(self, start):
        with self.device() as dev:
            r = start(self.plant(dev))
            inp = r.wait(lambda d: d["fault"][0] == Fault.NONE and d["updated_ns"][0] > 0, "first data")
            for name, value in self.expected(dev).items():
                assert inp[name][0] == pytest.approx(value, rel=1e-6), name
            if self.connected:
                assert inp["io_requests"][0] > 0 and inp["io_errors"][0] == 0

    def test_a_silent_device_goes_stale(self, start):
        self._needs_connection()
        with self.device() as dev:
            r = start(self.plant(dev))
            r.wait(lambda d: d["fault"][0] == Fault.NONE and d["updated_ns"][0] > 0, "first data")
            dev.stop()
            inp = r.wait(lambda d: d["fault"][0] in (Fault.CONNECTION, Fault.TIMEOUT), "a fault after the loss")
            stamped, seq = int(inp["updated_ns"][0]), inp["_seq"]
            # the node's data ages: later publishes never stamp it fresh again
            later = r.wait(lambda d: d["_seq"] >= seq + 3, "three more publishes")
            assert int(later["updated_ns"][0]) == stamped and later["fault"][0] != Fault.NONE
            assert later["io_errors"][0] > 0

    @pytest.mark.parametrize("fault", [f for f in Fault], ids=lambda f: f.name)
    def test_fault_code(self, fault, start, tmp_path):
        if fault in self.NOT_A_TRANSPORT_FAULT:
            pytest.skip(self.NOT_A_TRANSPORT_FAULT[fault])
        if fault in self.cannot:
            pytest.skip(self.cannot[fault])
        assert fault in self.makes, f"{fault.name}: neither made nor explained"
        with contextlib.ExitStack() as stack:
            text, then = self.provoke(fault, stack, tmp_path)
            r = start(text)
            if then is not None:
                then(r)
            inp = r.wait(lambda d: d["fault"][0] == fault, f"fault {fault.name}")
            assert r.thread.is_alive()
            if fault != Fault.NO_DATA and fault != Fault.BAD_VALUE and fault != Fault.EXCEPTION_REPLY:
                assert inp["updated_ns"][0] == 0, "a node that never answered properly was stamped fresh"
            r.stop()

    def test_reconnects_with_backoff_after_the_device_comes_back(self, start):
        self._needs_connection()
        with self.device() as dev:
            r = start(self.plant(dev))
            r.wait(lambda d: d["fault"][0] == Fault.NONE, "first data")
            dev.stop()
            hang = HangUp(dev.port)  # while the device is away, every attempt is accepted and hung up on
            try:
                wait_until(lambda: len(hang.accepts) >= 4, "four connection attempts while the device is away")
            finally:
                hang.close()
            gaps = np.diff(hang.accepts)
            # each wait is at least the backoff delay, doubling from the minimum up to the maximum
            want = [min(BACKOFF_MIN_S * 2 ** (k + 1), BACKOFF_MAX_S) for k in range(len(gaps))]
            assert all(g >= 0.8 * w for g, w in zip(gaps, want)), (gaps.tolist(), want)
            dev.start()
            inp = r.wait(lambda d: d["fault"][0] == Fault.NONE, "data again after the device came back")
            for name, value in self.expected(dev).items():
                assert inp[name][0] == pytest.approx(value, rel=1e-6), name

    def test_the_instruction_is_written_to_the_device(self, start):
        with self.device() as dev:
            r = start(self.plant(dev))
            r.wait(lambda d: d["fault"][0] == Fault.NONE, "first data")
            sent = {"battery_w": 60.0, "bus_w": -40.0, "served_w": 25.0, "shed_w": 5.0}
            r.command(4321, **sent)
            want = {**sent, "sequence": 4321, "lease_ms": self.lease_ms}
            carried = [k for k in INSTRUCTION if k not in self.not_carried]

            def arrived():
                got = self.received(dev)
                return all(got.get(k) == pytest.approx(want[k], abs=1e-3) for k in carried) and got

            wait_until(arrived, f"{carried} on the device")

    lease_ms = 0.0

    def test_close_twice_releases_the_socket(self, start):
        self._needs_connection()
        with self.device() as dev:
            r = start(self.plant(dev))
            r.wait(lambda d: d["fault"][0] == Fault.NONE, "first data")
            assert established_to(dev.port) >= 1  # the check below can fail
            r.stop()  # run() closed every link on the way out
            links = r.driver.links
            asyncio.run(links.aclose())
            asyncio.run(links.aclose())
            wait_until(lambda: established_to(dev.port) == 0, "no connection left to the device")


# -- sim ------------------------------------------------------------------------------------------------
class _SimDevice:
    port = 0


class TestSim(DriverConformance):
    kind = "sim"
    connected = False
    why_not = "a simulated node runs in the driver's process: there is no connection to lose, retry or close"
    cannot = {f: "the simulation answers every step and injects no faults (drivers/sim has no fault injection)"
              for f in Fault if f not in DriverConformance.NOT_A_TRANSPORT_FAULT}
    not_carried = {k: "the simulated battery takes battery_w only" for k in INSTRUCTION if k != "battery_w"}

    @contextlib.contextmanager
    def device(self):
        yield _SimDevice()

    def plant(self, dev) -> str:
        return ("drivers: {sim: {period_ms: 10}}\n"
                "nodes:\n  - {id: A, demand_w: 200, max_discharge_w: 100, max_charge_w: 100, capacity_wh: 1000, "
                "soc: 0.8, link_max_w: 1000}\n")

    def expected(self, dev) -> dict[str, float]:
        return {"soc": 0.8, "demand_w": 200.0, "voltage_v": 48.0, "capacity_wh": 1000.0}

    def test_the_instruction_is_written_to_the_device(self, start):
        # the device is the physics in the driver's process: battery_w shows as the current it draws
        r = start(self.plant(None))
        r.wait(lambda d: d["fault"][0] == Fault.NONE, "first data")
        r.command(7, battery_w=96.0)
        r.wait(lambda d: d["current_a"][0] == pytest.approx(96.0 / 48.0), "battery_w applied (I = P / V)")


# -- modbus ---------------------------------------------------------------------------------------------
ONE = """
nodes:
  - {id: A, demand_w: 200, max_discharge_w: 100, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
"""


class _ModbusDevice:
    """A real node agent (drivers/node) serving one simulated battery on 127.0.0.1."""

    def __init__(self, loop: Loop):
        self.loop, self.port = loop, 0
        self.agents = None
        self.start()

    def start(self) -> None:
        from vbatt.drivers.node.agent import AgentSet, AgentSpec
        from vbatt.drivers.node.backends.sim import SimBackend

        fleet = fleet_of(ONE)
        self.agents = AgentSet(SimBackend(fleet, 0, 1), [AgentSpec("A", "127.0.0.1", self.port)])
        self.loop.call(self.agents.start())
        self.port = self.agents.ports[0]

    def stop(self) -> None:
        if self.agents is not None:
            self.loop.call(self.agents.stop())
            self.agents = None


def _memory_reply(rows: np.ndarray):
    """A Modbus server answering reads (FC3, the read part of FC23) from a copy of an agent's registers."""
    from vbatt.drivers.modbus import sunspec as ss

    mem = rows.astype(np.int64).tolist()

    def reply(req: bytes):
        addr, count = request_range(req)
        off = addr - ss.NODE_MAP.base
        if off < 0 or off + count > len(mem):
            return mbap(req, bytes([req[7] | 0x80, 2]))
        return registers_reply(req, mem[off:off + count])

    return reply


class TestModbus(DriverConformance):
    kind = "modbus"
    makes = {Fault.NO_DATA, Fault.TIMEOUT, Fault.CONNECTION, Fault.EXCEPTION_REPLY, Fault.GARBLED, Fault.BAD_VALUE,
             Fault.NO_SUNSPEC, Fault.WRONG_UNIT, Fault.TLS}
    cannot = {Fault.SIMULATED: "only a simulation injects faults"}
    not_carried = {}
    lease_ms = 800.0
    DRIVER = ("drivers: {modbus: {poll_ms: 50, timeout_ms: 200, plaintext: true, reconnect_min_ms: 100, "
              "reconnect_max_ms: 400, publish_ms: 10, lease_ms: 800}}\n")

    @pytest.fixture(autouse=True)
    def _loop(self):
        self.loop = Loop()
        yield
        self.loop.close()

    @contextlib.contextmanager
    def device(self):
        dev = _ModbusDevice(self.loop)
        try:
            yield dev
        finally:
            dev.stop()

    def plant(self, dev) -> str:
        return self._port(dev.port)

    def expected(self, dev) -> dict[str, float]:
        return {"soc": 0.8, "demand_w": 200.0, "max_discharge_w": 100.0, "capacity_wh": 1000.0}

    def received(self, dev) -> dict[str, float]:
        a = dev.agents
        return {**{k: float(a.cmd[k][0]) for k in ("battery_w", "bus_w", "served_w", "shed_w")},
                "sequence": int(a.seq[0]), "lease_ms": float(a.lease_ms[0])}

    def _raw(self, stack, reply) -> int:
        cm = raw_server(reply)
        port = self.loop.call(cm.__aenter__())
        stack.callback(lambda: self.loop.call(cm.__aexit__(None, None, None)))
        return port

    def _port(self, port: int, node: str = "", driver: str | None = None) -> str:
        return (f"plant: {{stale_ms: 1000}}\n{driver or self.DRIVER}"
                f"nodes:\n  - {{id: A, driver: modbus, port: {port}{node}}}\n")

    def provoke(self, fault, stack, tmp):
        from vbatt.drivers.modbus import sunspec as ss

        M, V = ss.NODE_MAP, ss.VENDOR_ID
        if fault == Fault.NO_DATA:  # the first publish, before a mute device's long timeout
            port = stack.enter_context(mute_listener())
            slow = ("drivers: {modbus: {poll_ms: 1000, timeout_ms: 5000, plaintext: true, reconnect_min_ms: 100, "
                    "reconnect_max_ms: 400, publish_ms: 10}}\n")
            return self._port(port, driver=slow), None
        if fault == Fault.TIMEOUT:
            return self._port(stack.enter_context(mute_listener())), None
        if fault == Fault.CONNECTION:
            return self._port(free_port()), None
        if fault == Fault.EXCEPTION_REPLY:
            return self._port(self._raw(stack, lambda req: mbap(req, bytes([req[7] | 0x80, 4])))), None
        if fault == Fault.GARBLED:
            return self._port(self._raw(stack, lambda req: registers_reply(req, [0x5375, 0x6E53, 1]))), None
        if fault == Fault.NO_SUNSPEC:
            return self._port(self._raw(stack, lambda req: registers_reply(req, [0x1234] * request_range(req)[1]))), None
        if fault == Fault.BAD_VALUE:
            dev = stack.enter_context(self.device())
            rows = dev.agents.rows[:1].copy()
            ss.put(rows, M.at(V, "SoCFrac"), M.base, [1.5])  # a state of charge of 150 %
            return self._port(self._raw(stack, _memory_reply(rows[0]))), None
        if fault == Fault.WRONG_UNIT:
            dev = stack.enter_context(self.device())
            return self._port(dev.port, ", unit_id: 5"), None
        if fault == Fault.TLS:  # our TLS client against a plaintext device: the handshake fails
            from vbatt.drivers.certs import make_fleet_certs

            c = make_fleet_certs(tmp / "pki", 0)
            dev = stack.enter_context(self.device())
            tls = f", tls: {{ca: '{c['ca'].cert}', cert: '{c['controller'].cert}', key: '{c['controller'].key}'}}"
            driver = self.DRIVER.replace("plaintext: true, ", "")
            return self._port(dev.port, tls + ", plaintext: false", driver=driver), None
        raise AssertionError(f"no way to make {fault.name}")


# -- opcua ----------------------------------------------------------------------------------------------
class _UaDevice:
    """The OPC UA demo server (examples/opcua_demo_server.py) in its own process."""

    def __init__(self, port: int | None = None):
        from test_opcua_client import DemoServer

        self.server = DemoServer(port or free_port())
        self.port = self.server.port

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.start()


class TestOpcua(DriverConformance):
    kind = "opcua"
    makes = {Fault.NO_DATA, Fault.TIMEOUT, Fault.CONNECTION, Fault.EXCEPTION_REPLY, Fault.BAD_VALUE, Fault.TLS}
    cannot = {
        Fault.SIMULATED: "only a simulation injects faults",
        Fault.NO_SUNSPEC: "SunSpec discovery is Modbus's: an OPC UA node names its variables",
        Fault.WRONG_UNIT: "Modbus unit ids have no counterpart in OPC UA",
        Fault.GARBLED: "asyncua drops a malformed frame itself: the driver sees no answer (TIMEOUT) or a lost "
                       "connection (CONNECTION), never the frame",
    }
    not_carried = {
        "bus_w": "the demo device has no variable for it (an OPC UA node writes the outputs it maps)",
        "sequence": "OPC UA nodes map outputs to variables; there is no instruction sequence",
        "lease_ms": "OPC UA nodes map outputs to variables; there is no lease",
    }
    DRIVER = ("drivers:\n  opcua: {publishing_interval_ms: 50, reconnect_min_ms: 100, reconnect_max_ms: 400, "
              "connect_timeout_ms: 3000, request_timeout_ms: 1000, write_interval_ms: 0}\n")

    @contextlib.contextmanager
    def device(self):
        dev = _UaDevice()
        try:
            yield dev
        finally:
            dev.stop()

    def plant(self, dev, extra: str = "", driver: str | None = None, security: str = "none",
              battery: str = "BatterySetpointW", voltage: str = "Voltage") -> str:
        return (f"plant: {{stale_ms: 600}}\n{driver or self.DRIVER}nodes:\n"
                f"  - id: A\n    driver: opcua\n    endpoint: opc.tcp://127.0.0.1:{dev.port}/demo\n"
                f"    security: {security}\n{extra}"
                f"    inputs:\n      soc: {{node_id: \"ns=2;s=rack-1.SoC\", scale: 0.01}}\n"
                f"      voltage_v: \"ns=2;s=rack-1.{voltage}\"\n      demand_w: \"ns=2;s=rack-1.Load\"\n"
                f"      capacity_wh: \"ns=2;s=rack-1.CapacityWh\"\n"
                f"    outputs:\n      battery_w: \"ns=2;s=rack-1.{battery}\"\n"
                f"      served_w: \"ns=2;s=rack-1.ServedW\"\n      shed_w: \"ns=2;s=rack-1.ShedW\"\n")

    def expected(self, dev) -> dict[str, float]:
        return {"soc": 0.8, "voltage_v": 51.2, "demand_w": 400.0, "capacity_wh": 2000.0}

    def received(self, dev) -> dict[str, float]:
        s = dev.server
        return {"battery_w": s.get("rack-1.BatterySetpointW"), "served_w": s.get("rack-1.ServedW"),
                "shed_w": s.get("rack-1.ShedW")}

    def provoke(self, fault, stack, tmp):
        class _At:
            def __init__(self, port):
                self.port = port

        if fault == Fault.NO_DATA:  # the first publish, while a mute server's connect has not timed out
            port = stack.enter_context(mute_listener())
            return self.plant(_At(port), driver=self.DRIVER.replace("connect_timeout_ms: 3000",
                                                                    "connect_timeout_ms: 10000")), None
        if fault == Fault.TIMEOUT:
            return self.plant(_At(stack.enter_context(mute_listener()))), None
        if fault == Fault.CONNECTION:
            return self.plant(_At(free_port())), None
        dev = stack.enter_context(self.device())
        if fault == Fault.BAD_VALUE:  # a String variable mapped to a number
            return self.plant(dev, voltage="Model"), None
        if fault == Fault.EXCEPTION_REPLY:  # an output mapped to a read-only variable: the write is refused
            return self.plant(dev, battery="LinkMaxW"), lambda r: r.command(1, battery_w=5.0)
        if fault == Fault.TLS:  # a secure channel asked of a server that offers none
            from vbatt.drivers.certs import make_fleet_certs

            c = make_fleet_certs(tmp / "pki", 0)
            sec = (f"{{policy: Basic256Sha256, mode: SignAndEncrypt, certificate: '{c['controller'].cert}', "
                   f"private_key: '{c['controller'].key}', server_certificate: '{c['ca'].cert}'}}")
            return self.plant(dev, security=sec), None
        raise AssertionError(f"no way to make {fault.name}")


# -- mqtt -----------------------------------------------------------------------------------------------
class _MqttDevice:
    """A real Mosquitto (TLS for the controller, a plaintext loopback listener for the node) and a Sparkplug
    edge node `e1` publishing one simulated battery as device A (its physics held still: exact values)."""

    def __init__(self, tmp: Path, loop, edge: bool = True, soc: float | None = None):
        from mqtt_support import RunningEdge, edge_link, make_broker

        self.broker = make_broker(tmp)
        self.broker.start()
        self.port = self.broker.port
        self.edge = None
        if edge:
            self.edge = RunningEdge(loop, edge_link(self.broker, "e1", tls=False), "e1", tick=False, start=False)
            if soc is not None:
                self.edge.edge.agents.backend.offer["soc"][:] = soc
            self.edge.start()

    def stop(self) -> None:
        self.broker.stop()

    def start(self) -> None:
        self.broker.start()

    def close(self) -> None:
        if self.edge is not None:
            self.edge.stop()
        self.broker.stop()


class TestMqtt(DriverConformance):
    kind = "mqtt"
    makes = {Fault.NO_DATA, Fault.TIMEOUT, Fault.CONNECTION, Fault.EXCEPTION_REPLY, Fault.GARBLED, Fault.BAD_VALUE,
             Fault.TLS}
    cannot = {
        Fault.SIMULATED: "only a simulation injects faults",
        Fault.NO_SUNSPEC: "SunSpec discovery is Modbus's: a Sparkplug device births its metrics",
        Fault.WRONG_UNIT: "Sparkplug has no unit ids: a message for a device not configured here is counted "
                          "(Host.foreign), it is no node's fault",
    }
    not_carried = {}
    lease_ms = 800.0

    @pytest.fixture(autouse=True)
    def _loop(self, tmp_path):
        self.loop = Loop()
        self.tmp = tmp_path
        self.n = 0
        yield
        self.loop.close()

    def _dev(self, **kw) -> _MqttDevice:
        self.n += 1
        return _MqttDevice(self.tmp / f"broker{self.n}", self.loop, **kw)

    @contextlib.contextmanager
    def device(self):
        dev = self._dev()
        try:
            yield dev
        finally:
            dev.close()

    def plant(self, dev, ca: str | None = None, password: str | None = None, port: int | None = None) -> str:
        from mqtt_support import HOST_PW, HOST_USER

        ca = ca or str(dev.broker.ca)
        return ("plant: {stale_ms: 1000}\n"
                f"drivers: {{mqtt: {{host: 127.0.0.1, port: {port or dev.port}, tls: {{ca: '{ca}'}}, "
                f"username: {HOST_USER}, password: {password or HOST_PW}, host_id: h1, group: g1, command_ms: 100, "
                f"lease_ms: 800, silence_ms: 2000, reconnect_min_ms: 100, reconnect_max_ms: 400, publish_ms: 10}}}}\n"
                "nodes:\n  - {id: A, driver: mqtt, edge_node: e1}\n")

    def expected(self, dev) -> dict[str, float]:
        return {"soc": 0.8, "demand_w": 200.0, "max_discharge_w": 100.0, "capacity_wh": 1000.0}

    def received(self, dev) -> dict[str, float]:
        a = dev.edge.edge.agents
        return {**{k: float(a.cmd[k][0]) for k in ("battery_w", "bus_w", "served_w", "shed_w")},
                "sequence": int(a.seq[0]), "lease_ms": float(a.lease_ms[0])}

    def provoke(self, fault, stack, tmp):
        from mqtt_support import RawEdge

        class _At:
            def __init__(self, port):
                self.port = port

        if fault == Fault.TIMEOUT:  # a broker that accepts TCP and never says a word
            return self.plant(_At(stack.enter_context(mute_listener())), ca=str(self._ca(tmp))), None
        if fault == Fault.CONNECTION:
            return self.plant(_At(free_port()), ca=str(self._ca(tmp))), None
        if fault == Fault.TLS:  # a CA that did not sign the broker's certificate
            dev = self._dev(edge=False)
            stack.callback(dev.close)
            return self.plant(dev, ca=str(self._ca(tmp))), None
        if fault == Fault.EXCEPTION_REPLY:  # the broker refuses the login
            dev = self._dev(edge=False)
            stack.callback(dev.close)
            return self.plant(dev, password="wrong"), None
        if fault == Fault.NO_DATA:  # a broker, but no edge node births the device
            dev = self._dev(edge=False)
            stack.callback(dev.close)
            return self.plant(dev), None
        if fault == Fault.BAD_VALUE:  # a birth with a state of charge of 150 %
            dev = self._dev(soc=1.5)
            stack.callback(dev.close)
            return self.plant(dev), None
        if fault == Fault.GARBLED:  # a DBIRTH that is no protobuf
            dev = self._dev(edge=False)
            stack.callback(dev.close)
            raw = RawEdge(dev.broker, "e1", "A", b"\xff\xff\xff garbage")
            stack.callback(raw.close)
            return self.plant(dev), None
        raise AssertionError(f"no way to make {fault.name}")

    def _ca(self, tmp: Path) -> Path:
        from vbatt.drivers.certs import create_ca

        return create_ca(tmp / "other-ca").cert
