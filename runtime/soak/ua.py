"""OPC UA side of the soak: the watching client, and throw-away clients that vanish.

`UaMonitor` connects to the controller's server (SignAndEncrypt, a user made with
`vbatt opcua-user`, a client certificate made with `vbatt opcua-cert --client`),
subscribes to every node's `online`, `fault`, `trip` and `io_latency_ms` and to the scan's
state, cycles, overruns and wake-latency maximum, and hands every change, stamped with the
soak's monotonic clock, to a callback. It reconnects by itself after a controller restart.

`python -m vbatt.soak.ua vanish ...` is a client that connects, subscribes, prints its local
TCP port and then disappears without closing its session: either it is SIGKILLed by the soak,
or (`--drop`) it resets its own socket and exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass

from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

__all__ = ["UaLogin", "UaMonitor", "NODE_VARS", "SCAN_VARS", "server_has_connection"]

NODE_VARS = ("online", "fault", "trip", "io_latency_ms")
SCAN_VARS = ("state", "cycles", "overruns", "wake_max_us")
NS_URI = "http://vbatt.org/UA/VirtualBattery/"
log = logging.getLogger("vbatt.soak.harness")


@dataclass(frozen=True)
class UaLogin:
    endpoint: str
    cert: str
    key: str
    user: str
    password: str
    app_uri: str


async def connect(login: UaLogin, timeout_s: float = 10.0, session_timeout_ms: int = 30_000) -> Client:
    c = Client(login.endpoint, timeout=timeout_s)
    c.application_uri = login.app_uri
    c.session_timeout = session_timeout_ms
    c.set_user(login.user)
    c.set_password(login.password)
    await c.set_security(SecurityPolicyBasic256Sha256, login.cert, login.key,
                         mode=ua.MessageSecurityMode.SignAndEncrypt)
    await asyncio.wait_for(c.connect(), timeout_s)
    return c


class _Handler:
    def __init__(self, mon: "UaMonitor"):
        self.mon = mon

    def datachange_notification(self, node, val, data) -> None:
        key = self.mon._keys.get(node.nodeid.Identifier)
        if key is not None:
            self.mon._changed(key[0], key[1], val)

    def status_change_notification(self, status) -> None:  # the server went away: reconnect
        self.mon._lost.set()


class UaMonitor:
    """The soak's view of the controller through OPC UA. `values[(node_or_'scan', var)]`."""

    def __init__(self, login: UaLogin, node_ids: list[str], on_change, *, publish_ms: float = 100.0):
        self.login = login
        self.node_ids = node_ids
        self.on_change = on_change  # (who, var, value, t_monotonic)
        self.publish_ms = publish_ms
        self.values: dict[tuple[str, str], object] = {}
        self.up = False  # connected and subscribed
        self.connects = 0
        self.errors: list[str] = []
        self.client: Client | None = None
        self.ns = -1
        self._keys: dict[str, tuple[str, str]] = {}
        self._lost = asyncio.Event()

    def _changed(self, who: str, var: str, val) -> None:
        self.values[(who, var)] = val
        self.on_change(who, var, val, time.monotonic())

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._session(stop)
            except (Exception, asyncio.TimeoutError) as exc:  # noqa: BLE001 (the controller may be down)
                if len(self.errors) < 100:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            self.up = False
            c, self.client = self.client, None
            if c is not None:
                with contextlib.suppress(Exception, asyncio.TimeoutError):
                    await asyncio.wait_for(c.disconnect(), 2.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def _session(self, stop: asyncio.Event) -> None:
        self._lost.clear()
        c = self.client = await connect(self.login)
        self.ns = await asyncio.wait_for(c.get_namespace_index(NS_URI), 5)
        self._keys = {f"{n}.{v}": (n, v) for n in self.node_ids for v in NODE_VARS}
        self._keys.update({f"VirtualBattery.Scan.{v}": ("scan", v) for v in SCAN_VARS})
        sub = await asyncio.wait_for(c.create_subscription(self.publish_ms, _Handler(self)), 5)
        nodes = [c.get_node(ua.NodeId(k, self.ns)) for k in self._keys]
        for k in range(0, len(nodes), 500):
            await asyncio.wait_for(sub.subscribe_data_change(nodes[k:k + 500]), 20)
        self.up = True
        self.connects += 1
        probe = c.get_node(ua.NodeId("VirtualBattery.Scan.cycles", self.ns))
        while not stop.is_set() and not self._lost.is_set():
            await asyncio.wait_for(probe.read_value(), 3.0)  # a dead server shows here within seconds
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    async def reset_trip(self, node_id: str, timeout_s: float = 5.0) -> None:
        c = self.client
        if c is None or not self.up:
            raise RuntimeError("OPC UA client not connected")
        vb = c.get_node(ua.NodeId("VirtualBattery", self.ns))
        method = c.get_node(ua.NodeId("VirtualBattery.ResetTrip", self.ns))
        await asyncio.wait_for(vb.call_method(method, ua.Variant(node_id, ua.VariantType.String)), timeout_s)


def server_has_connection(server_port: int, client_port: int) -> bool:
    """Whether the server side of 127.0.0.1:server_port <- :client_port is still open (ESTABLISHED or
    CLOSE_WAIT, i.e. the server has not closed it), from /proc/net/tcp."""
    want_l, want_r = f"{server_port:04X}", f"{client_port:04X}"
    try:
        lines = open("/proc/net/tcp").read().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        parts = line.split()
        local, remote, state = parts[1], parts[2], parts[3]
        if local.endswith(":" + want_l) and remote.endswith(":" + want_r) and state in ("01", "08"):
            return True
    return False


# -- the vanishing client (a process of its own) ---------------------------------------------------
async def _vanish(login: UaLogin, drop: bool, node_ids: list[str], life_s: float) -> None:
    c = await connect(login, session_timeout_ms=10_000)
    ns = await c.get_namespace_index(NS_URI)

    class H:
        def datachange_notification(self, node, val, data) -> None:
            pass

    sub = await c.create_subscription(100, H())
    await sub.subscribe_data_change([c.get_node(ua.NodeId(f"{n}.soc", ns)) for n in node_ids[:5]])
    sock = c.uaclient.protocol.transport.get_extra_info("socket")
    port = sock.getsockname()[1]
    print(f"ready {port}", flush=True)
    if drop:  # reset the connection: no CloseSession, no FIN handshake, then gone
        raw = socket.socket(fileno=os.dup(sock.fileno()))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        os._exit(0)  # the kernel closes the socket with linger 0: RST
    await asyncio.sleep(life_s)  # bounded: the soak SIGKILLs it long before
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vbatt.soak.ua")
    p.add_argument("what", choices=("vanish",))
    p.add_argument("--endpoint", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--app-uri", required=True)
    p.add_argument("--nodes", default="")
    p.add_argument("--drop", action="store_true")
    p.add_argument("--life-s", type=float, default=120.0)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    password = sys.stdin.readline().rstrip("\n")
    login = UaLogin(a.endpoint, a.cert, a.key, a.user, password, a.app_uri)
    asyncio.run(asyncio.wait_for(_vanish(login, a.drop, [n for n in a.nodes.split(",") if n], a.life_s),
                                 a.life_s + 30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
