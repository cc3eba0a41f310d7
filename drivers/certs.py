"""Certificates for Modbus/TCP Security: a CA, and certificates it signs for a controller and for nodes.

`vbatt certs DIR --fleet N` writes `ca.pem`/`ca.key`, `controller.pem`/`.key`
and `node-<i>.pem`/`.key`. Both ends authenticate each other (mutual TLS,
TLS 1.2 or newer): a node accepts only clients whose certificate the CA
signed, and the controller accepts only nodes the CA signed. Private keys are
written mode 0600. Modbus/TCP Security also puts a role in an X.509 extension;
we rely on the CA alone (any certificate it signed is trusted) and say so.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Issued", "create_ca", "issue", "make_fleet_certs", "server_context", "client_context"]

_DEFAULT_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write_key(path: Path, key) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vbatt"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def create_ca(directory: str | Path, name: str = "vbatt CA", days: int = 3650) -> Issued:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    out = Issued(d / "ca.pem", d / "ca.key")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out.key, key)
    return out


def issue(ca: Issued, directory: str | Path, name: str, hosts: tuple[str, ...] = _DEFAULT_HOSTS,
          days: int = 825) -> Issued:
    """A certificate for `name` signed by `ca`, valid as TLS server and client, for `hosts` (IPs or DNS names)."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = Issued(d / f"{name}.pem", d / f"{name}.key")
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out.key, key)
    return out


def make_fleet_certs(directory: str | Path, nodes: int, hosts: tuple[str, ...] = _DEFAULT_HOSTS) -> dict[str, Issued]:
    """CA + `controller` + `node-0..N-1` in `directory`; returns them by name (`ca` included)."""
    ca = create_ca(directory)
    out = {"ca": ca, "controller": issue(ca, directory, "controller", hosts)}
    for i in range(nodes):
        out[f"node-{i}"] = issue(ca, directory, f"node-{i}", hosts)
    return out


def _ctx(purpose, ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    for p in (ca, cert, key):
        if not Path(p).is_file():
            raise FileNotFoundError(f"TLS file not found: {p}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose == "server" else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: the server demands the client's certificate too
    # ssl's own errors ("[X509: NO_CERTIFICATE_OR_CRL_FOUND] ...") do not say which file is wrong
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{ca}: not a CA certificate ({getattr(exc, 'reason', None) or exc}); "
                         f"expected a PEM file") from None
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        raise ValueError(f"{cert} with key {key}: not a certificate and its private key "
                         f"({exc.reason or exc}); expected PEM files") from None
    return ctx


def server_context(ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    return _ctx("server", ca, cert, key)


def client_context(ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    ctx = _ctx("client", ca, cert, key)
    ctx.check_hostname = True
    return ctx
