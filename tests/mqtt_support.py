"""Shared by the MQTT tests: one Mosquitto per test session (installed when missing), accounts, an edge
node serving simulated batteries in a thread's asyncio loop, and waiting helpers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_until  # noqa: F401 (the MQTT tests take it from here)
from test_modbus_support import fleet_of
from vbatt.drivers.mqtt.broker import Broker, User, sparkplug_acl
from vbatt.drivers.mqtt.client import tls_context
from vbatt.drivers.mqtt.edge import EdgeNode, Link
from vbatt.drivers.node.agent import AgentSet, AgentSpec
from vbatt.drivers.node.backends.sim import SimBackend

HOST_USER, HOST_PW = "controller", "host-secret-1"
EDGES = ("e1", "e2", "e3", "e4", "e5", "e6", "edge-A", "fleet-0", "fleet-1", "intruder")
EDGE_PW = "edge-secret-1"


def users() -> list[User]:
    return [User(HOST_USER, HOST_PW, sparkplug_acl("host")), *(User(e, EDGE_PW, sparkplug_acl("edge")) for e in EDGES)]


def make_broker(directory: Path, plaintext: bool = True) -> Broker:
    return Broker(directory, users(), plaintext=plaintext)


class Loop:
    """An asyncio loop in a thread of its own."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def soon(self, fn, *args):
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


ONE = """
nodes:
  - {id: A, demand_w: 200, max_discharge_w: 100, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
"""


def edge_link(broker: Broker, edge: str, tls: bool = True, password: str = EDGE_PW) -> Link:
    if tls:
        return Link("127.0.0.1", broker.port, tls_context(broker.ca), edge, password, keepalive_s=5)
    return Link("127.0.0.1", broker.plain_port, None, edge, password, keepalive_s=5)


