"""`vbatt opcua-user`, `vbatt opcua-cert`, `vbatt opcua-trust`: accounts and certificates of the OPC UA server.

Every command takes the plant config (default: the embedded one) to find the
server's state directory (`opcua.state_dir`), or `--state-dir` directly.
"""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys
from pathlib import Path

__all__ = ["add_command"]


def _state(args) -> tuple[Path, object]:
    from vbatt.opcua_models.config import OpcuaServerConfig, state_dir

    if args.state_dir:
        return Path(args.state_dir), OpcuaServerConfig(state_dir=args.state_dir)
    from vbatt.config.plant import default_config_path, load_config

    cfg, _ = load_config(args.config or default_config_path())
    return state_dir(cfg.opcua), cfg.opcua


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="plant config naming opcua.state_dir (default: embedded)")
    p.add_argument("--state-dir", metavar="DIR", help="the server's state directory (overrides --config)")


def cmd_user(args) -> int:
    from vbatt.opcua_models.security import UserError, UserStore

    from vbatt.cli.main import EXIT_FAIL, EXIT_OK, EXIT_USAGE, err
    from vbatt.config.plant import ConfigError

    try:
        state, _ = _state(args)
    except ConfigError as exc:
        err.print("\n".join(exc.problems), markup=False)
        return EXIT_USAGE
    store = UserStore(state / "users.json")
    try:
        if args.action == "list":
            for name, rec in sorted(store.load().items()):
                print(f"{name}\t{rec['role']}")
            return EXIT_OK
        if not args.name:
            err.print("usage error: NAME is required for add and remove")
            return EXIT_USAGE
        if args.action == "remove":
            store.remove(args.name)
            print(f"removed {args.name}")
            return EXIT_OK
        shown = False
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        elif sys.stdin.isatty() and not args.generate:
            password = getpass.getpass(f"password for {args.name}: ")
            if getpass.getpass("again: ") != password:
                err.print("passwords differ; nothing changed")
                return EXIT_USAGE
        else:
            password, shown = secrets.token_urlsafe(12), True
        store.add(args.name, args.role, password, replace=args.replace)
    except UserError as exc:
        err.print(f"[bold red]error:[/] {exc}; nothing changed")
        return EXIT_USAGE
    except OSError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        return EXIT_FAIL
    print(f"user {args.name} ({args.role}) saved in {store.path}" + (f"; password: {password}" if shown else ""))
    return EXIT_OK


def cmd_cert(args) -> int:
    from vbatt.opcua_models.security import TrustList, ensure_server_certificate, make_certificate

    from vbatt.cli.main import EXIT_OK, EXIT_USAGE, err
    from vbatt.config.plant import ConfigError

    try:
        state, ocfg = _state(args)
    except ConfigError as exc:
        err.print("\n".join(exc.problems), markup=False)
        return EXIT_USAGE
    cert, key, created = ensure_server_certificate(state, ocfg.application_uri)
    print(f"server certificate {'created' if created else 'exists'}: {cert}")
    if args.client:
        out = Path(args.out or ".")
        out.mkdir(parents=True, exist_ok=True)
        uri = args.client_uri or f"urn:vbatt:client:{args.client}"
        der, pem = make_certificate(args.client, uri, server=False)
        (out / f"{args.client}.der").write_bytes(der)
        kp = out / f"{args.client}.key.pem"
        kp.touch(mode=0o600)
        kp.write_bytes(pem)
        trusted = TrustList(state).add(der, args.client)
        print(f"client certificate {out / (args.client + '.der')} (ApplicationUri {uri}), key {kp}; "
              f"trusted as {trusted}")
    return EXIT_OK


def cmd_trust(args) -> int:
    from vbatt.opcua_models.security import TrustList

    from vbatt.cli.main import EXIT_FAIL, EXIT_OK, EXIT_USAGE, err
    from vbatt.config.plant import ConfigError

    try:
        state, _ = _state(args)
        path = TrustList(state).add(Path(args.cert).read_bytes())
    except ConfigError as exc:
        err.print("\n".join(exc.problems), markup=False)
        return EXIT_USAGE
    except (OSError, ValueError) as exc:
        err.print(f"[bold red]error:[/] {args.cert}: {exc} (expected a DER or PEM X.509 certificate)")
        return EXIT_FAIL
    print(f"trusted: {path}")
    return EXIT_OK


def add_command(sub) -> None:
    u = sub.add_parser("opcua-user", help="manage OPC UA server users (roles viewer/operator)",
                       description="Add, remove or list users of the OPC UA server. Passwords are stored only "
                                   "as scrypt hashes; without a terminal or with --generate a random password "
                                   "is generated and printed once.")
    u.add_argument("action", choices=("add", "remove", "list"))
    u.add_argument("name", nargs="?")
    u.add_argument("--role", choices=("viewer", "operator"), default="viewer")
    u.add_argument("--password-stdin", action="store_true", help="read the password from stdin (one line)")
    u.add_argument("--generate", action="store_true", help="generate a random password and print it")
    u.add_argument("--replace", action="store_true", help="replace an existing user's password and role")
    _common(u)
    u.set_defaults(func=cmd_user)

    c = sub.add_parser("opcua-cert", help="create the OPC UA server certificate (and client certificates)",
                       description="Create the server's application instance certificate when missing; "
                                   "with --client NAME also a client certificate, added to the trust list.")
    c.add_argument("--client", metavar="NAME", help="also create a trusted client certificate NAME.der/.key.pem")
    c.add_argument("--client-uri", metavar="URI", help="the client's ApplicationUri (default urn:vbatt:client:NAME)")
    c.add_argument("--out", metavar="DIR", help="where to write the client certificate (default: .)")
    _common(c)
    c.set_defaults(func=cmd_cert)

    t = sub.add_parser("opcua-trust", help="trust a client certificate (DER or PEM)",
                       description="Add a client certificate (or the CA that issued client certificates) to the "
                                   "server's trust list.")
    t.add_argument("action", choices=("add",))
    t.add_argument("cert", help="certificate file")
    _common(t)
    t.set_defaults(func=cmd_trust)
