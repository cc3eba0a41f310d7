"""`vbatt certs` and Modbus/TCP Security (mutual TLS) between a real agent and the driver on 127.0.0.1."""

from __future__ import annotations

import asyncio
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from test_modbus_support import endpoint, poll_for, poller, serving
from vbatt.drivers.certs import client_context, create_ca, issue, make_fleet_certs, server_context
from vbatt.drivers.faults import Fault
from vbatt.drivers.modbus.driver import contexts_for
from vbatt.drivers.modbus.config import TlsFiles

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    good = tmp_path_factory.mktemp("pki")
    certs = make_fleet_certs(good, 1)
    rogue_dir = tmp_path_factory.mktemp("rogue")
    rogue_ca = create_ca(rogue_dir, "rogue CA")
    rogue = issue(rogue_ca, rogue_dir, "controller")
    return certs, rogue_ca, rogue


def _poll_tls(node_ctx, client_ctx, want: int, seconds: float = 0.6):
    """Poll until the node's fault is `want` (and, for 0, three requests went through), for 30 s at most:
    on a loaded machine a handshake can outlast a short window, and until it ends the node is only "not
    connected"."""
    async def body():
        async with serving(sslctx=node_ctx) as agents:
            p = poller([endpoint(agents.ports[0], "A", plaintext=False)], contexts=[client_ctx], timeout_ms=300)
            for _ in range(int(30 / seconds)):
                await poll_for(p, seconds)
                _, faults, reasons = p.decode()
                if int(faults[0]) == want and (want != 0 or p.requests[0] >= 3):
                    break
            await p.close()
            return int(faults[0]), reasons[0], int(p.requests[0])

    return asyncio.run(body())


def test_certificates_are_signed_by_the_ca_for_loopback(pki):
    certs, _, _ = pki
    ca = x509.load_pem_x509_certificate(certs["ca"].cert.read_bytes())
    node = x509.load_pem_x509_certificate(certs["node-0"].cert.read_bytes())
    assert node.issuer == ca.subject
    node.verify_directly_issued_by(ca)
    sans = node.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert stat.S_IMODE(certs["node-0"].key.stat().st_mode) == 0o600


def test_mutual_tls_with_the_right_certificates_polls(pki):
    certs, _, _ = pki
    c, n = certs["controller"], certs["node-0"]
    node_ctx = server_context(certs["ca"].cert, n.cert, n.key)
    assert node_ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    fault, reason, requests = _poll_tls(node_ctx, client_context(certs["ca"].cert, c.cert, c.key), 0)
    assert fault == 0, reason
    assert requests >= 3


def test_controller_rejects_a_node_its_ca_did_not_sign(pki):
    certs, rogue_ca, rogue = pki
    node_ctx = server_context(rogue_ca.cert, rogue.cert, rogue.key)  # a rogue node
    c = certs["controller"]
    fault, reason, _ = _poll_tls(node_ctx, client_context(certs["ca"].cert, c.cert, c.key), Fault.TLS)
    assert fault == Fault.TLS, reason
    assert "TLS" in reason


def test_node_rejects_a_controller_its_ca_did_not_sign(pki):
    certs, rogue_ca, rogue = pki
    n = certs["node-0"]
    node_ctx = server_context(certs["ca"].cert, n.cert, n.key)
    # the rogue controller trusts the right CA but shows a certificate from its own
    fault, reason, _ = _poll_tls(node_ctx, client_context(certs["ca"].cert, rogue.cert, rogue.key), Fault.TLS)
    assert fault == Fault.TLS, reason


def test_missing_certificate_files_and_missing_security_are_tls_faults(pki, tmp_path):
    certs, _, _ = pki
    eps = [endpoint(1, "nofile", plaintext=False, tls=TlsFiles(ca=str(certs["ca"].cert), cert=str(tmp_path / "x.pem"),
                                                               key=str(tmp_path / "x.key"))),
           endpoint(1, "nothing", plaintext=False),
           endpoint(1, "plain", plaintext=True)]
    ctxs, bad = contexts_for(eps)
    assert bad[0].fault == Fault.TLS and "TLS file not found" in bad[0].reason
    assert bad[1].fault == Fault.TLS and "plaintext: true" in bad[1].reason
    assert 2 not in bad and ctxs[2] is None


def test_vbatt_certs_command(tmp_path):
    d = tmp_path / "pki"
    r = subprocess.run([sys.executable, "-m", "vbatt.cli", "certs", str(d), "--fleet", "3"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted(["ca.pem", "ca.key", "controller.pem", "controller.key"]
                           + [f"node-{i}.{e}" for i in range(3) for e in ("pem", "key")])
    again = subprocess.run([sys.executable, "-m", "vbatt.cli", "certs", str(d)], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 1 and "--force" in again.stderr
