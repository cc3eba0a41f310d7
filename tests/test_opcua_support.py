"""Shared set-up of the OPC UA tests (no tests here): state dir, users, certificates, image, server, clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from asyncua import Client, ua
from asyncua.crypto.security_policies import (SecurityPolicyAes128Sha256RsaOaep, SecurityPolicyAes256Sha256RsaPss,
                                              SecurityPolicyBasic256Sha256)

from vbatt.kernel.image import ImageSpec, ProcessImage
from vbatt.opcua_models.config import OpcuaServerConfig
from vbatt.opcua_models.model import NS_URI
from vbatt.opcua_models.security import TrustList, UserStore, cert_paths, make_certificate
from vbatt.kernel.stats import stats_specs
from vbatt.kernel.ports import free_port

OPERATOR = ("op", "operator-pass-1")
VIEWER = ("view", "viewer-pass-1")
CLIENT_URI = "urn:vbatt:test:client"
POLICIES = {"Basic256Sha256": SecurityPolicyBasic256Sha256, "Aes128Sha256RsaOaep": SecurityPolicyAes128Sha256RsaOaep,
            "Aes256Sha256RsaPss": SecurityPolicyAes256Sha256RsaPss}


class Events:
    """A subscription handler that keeps every event it is sent (alarms, model changes)."""

    def __init__(self):
        self.got = []

    def event_notification(self, ev):
        self.got.append(ev)


@dataclass
class Pki:
    state: Path
    cert: Path  # trusted client certificate (DER)
    key: Path
    untrusted_cert: Path
    untrusted_key: Path


_KEYS: dict[str, tuple[bytes, bytes]] = {}


def _cert(name: str, uri: str, server: bool = False) -> tuple[bytes, bytes]:
    """RSA key generation dominates set-up time: one key per role per test process."""
    if name not in _KEYS:
        _KEYS[name] = make_certificate(name, uri, server=server)
    return _KEYS[name]


_USERS: list[tuple[bytes, int]] = []


def _users(path: Path) -> None:
    """The operator and the viewer, added by UserStore once per test process (each scrypt hash takes a
    tenth of a second on purpose); later state dirs get a copy of that users file with its mode, so the
    tests of what UserStore wrote (hashes only, 0600) still see what it wrote."""
    if _USERS:
        data, mode = _USERS[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
            fh.write(data)
        os.chmod(path, mode)
        return
    users = UserStore(path)
    users.add(*OPERATOR[:1], "operator", OPERATOR[1])
    users.add(*VIEWER[:1], "viewer", VIEWER[1])
    _USERS.append((path.read_bytes(), path.stat().st_mode & 0o7777))


def make_state(root: Path) -> Pki:
    """A state dir with an operator, a viewer and one trusted client certificate (one untrusted too)."""
    state = root / "state"
    _users(state / "users.json")
    sder, spem = _cert("test server", OpcuaServerConfig().application_uri, server=True)
    own_cert, own_key = cert_paths(state)
    own_cert.parent.mkdir(parents=True, exist_ok=True)
    own_cert.write_bytes(sder)
    own_key.write_bytes(spem)
    der, pem = _cert("test client", CLIENT_URI)
    (root / "client.der").write_bytes(der)
    (root / "client.pem").write_bytes(pem)
    TrustList(state).add(der, "test-client")
    der2, pem2 = _cert("stranger", CLIENT_URI)
    (root / "stranger.der").write_bytes(der2)
    (root / "stranger.pem").write_bytes(pem2)
    return Pki(state, root / "client.der", root / "client.pem", root / "stranger.der", root / "stranger.pem")


def make_image(n: int = 4, ids: list[str] | None = None) -> tuple[ProcessImage, list[str]]:
    ids = ids or [f"rack-{i}" for i in range(n)]
    spec = ImageSpec(n_nodes=len(ids), partitions=((0, len(ids)),), memory=tuple(stats_specs(100)),
                     node_ids=tuple(ids))
    img = ProcessImage.create(spec)
    return img, ids


def fill(img: ProcessImage, k: float = 1.0) -> None:
    """Distinct values everywhere, then one 'scan cycle' (publish)."""
    n = img.spec.n_nodes
    for name, arr in img.node.items():
        if arr.dtype.kind == "f":
            arr[:] = [k * (10 * i + len(name)) for i in range(n)]
    img.node["soc"][:] = [0.1 * (i + 1) * k % 1.0 for i in range(n)]
    img.node["online"][:] = 1
    img.node["priority"][:] = list(range(n))
    img.node["io_requests"][:] = [100 + i for i in range(n)]
    for name, arr in img.agg.items():
        arr[0] = k * len(name)
    img.agg["soc"][0] = 0.25 * k
    img.time_ns[0] = time.monotonic_ns()
    img.cycle[0] += 1
    img.publish()


def server_config(pki: Pki, **kw) -> OpcuaServerConfig:
    return OpcuaServerConfig(enabled=True, port=free_port(), state_dir=str(pki.state),
                             history={"sample_ms": 10, "flush_s": 0.05}, **kw)


async def start_server(pki: Pki, img, ids, *, cycle_ms: float = 10.0, **cfg_kw):
    """Start a VbattOpcuaServer on a free port; a port taken by someone else meanwhile is retried."""
    from vbatt.opcua_models.server import VbattOpcuaServer

    for attempt in range(5):
        srv = VbattOpcuaServer(server_config(pki, **cfg_kw), img, ids, cycle_ms=cycle_ms)
        try:
            await srv.start()
            return srv
        except OSError:
            with contextlib.suppress(Exception):
                await srv.stop()
            if attempt == 4:
                raise


def client(endpoint: str, pki: Pki, user: tuple[str, str] | None = OPERATOR, *, policy: str = "Basic256Sha256",
           untrusted: bool = False) -> Client:
    c = Client(endpoint, timeout=10)
    c.application_uri = CLIENT_URI
    c.session_timeout = 60_000
    cert, key = (pki.untrusted_cert, pki.untrusted_key) if untrusted else (pki.cert, pki.key)
    c._pending_security = (POLICIES[policy], str(cert), str(key))  # applied in connect()
    if user:
        c.set_user(user[0])
        c.set_password(user[1])
    return c


@contextlib.asynccontextmanager
async def connected(endpoint: str, pki: Pki, user=OPERATOR, **kw):
    c = client(endpoint, pki, user, **kw)
    pol, cert, key = c._pending_security
    await c.set_security(pol, cert, key, mode=ua.MessageSecurityMode.SignAndEncrypt)
    await c.connect()
    try:
        c.vbatt_ns = await c.get_namespace_index(NS_URI)
        yield c
    finally:
        with contextlib.suppress(Exception):
            await c.disconnect()


def nid(c: Client, s: str) -> ua.NodeId:
    return ua.NodeId(s, c.vbatt_ns)


def drain(img: ProcessImage) -> list[tuple[int, int, float, int]]:
    got: list[tuple[int, int, float, int]] = []
    img.commands.drain(lambda *a: got.append(a))
    return got


async def wait_for(pred, timeout: float = 5.0, step: float = 0.02):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        v = pred()
        if v:
            return v
        await asyncio.sleep(step)
    return pred()
