"""Several sessions on one secure channel (OPC UA Part 4, 5.7.2.1): each request runs as its own session.

Real server on 127.0.0.1, SignAndEncrypt. The asyncua client opens a second
session on its channel and chooses the session of each request by the
AuthenticationToken it sends, as the standard has it; node-opcua (an independent
implementation) does the same with two ClientSessions on one OPCUAClient, against
`vbatt run` with a real scan, so that what a refused request did not change can be
read back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from asyncua import ua
from asyncua.ua.ua_binary import struct_from_binary
from asyncua.ua.uaerrors import UaStatusCodeError

from vbatt.kernel.image import Op
from vbatt.opcua_models.security import TrustList, UserStore, cert_paths, make_certificate
from vbatt.opcua_models.sessions import ChannelProcessor

from test_opcua_e2e import CONFIG, _wait_port, node_opcua  # noqa: F401 - node_opcua is a fixture
from test_opcua_support import OPERATOR, VIEWER, connected, drain, fill, free_port, make_image, make_state, nid, \
    start_server, wait_for

D = lambda x: ua.Variant(x, ua.VariantType.Double)  # noqa: E731


@contextlib.asynccontextmanager
async def served(tmp_path):
    pki = make_state(tmp_path)
    img, ids = make_image(4)
    fill(img)
    srv = await start_server(pki, img, ids)
    try:
        yield srv, img, pki
    finally:
        await srv.stop()
        img.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def token(c):
    return c.uaclient.session.authentication_token


def use(c, tok) -> None:
    """Send the next requests of this channel in the session `tok` names."""
    c.uaclient.session.restore_authentication_token(tok)


async def open_session(c, user) -> ua.NodeId:
    """Another session on c's secure channel (the channel is not reopened); returns its token."""
    await c.create_session()
    await c.activate_session(*user)
    return token(c)


async def close_session(c, tok) -> None:
    """CloseSession for one session only (asyncua's own close_session would consider the client done)."""
    use(c, tok)
    req = ua.CloseSessionRequest()
    req.DeleteSubscriptions = True
    data = await c.uaclient._send_request(req)
    struct_from_binary(ua.CloseSessionResponse, data).ResponseHeader.ServiceResult.check()


async def status(coro) -> int:
    try:
        await coro
    except UaStatusCodeError as exc:
        return exc.code
    return ua.StatusCodes.Good


def test_each_request_runs_as_the_session_its_token_names(tmp_path):
    async def body():
        async with served(tmp_path) as (srv, img, pki):
            async with connected(srv.endpoint, pki, VIEWER) as c:
                viewer = token(c)
                operator = await open_session(c, OPERATOR)
                assert viewer != operator
                vb, limit = c.get_node(nid(c, "VirtualBattery")), c.get_node(nid(c, "VirtualBattery.main_limit_w"))
                method = nid(c, "VirtualBattery.SetMainSupplyLimit")
                soc = c.get_node(nid(c, "VirtualBattery.soc"))

                async def as_viewer_refused():
                    use(c, viewer)
                    assert await status(vb.call_method(method, D(1500.0))) == ua.StatusCodes.BadUserAccessDenied
                    assert await status(limit.write_value(ua.DataValue(D(1600.0)))) == \
                        ua.StatusCodes.BadUserAccessDenied
                    assert await soc.read_value() == pytest.approx(25.0)  # but it reads
                    assert drain(img) == []  # and nothing reached the scan

                # the viewer session was opened first, the operator session last: interleaved,
                # each request keeps the role of its own session
                await as_viewer_refused()
                use(c, operator)
                await vb.call_method(method, D(1500.0))
                await limit.write_value(ua.DataValue(D(1600.0)))
                assert drain(img) == [(Op.SET_MAIN_LIMIT, -1, 1500.0, 0), (Op.SET_MAIN_LIMIT, -1, 1600.0, 0)]
                await as_viewer_refused()

                # closing the viewer session leaves the operator session working
                await close_session(c, viewer)
                use(c, operator)
                assert await soc.read_value() == pytest.approx(25.0)
                await vb.call_method(method, D(1700.0))
                assert drain(img) == [(Op.SET_MAIN_LIMIT, -1, 1700.0, 0)]
                use(c, viewer)
                assert await status(soc.read_value()) == ua.StatusCodes.BadSessionIdInvalid

                # and the other way round
                viewer = await open_session(c, VIEWER)
                await close_session(c, operator)
                use(c, viewer)
                assert await soc.read_value() == pytest.approx(25.0)
                assert await status(vb.call_method(method, D(1800.0))) == ua.StatusCodes.BadUserAccessDenied
                use(c, operator)
                assert await status(soc.read_value()) == ua.StatusCodes.BadSessionIdInvalid
                assert await status(vb.call_method(method, D(1800.0))) == ua.StatusCodes.BadSessionIdInvalid
                assert drain(img) == []
                use(c, viewer)
    run(body())


