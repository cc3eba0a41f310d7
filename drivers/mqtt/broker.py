"""A Mosquitto broker of our own: found or installed, configured secure, started on a free port.

`vbatt`'s tests, `make` and the MQTT benchmark start their own broker process (never a system
service): `Broker(dir, users=..., acl=...)` writes a config with a TLS listener (a CA and a server
certificate from drivers/certs.py), a password file (PBKDF2-SHA512, Mosquitto 2's `$7$` format,
written here: no `mosquitto_passwd` needed) and an ACL file, then starts `mosquitto -c` and waits
until the port accepts. A plaintext listener exists only when asked for, and only on loopback.

Where the binary comes from (`find_mosquitto`, said on stderr when it installs):
1. `$VBATT_MOSQUITTO`, else `mosquitto` on PATH or in /usr/sbin (the Debian package installed);
2. `.venv/mosquitto/` of this checkout (a previous install of ours);
3. else the Debian package and the libraries it lacks, fetched with `apt-get download` and
   unpacked with `dpkg -x` into `.venv/mosquitto/` (run with LD_LIBRARY_PATH). No root is needed
   and nothing is started: `apt-get install mosquitto` would also enable and start a system
   daemon on port 1883, which a test run must not leave behind. As root, `apt-get update` is run
   once when the package lists do not know the package yet.

`python -m vbatt.drivers.mqtt.broker` finds or installs it and prints the path (`make mosquitto`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vbatt.kernel.ports import free_port

__all__ = ["MosquittoMissing", "find_mosquitto", "password_hash", "Broker", "User", "LOOPBACK"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
_REPO = Path(__file__).resolve().parents[2]
LOCAL = _REPO / ".venv" / "mosquitto"  # where our own unpacked copy lives
_LIBS = "usr/lib/x86_64-linux-gnu"


class MosquittoMissing(RuntimeError):
    """No broker binary, and none could be installed (the message says what was tried)."""


def _say(msg: str) -> None:
    print(f"vbatt mosquitto: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Mosquitto:
    """The broker binary and the environment it needs (LD_LIBRARY_PATH for an unpacked copy)."""

    path: Path
    env: dict[str, str] = field(default_factory=dict)

    def version(self) -> str:
        r = subprocess.run([str(self.path), "-h"], capture_output=True, text=True, env={**os.environ, **self.env},
                           timeout=10)
        first = (r.stdout or r.stderr).splitlines()
        return first[0] if first else "?"


def _local(root: Path) -> Mosquitto | None:
    exe = root / "usr/sbin/mosquitto"
    if not exe.is_file():
        return None
    return Mosquitto(exe, {"LD_LIBRARY_PATH": f"{root / _LIBS}:{root / 'usr/lib'}"})


def _installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


def _library_deps(pkg: str) -> list[str]:
    """The library packages `pkg` depends on (first alternative of each), from apt's lists."""
    r = subprocess.run(["apt-cache", "depends", "--no-recommends", "--no-suggests", pkg], capture_output=True,
                       text=True)
    out = []
    for line in r.stdout.splitlines():
        line = line.strip()
        if line.startswith("Depends:"):
            name = line.split(":", 1)[1].strip().strip("<>")
            if name.startswith("lib"):
                out.append(name.split(":")[0])
    return out


def _unpack(root: Path) -> Mosquitto:
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise MosquittoMissing("no mosquitto on PATH and no apt-get/dpkg to fetch it: install Mosquitto 2 "
                               "(e.g. the Debian/Ubuntu package 'mosquitto') or set VBATT_MOSQUITTO=/path/to/mosquitto")
    known = subprocess.run(["apt-cache", "show", "mosquitto"], capture_output=True).returncode == 0
    if not known and os.geteuid() == 0:
        _say("apt-get update (the package lists do not know mosquitto yet)")
        subprocess.run(["apt-get", "update", "-qq"], check=False, timeout=600)
    pkgs = ["mosquitto"] + [p for p in _library_deps("mosquitto") if not _installed(p)]
    debs = root / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    _say(f"not found on this machine: fetching the Debian package(s) {', '.join(pkgs)} with apt-get download "
         f"and unpacking them into {root} (no root needed, no system service started)")
    r = subprocess.run(["apt-get", "download", *pkgs], cwd=debs, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise MosquittoMissing(f"apt-get download {' '.join(pkgs)} failed: {r.stderr.strip()[-500:]}; install "
                               f"Mosquitto 2 or set VBATT_MOSQUITTO")
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, timeout=120)
    got = _local(root)
    if got is None:
        raise MosquittoMissing(f"unpacked {pkgs} into {root} but found no usr/sbin/mosquitto there")
    _say(f"installed {got.version()} at {got.path}")
    return got


def find_mosquitto(install: bool = True, root: Path = LOCAL) -> Mosquitto:
    """The broker binary: $VBATT_MOSQUITTO, PATH, /usr/sbin, our unpacked copy, else install it (see above)."""
    env = os.environ.get("VBATT_MOSQUITTO")
    if env:
        if not Path(env).is_file():
            raise MosquittoMissing(f"VBATT_MOSQUITTO={env}: no such file")
        return Mosquitto(Path(env))
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if cand and Path(cand).is_file():
            return Mosquitto(Path(cand))
    got = _local(root)
    if got is not None:
        return got
    if not install:
        raise MosquittoMissing("mosquitto not found (PATH, /usr/sbin, .venv/mosquitto)")
    return _unpack(root)


# -- credentials -------------------------------------------------------------------------------------------
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd of Mosquitto 2.0 writes


