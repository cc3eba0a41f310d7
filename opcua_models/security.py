"""Security of the OPC UA server: certificates, the client trust list, users with roles.

Layout of the state directory (never committed; default ``./var/opcua``)::

    pki/own/cert.der, pki/own/key.pem   the server's application instance certificate
    pki/trusted/*.der|*.pem             client certificates (or their CAs) that may connect
    pki/rejected/                       certificates that were refused, to be moved to trusted/
    users.json                          name -> role and scrypt hash (0600, no plaintext)

Roles: ``viewer`` reads, browses, subscribes and refreshes alarms; ``operator`` also
writes operator variables and calls methods. There is no administrator role: the
address space cannot be changed by any client.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from asyncua import ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import USER_TYPES, PermissionRuleset, User, UserRole
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "ROLES",
    "UserStore",
    "UserError",
    "VbattUser",
    "TrustList",
    "RoleRuleset",
    "VbattUserManager",
    "ensure_server_certificate",
    "make_certificate",
    "cert_paths",
]

log = logging.getLogger("vbatt.opcua.security")
ROLES = ("viewer", "operator")
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
# scrypt cost: ~50 ms and 16 MiB per check on these machines; slows guessing, not operators
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class UserError(ValueError):
    """A user name, role or password that cannot be accepted (the message says why)."""


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# -- users ---------------------------------------------------------------------------------
class UserStore:
    """Users in a JSON file: name -> role, scrypt salt and hash. Passwords are never stored."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text(encoding="utf-8"))
        return data.get("users", {})

    def _save(self, users: dict[str, dict]) -> None:
        _write_private(self.path, (json.dumps({"users": users}, indent=1, sort_keys=True) + "\n").encode())

    @staticmethod
    def _hash(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
        return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32, maxmem=64 * 2**20)

    def add(self, name: str, role: str, password: str, *, replace: bool = False) -> None:
        if not _NAME.match(name or ""):
            raise UserError(f"user name {name!r}: 1..64 characters of A-Z a-z 0-9 _ . @ -")
        if role not in ROLES:
            raise UserError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        if len(password) < 8:
            raise UserError("password: at least 8 characters")
        users = self.load()
        if name in users and not replace:
            raise UserError(f"user {name!r} exists (use --replace to set a new password or role)")
        salt = secrets.token_bytes(16)
        users[name] = {"role": role, "scrypt": {**_SCRYPT, "salt": salt.hex()},
                       "hash": self._hash(password, salt, **_SCRYPT).hex()}
        self._save(users)

    def remove(self, name: str) -> None:
        users = self.load()
        if name not in users:
            raise UserError(f"no user {name!r}")
        del users[name]
        self._save(users)

    def verify(self, name: str | None, password: str | None) -> str | None:
        """The user's role when the password matches, else None (same work either way)."""
        users = self.load()
        rec = users.get(name or "")
        params = rec["scrypt"] if rec else {**_SCRYPT, "salt": "00" * 16}
        got = self._hash(password or "", bytes.fromhex(params["salt"]), params["n"], params["r"], params["p"])
        want = bytes.fromhex(rec["hash"]) if rec else secrets.token_bytes(32)
        return rec["role"] if hmac.compare_digest(got, want) and rec else None


# -- certificates ------------------------------------------------------------------------------
def cert_paths(state: Path) -> tuple[Path, Path]:
    return state / "pki" / "own" / "cert.der", state / "pki" / "own" / "key.pem"