def test_a_session_of_another_channel_is_refused(tmp_path):
    """The server checks that the token names a session of the channel the request came on."""
    async def body():
        async with served(tmp_path) as (srv, img, pki):
            async with connected(srv.endpoint, pki, OPERATOR) as op, connected(srv.endpoint, pki, VIEWER) as v:
                mine = token(v)
                use(v, token(op))  # the operator's token, on the viewer's channel
                vb = v.get_node(nid(v, "VirtualBattery"))
                got = await status(vb.call_method(nid(v, "VirtualBattery.SetMainSupplyLimit"), D(1500.0)))
                assert got == ua.StatusCodes.BadSessionIdInvalid
                assert await status(v.get_node(nid(v, "VirtualBattery.soc")).read_value()) == \
                    ua.StatusCodes.BadSessionIdInvalid
                assert drain(img) == []
                use(v, mine)
                assert await v.get_node(nid(v, "VirtualBattery.soc")).read_value() == pytest.approx(25.0)
                await op.get_node(nid(op, "VirtualBattery")).call_method(
                    nid(op, "VirtualBattery.SetMainSupplyLimit"), D(1500.0))  # the operator's own channel
                assert drain(img) == [(Op.SET_MAIN_LIMIT, -1, 1500.0, 0)]
    run(body())


def test_sessions_per_channel_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(ChannelProcessor, "max_sessions", 2)

    async def body():
        async with served(tmp_path) as (srv, img, pki):
            async with connected(srv.endpoint, pki, VIEWER) as c:
                first = token(c)
                second = await open_session(c, OPERATOR)
                with pytest.raises(UaStatusCodeError) as e:
                    await c.create_session()
                assert e.value.code == ua.StatusCodes.BadTooManySessions
                await close_session(c, second)  # a closed session frees its place
                use(c, first)
                third = await open_session(c, OPERATOR)
                assert await c.get_node(nid(c, "VirtualBattery.soc")).read_value() == pytest.approx(25.0)
                use(c, first)
                assert await c.get_node(nid(c, "VirtualBattery.soc")).read_value() == pytest.approx(25.0)
                assert third not in (first, second)
    run(body())


@pytest.mark.parametrize("case", ["untrusted_certificate", "wrong_password"])
def test_a_refused_session_is_not_kept(tmp_path, case):
    """A session refused at CreateSession (certificate) or ActivateSession (user) leaves no session behind."""
    async def body():
        async with served(tmp_path) as (srv, img, pki):
            user = (OPERATOR[0], "not-the-password") if case == "wrong_password" else OPERATOR
            with pytest.raises(Exception) as e:
                async with connected(srv.endpoint, pki, user, untrusted=case == "untrusted_certificate"):
                    pass
            assert "BadCertificateUntrusted" in repr(e.value) or "BadUserAccessDenied" in repr(e.value), repr(e.value)
            registry = srv.server.iserver._external_sessions  # sessions a client could still activate
            assert await wait_for(lambda: not registry, 30), registry
    run(body())


class Values:
    def __init__(self, got: list):
        self.got = got

    def datachange_notification(self, node, val, data):
        self.got.append(val)


@contextlib.asynccontextmanager
async def bare_channel(endpoint: str, pki, user=None):
    """A secure channel (and a session of `user`) without asyncua's supervisor: its automatic
    reconnect and stale-subscription watchdog would take a moved session back on their own."""
    from vbatt.opcua_models.model import NS_URI

    from test_opcua_support import client

    c = client(endpoint, pki, None)
    pol, cert, key = c._pending_security
    await c.set_security(pol, cert, key, mode=ua.MessageSecurityMode.SignAndEncrypt)
    await c.connect_socket()
    try:
        await c.send_hello()
        await c.open_secure_channel()
        if user:
            await c.create_session()
            await c.activate_session(*user)
            c.vbatt_ns = await c.get_namespace_index(NS_URI)
        yield c
    finally:
        with contextlib.suppress(Exception):
            await c.uaclient.session.close_session(True)  # also ends its publish loop
        with contextlib.suppress(Exception):
            await c.close_secure_channel()
        c.disconnect_socket()