def password_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A password-file entry's hash in Mosquitto 2's format: $7$<iterations>$<salt b64>$<PBKDF2-SHA512 b64>."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@dataclass(frozen=True)
class User:
    """A broker account and what it may do: ACL lines `topic read|write|readwrite FILTER`."""

    name: str
    password: str
    acl: tuple[str, ...] = ()


def sparkplug_acl(role: str, group: str = "+", host_id: str = "+") -> tuple[str, ...]:
    """The ACL of a Sparkplug role. An edge node's MQTT user name is its edge node id (`%u`), so that it
    may publish only its own births, data and deaths and read only its own commands; only a host
    application may publish commands (NCMD/DCMD) and its STATE."""
    if role == "host":
        # vbatt/host/<host_id>/#: its processes' liveness, when it runs as several (docs/mqtt.md)
        return (f"topic readwrite spBv1.0/{group}/#", f"topic readwrite spBv1.0/STATE/{host_id}",
                "topic read spBv1.0/STATE/#", f"topic readwrite vbatt/host/{host_id}/#")
    if role == "edge":
        msgs = ("NBIRTH", "NDATA", "NDEATH", "DBIRTH", "DDATA", "DDEATH")
        return (*(f"pattern write spBv1.0/{group}/{m}/%u" for m in msgs),
                *(f"pattern write spBv1.0/{group}/{m}/%u/+" for m in msgs if m[0] == "D"),
                f"pattern read spBv1.0/{group}/NCMD/%u", f"pattern read spBv1.0/{group}/DCMD/%u/+",
                "topic read spBv1.0/STATE/#")
    raise ValueError(f"role {role!r}: expected host or edge")


class Broker:
    """One Mosquitto process with a generated config in `directory` (see the module docstring).

    tls: (ca.pem, server.pem, server.key) of the TLS listener; None: make a CA and a server certificate
    for 127.0.0.1/localhost in `directory/pki` with drivers/certs.py.
    plaintext: also open a plaintext listener (loopback only) — `plain_port`.
    """

    def __init__(self, directory: str | Path, users: list[User], *, host: str = "127.0.0.1", port: int = 0,
                 tls: tuple[Path, Path, Path] | None = None, plaintext: bool = False, plain_port: int = 0,
                 mosquitto: Mosquitto | None = None, max_queued: int = 100_000):
        if plaintext and host not in LOOPBACK:
            raise ValueError(f"a plaintext listener is allowed on loopback only, not on {host!r}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.users = list(users)
        self.host = host
        self.port = port or free_port(host)
        self.plain_port = (plain_port or free_port(host)) if plaintext else 0
        self.mosquitto = mosquitto or find_mosquitto()
        self.max_queued = max_queued
        if tls is None:
            from vbatt.drivers.certs import create_ca, issue

            pki = self.dir / "pki"
            ca = create_ca(pki, "vbatt MQTT CA")
            srv = issue(ca, pki, "broker", ("127.0.0.1", "localhost"))
            tls = (ca.cert, srv.cert, srv.key)
        self.ca, self.cert, self.key = (Path(p) for p in tls)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "mosquitto.log"
        self.conf = self._write()

    def _write(self) -> Path:
        pw = self.dir / "passwd"
        pw.write_text("".join(f"{u.name}:{password_hash(u.password)}\n" for u in self.users))
        pw.chmod(0o600)
        acl = self.dir / "acl"
        lines = []
        patterns = set()
        for u in self.users:
            lines.append(f"user {u.name}")
            for a in u.acl:
                if a.startswith("pattern "):
                    patterns.add(a)  # patterns apply to every user: grouped at the end, once
                else:
                    lines.append(a)
            lines.append("")
        acl.write_text("\n".join(lines + sorted(patterns)) + "\n")
        try:
            import pwd

            me = pwd.getpwuid(os.geteuid()).pw_name
        except (ImportError, KeyError):
            me = "root"
        conf = [
            f"# written by vbatt (drivers/mqtt/broker.py); {self.mosquitto.path}",
            f"user {me}",  # run as root, Mosquitto would switch to 'mosquitto' and lose our 0600 key
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {pw}",
            f"acl_file {acl}",
            "persistence false",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
            f"max_queued_messages {self.max_queued}",
            "max_inflight_messages 0",
            "",
            f"listener {self.port} {self.host}",
            f"cafile {self.ca}",
            f"certfile {self.cert}",
            f"keyfile {self.key}",
            "tls_version tlsv1.2",
            "require_certificate false",
        ]
        if self.plain_port:
            conf += ["", f"listener {self.plain_port} {self.host}"]
        path = self.dir / "mosquitto.conf"
        path.write_text("\n".join(conf) + "\n")
        return path

    def add_user(self, user: User) -> None:
        """A new account (takes effect at the next start or `reload()`)."""
        self.users.append(user)
        self.conf = self._write()

    def start(self, timeout_s: float = 15.0) -> "Broker":
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen([str(self.mosquitto.path), "-c", str(self.conf)],
                                     env={**os.environ, **self.mosquitto.env}, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        ports = [p for p in (self.port, self.plain_port) if p]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                self.proc = None
                raise RuntimeError(f"mosquitto exited at start: {err.strip()} {log.strip()}")
            if all(_accepts(self.host, p) for p in ports):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{ports} within {timeout_s} s")

    def reload(self) -> None:
        """Re-read the password and ACL files (SIGHUP)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if p.stderr:
            p.stderr.close()

    def kill(self) -> None:
        """Die at once (SIGKILL): no will messages are sent, no goodbye."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def main() -> int:
    try:
        m = find_mosquitto()
    except MosquittoMissing as exc:
        _say(str(exc))
        return 1
    print(f"{m.path} ({m.version()})" + (f" LD_LIBRARY_PATH={m.env['LD_LIBRARY_PATH']}" if m.env else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