class RunningEdge:
    """An EdgeNode of simulated nodes (`plant` YAML) running in `loop` until stopped."""

    def __init__(self, loop: Loop, link: Link, edge: str, plant: str = ONE, devices: list[str] | None = None,
                 group: str = "g1", tick_ms: float = 100.0, period_ms: float = 1000.0, primary_host: str | None = None,
                 tick: bool = True, start: bool = True):
        fleet = fleet_of(plant)
        n = len(fleet)
        self.loop = loop
        agents = AgentSet(SimBackend(fleet, 0, n), [AgentSpec(i, "127.0.0.1", 0) for i in fleet.ids], tick_ms=tick_ms)
        self.edge = EdgeNode(agents, link, group=group, edge=edge, devices=devices or list(fleet.ids),
                             period_ms=period_ms, primary_host=primary_host, reconnect_s=(0.1, 0.4))
        self.tick = tick
        if start:
            self.start()

    def start(self) -> None:
        async def make():
            return asyncio.Event()

        self.stop_ev = self.loop.call(make())
        self.task = asyncio.run_coroutine_threadsafe(self.edge.run(self.stop_ev, tick=self.tick), self.loop.loop)

    def stop(self) -> None:
        self.loop.soon(self.stop_ev.set)
        self.task.result(15)


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    b = make_broker(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def loop():
    lp = Loop()
    yield lp
    lp.close()


class Cuttable:
    """A TCP relay to the broker's plaintext port, run in `loop`, that the test can cut: every connection through
    it is reset (the broker publishes the edge node's will) and new ones are refused, as a broken link would."""

    def __init__(self, loop: Loop, port: int):
        self.loop, self.upstream = loop, port
        self.transports: list[asyncio.BaseTransport] = []

        async def start():
            return await asyncio.start_server(self._client, "127.0.0.1", 0)

        self.server = loop.call(start())
        self.port = self.server.sockets[0].getsockname()[1]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.transports += [writer.transport, up_w.transport]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def cut(self) -> None:
        async def go():
            self.server.close()
            for t in self.transports:
                t.abort()

        self.loop.call(go())


class RawEdge:
    """A misbehaving edge node: a valid NBIRTH, then `device_payload` as the DBIRTH of `device`, again and
    again (every 0.2 s) until closed, so that a host connecting at any time sees it."""

    def __init__(self, broker: Broker, edge: str, device: str, device_payload: bytes, group: str = "g1"):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        from vbatt.drivers.mqtt import sparkplug as sp

        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{edge}")
        self.c.username_pw_set(edge, EDGE_PW)
        self.c.connect("127.0.0.1", broker.plain_port)
        self.c.loop_start()
        self.running = True

        def birth(seq: int) -> bytes:
            p = sp.Payload(timestamp=int(time.time() * 1000), seq=seq)
            p.metrics.add(name="bdSeq", datatype=sp.DataType.UInt64, long_value=0)
            return p.SerializeToString()

        def go():
            while self.running:
                self.c.publish(sp.topic(group, "NBIRTH", edge), birth(0))
                self.c.publish(sp.topic(group, "DBIRTH", edge, device), device_payload)
                time.sleep(0.2)

        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.running = False
        self.thread.join(5)
        self.c.disconnect()
        self.c.loop_stop()


class HostRun:
    """The driver's Host (the Sparkplug host application) on `nodes`, running in `loop`; `inputs()` stages
    what the scan would latch."""

    def __init__(self, loop: Loop, broker: Broker, nodes: list[tuple[str, str, str]], *, host_id: str = "h1",
                 lease_ms: float = 800, command_ms: float = 100, silence_ms: float = 1000, port: int | None = None,
                 rebirth_min_ms: float = 300, password: str = HOST_PW, **host_kw):
        import numpy as np

        from vbatt.drivers.mqtt.driver import Host
        from vbatt.kernel.image import DRIVER_INPUTS

        self.loop = loop
        link = Link("127.0.0.1", port or broker.port, tls_context(broker.ca), HOST_USER, password, keepalive_s=5)
        self.host = Host(nodes, link, host_id=host_id, lease_ms=lease_ms, command_ms=command_ms,
                         silence_ms=silence_ms, rebirth_min_ms=rebirth_min_ms, backoff_s=(0.1, 0.4), **host_kw)
        self.staging = {f.name: np.zeros(len(nodes), f.dtype) for f in DRIVER_INPUTS}

        async def make():
            return asyncio.Event()

        self.stop_ev = loop.call(make())
        self.task = asyncio.run_coroutine_threadsafe(self.host.link_task(0, self.stop_ev), loop.loop)

    def inputs(self) -> dict:
        self.host.fill(self.staging)
        return {k: v.copy() for k, v in self.staging.items()}

    def instruct(self, seq: int, **outputs: float) -> None:
        import numpy as np

        n = self.host.nodes_n
        vals = {k: np.full(n, float(outputs.get(k, 0.0))) for k in ("battery_w", "bus_w", "served_w", "shed_w")}
        self.loop.soon(self.host.set_instruction, seq, vals)

    def wait(self, pred, what: str, timeout: float = 20.0) -> dict:
        return wait_until(lambda: (lambda d: d if pred(d) else None)(self.inputs()), what, timeout)

    def stop(self) -> None:
        self.loop.soon(self.stop_ev.set)
        self.task.result(15)
        self.loop.call(self.host.aclose())


@contextlib.contextmanager
def fleet_process(cfg: Path, *args: str, stderr=subprocess.DEVNULL):
    """`vbatt fleet CFG ARGS` (the config's MQTT nodes as edge nodes) for the block's length; SIGTERM after,
    killed if it does not end within 15 s."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "vbatt.cli", "fleet", str(cfg), *args], cwd=repo,
                            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        finally:
            proc.kill()
            if proc.stderr is not None:
                proc.stderr.close()


def run_all_online(cfg: Path, tmp_path: Path, n: int, *args: str) -> tuple[dict, str]:
    """`vbatt run CFG ARGS` for 8 s with a snapshot: it ends cleanly and all `n` nodes were online, fault-free and
    answering (an I/O latency measured) at its last cycle. Returns the snapshot and the run's log."""
    from conftest import read_json, run_vbatt

    r = run_vbatt("run", str(cfg), "--duration", "8", "--snapshot", str(tmp_path / "snap.json"), *args)
    assert r.returncode == 0, r.stderr[-2000:]
    snap = read_json(tmp_path / "snap.json")
    assert snap["aggregate"]["nodes_online"] == n
    nodes = snap["nodes"]
    assert len(nodes) == n and all(x["fault"] == 0 and x["io_latency_ms"] > 0 for x in nodes), nodes
    return snap, r.stderr