def make_certificate(common_name: str, app_uri: str, *, server: bool, days: int = 3650,
                     hostnames: tuple[str, ...] | None = None) -> tuple[bytes, bytes]:
    """A self-signed application instance certificate (DER) and its key (PEM), as OPC UA Part 6 wants."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    hostnames = hostnames or tuple(dict.fromkeys(("localhost", socket.gethostname())))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vbatt")])
    now = dt.datetime.now(dt.timezone.utc)
    import ipaddress

    san = [x509.UniformResourceIdentifier(app_uri)] + [x509.DNSName(h) for h in hostnames]
    san.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    eku = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                         data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.DER), pem


def ensure_server_certificate(state: Path, app_uri: str) -> tuple[Path, Path, bool]:
    """Create the server certificate when missing; returns (cert, key, created)."""
    cert, key = cert_paths(state)
    if cert.exists() and key.exists():
        return cert, key, False
    host = socket.gethostname()
    der, pem = make_certificate(f"vbatt OPC UA server@{host}", app_uri, server=True,
                                hostnames=tuple(dict.fromkeys(("localhost", host))))
    _write_private(key, pem)
    cert.write_bytes(der)
    for sub in ("trusted", "rejected"):
        (state / "pki" / sub).mkdir(parents=True, exist_ok=True)
    log.warning("created the OPC UA server certificate %s", cert)
    return cert, key, True


# -- trust list ----------------------------------------------------------------------------------
def _load_any(data: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----") else \
        x509.load_der_x509_certificate(data)


class TrustList:
    """Client certificates allowed to connect: exact certificates, or certificates issued by a trusted CA.

    Re-read on every check (a few files), so that moving a certificate from
    rejected/ to trusted/ takes effect without a restart.
    """

    def __init__(self, state: Path):
        self.trusted = state / "pki" / "trusted"
        self.rejected = state / "pki" / "rejected"

    def _certs(self) -> list[x509.Certificate]:
        out = []
        if self.trusted.is_dir():
            for p in sorted(self.trusted.iterdir()):
                if p.suffix.lower() in (".der", ".pem", ".crt", ".cer"):
                    try:
                        out.append(_load_any(p.read_bytes()))
                    except ValueError:
                        log.error("trust list: %s is not a certificate (ignored)", p)
        return out

    def add(self, data: bytes, name: str | None = None) -> Path:
        cert = _load_any(data)
        fp = cert.fingerprint(hashes.SHA256()).hex()[:16]
        self.trusted.mkdir(parents=True, exist_ok=True)
        target = self.trusted / f"{name or fp}.der"
        target.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        return target

    def check(self, cert: x509.Certificate) -> int:
        """0 when trusted, else the Bad status code that says why."""
        now = dt.datetime.now(dt.timezone.utc)
        if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
            return ua.StatusCodes.BadCertificateTimeInvalid
        der = cert.public_bytes(serialization.Encoding.DER)
        for t in self._certs():
            if t.public_bytes(serialization.Encoding.DER) == der:
                return 0
            try:
                bc = t.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                continue
            if bc.ca and cert.issuer == t.subject:
                try:
                    cert.verify_directly_issued_by(t)
                    return 0
                except (ValueError, TypeError, Exception):  # noqa: BLE001 - any failure = not issued by it
                    continue
        self._reject(cert, der)
        return ua.StatusCodes.BadCertificateUntrusted

    def _reject(self, cert: x509.Certificate, der: bytes) -> None:
        try:
            cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            label = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(cn[0].value) if cn else "client")[:40]
            self.rejected.mkdir(parents=True, exist_ok=True)
            (self.rejected / f"{label}-{cert.fingerprint(hashes.SHA256()).hex()[:16]}.der").write_bytes(der)
        except OSError:
            pass
        log.warning("refused an untrusted client certificate (saved to %s; move it to %s to trust it)",
                    self.rejected, self.trusted)

    async def validate(self, cert: x509.Certificate, app_description: ua.ApplicationDescription) -> None:
        """asyncua certificate validator (CreateSession): raises the Bad status."""
        code = self.check(cert)
        if code:
            raise ServiceError(code)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        if app_description.ApplicationUri not in uris:
            log.warning("client ApplicationUri %r is not in its certificate (%s)", app_description.ApplicationUri, uris)
            raise ServiceError(ua.StatusCodes.BadCertificateUriInvalid)


# -- sessions and permissions ------------------------------------------------------------------------
@dataclass
class VbattUser(User):
    vrole: str = "viewer"


_READ_TYPES = {ua.NodeId(t) for t in USER_TYPES} - {
    ua.NodeId(ua.ObjectIds.WriteRequest_Encoding_DefaultBinary),
    ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary),
}
_OPERATOR_TYPES = {ua.NodeId(t) for t in USER_TYPES}
_CALL = ua.NodeId(ua.ObjectIds.CallRequest_Encoding_DefaultBinary)
_REFRESH = {ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh),
            ua.NodeId(ua.ObjectIds.ConditionType_ConditionRefresh2)}


class RoleRuleset(PermissionRuleset):
    """Per request type: viewers read (and may refresh alarm conditions); operators also write and call."""

    def check_validity(self, user, action_type_id, body) -> bool:
        role = getattr(user, "vrole", None)
        if role == "operator":
            return action_type_id in _OPERATOR_TYPES
        if role == "viewer":
            if action_type_id in _READ_TYPES:
                return True
            if action_type_id == _CALL:  # ConditionRefresh only: a viewer must see the active alarms
                from asyncua.ua.ua_binary import struct_from_binary

                params = struct_from_binary(ua.CallParameters, body.copy())
                return all(m.MethodId in _REFRESH for m in params.MethodsToCall)
        return False


class VbattUserManager:
    """Username/password against `UserStore`; the secure channel's certificate against the trust list."""

    def __init__(self, users: UserStore, trust: TrustList, allow_anonymous: bool, require_cert: bool = True):
        self.users, self.trust, self.allow_anonymous = users, trust, allow_anonymous
        self.require_cert = require_cert  # False only when the config offers a None endpoint

    def get_user(self, iserver, username: str | None = None, password: str | None = None,
                 certificate=None) -> User | None:
        # CreateSession checks the certificate the client names; this checks the one that
        # actually secures the channel, so a client cannot leave it out.
        if not certificate and self.require_cert:
            log.warning("session refused: no client certificate on a secured endpoint")
            return None
        if certificate:
            cert = x509.load_der_x509_certificate(certificate) if isinstance(certificate, bytes) else certificate
            if self.trust.check(cert):
                return None
        if username is None:
            return VbattUser(role=UserRole.User, name="anonymous", vrole="viewer") if self.allow_anonymous else None
        role = self.users.verify(username, password)
        if role is None:
            log.warning("session refused: wrong user name or password for %r", username)
            return None
        return VbattUser(role=UserRole.User, name=username, vrole=role)