def test_a_session_moves_to_a_new_channel_only_with_its_signature_and_user(tmp_path):
    """Part 4, 6.7: ActivateSession on a new channel with the token of a session takes that session over
    (after the user is checked again); the old channel can no longer use it, and a refused attempt
    changes nothing (its subscriptions stay with the channel that has the session)."""
    async def body():
        async with served(tmp_path) as (srv, img, pki):
            async with bare_channel(srv.endpoint, pki, OPERATOR) as old, bare_channel(srv.endpoint, pki) as new:
                tok = token(old)
                soc = lambda c: c.get_node(nid(old, "VirtualBattery.soc")).read_value()  # noqa: E731
                new._policy_ids = old._policy_ids
                use(new, tok)
                # before: the token is not a session of the new channel
                assert await status(soc(new)) == ua.StatusCodes.BadSessionIdInvalid
                got = []
                sub = await old.create_subscription(50, Values(got))
                await sub.subscribe_data_change(old.get_node(nid(old, "rack-3.battery_w")))
                assert await wait_for(lambda: got, 30)
                new._server_nonce = old._server_nonce
                with pytest.raises(UaStatusCodeError) as e:
                    await new.activate_session(OPERATOR[0], "wrong-password")
                assert e.value.code == ua.StatusCodes.BadUserAccessDenied
                assert await status(soc(new)) == ua.StatusCodes.BadSessionIdInvalid
                assert await soc(old) == pytest.approx(25.0)  # refused: still the old channel's session
                img.node["battery_w"][3] = 123.0
                img.publish()
                await srv.update()
                assert await wait_for(lambda: got and got[-1] == 123.0, 30)  # and its subscription
                new._server_nonce = old._server_nonce
                await new.activate_session(*OPERATOR)
                assert await soc(new) == pytest.approx(25.0)
                await new.get_node(nid(old, "VirtualBattery")).call_method(
                    nid(old, "VirtualBattery.SetMainSupplyLimit"), D(1500.0))
                assert drain(img) == [(Op.SET_MAIN_LIMIT, -1, 1500.0, 0)]
                assert await status(soc(old)) == ua.StatusCodes.BadSessionIdInvalid  # moved away
    run(body())

NODE_SCRIPT = Path(__file__).with_name("opcua_two_sessions.js")


@pytest.mark.slow
def test_node_opcua_viewer_and_operator_sessions_on_one_channel(tmp_path, node_opcua):  # noqa: F811
    """`vbatt run` (real scan) and node-opcua: a viewer and an operator session on one SignAndEncrypt channel."""
    port = free_port()
    state = tmp_path / "state"
    users = UserStore(state / "users.json")
    users.add(VIEWER[0], "viewer", VIEWER[1])
    users.add(OPERATOR[0], "operator", OPERATOR[1])
    der, pem = make_certificate("sessions client", "urn:vbatt:test:client", server=False)
    (tmp_path / "client.der").write_bytes(der)
    (tmp_path / "client.pem").write_bytes(pem)
    TrustList(state).add(der, "sessions-client")
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(CONFIG.format(port=port, state=state))
    err = open(tmp_path / "stderr.txt", "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vbatt.cli.main", "run", str(cfg), "--duration", "600", "-q"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err, text=True, env=env)
    try:
        _wait_port(port, proc, 120)
        script = node_opcua / NODE_SCRIPT.name
        shutil.copy(NODE_SCRIPT, script)  # beside node_modules, where require() finds node-opcua
        pkidir = tmp_path / "node-pki"
        (pkidir / "trusted" / "certs").mkdir(parents=True)
        shutil.copy(cert_paths(state)[0], pkidir / "trusted" / "certs" / "vbatt-server.der")
        r = subprocess.run(["node", str(script), f"opc.tcp://127.0.0.1:{port}/", str(tmp_path / "client.der"),
                            str(tmp_path / "client.pem"), *VIEWER, *OPERATOR,
                            "http://vbatt.org/UA/VirtualBattery/", str(pkidir)],
                           cwd=node_opcua, capture_output=True, text=True, timeout=300)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        assert lines, (r.stdout[-2000:], r.stderr[-2000:])
        out = json.loads(lines[-1])
        assert "error" not in out, out
        assert out["distinctSessions"] and out["oneChannel"], out
        # the operator session: Good, and the scan applies it
        assert out["limit0"] is True, out
        assert (out["opCall"], out["opCallApplied"]) == ("Good", True), out
        # the viewer session on the same channel, opened first: refused, and nothing changed
        assert out["viewerCall"] == "BadUserAccessDenied", out
        assert out["viewerWrite"] == "BadUserAccessDenied", out
        assert out["viewerSetPriority"] == "BadUserAccessDenied", out
        assert (out["opSetPriority"], out["barrier"]) == ("Good", True), out
        assert out["limitAfterViewer"] == 4321.0, out
        assert out["viewerSoc"] == "Good" and out["bothDeliver"], out
        # closing the viewer session leaves the operator session working (reads, calls, publishing)
        assert out["opReadAfterViewerClosed"] == "Good", out
        assert (out["opCallAfterViewerClosed"], out["opCallAfterViewerClosedApplied"]) == ("Good", True), out
        assert out["opDeliversAfterViewerClosed"], out
        # and closing the operator session leaves a viewer session working, still as a viewer
        assert out["viewerReadAfterOpClosed"] == "Good", out
        assert out["viewerDeliversAfterOpClosed"], out
        assert out["viewerCallAfterOpClosed"] == "BadUserAccessDenied", out
        assert out["limitEnd"] == 4400.0, out
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        err.close()
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
