"""The OPC UA server as a process of `vbatt run` (runtime/supervise/services.py SERVICE_FACTORIES).

`opcua_services` runs in the supervisor before any child starts, so first-start
work that talks to the terminal happens there, once and readable: the server
certificate is created when missing, and when no user exists an operator account
is created with a random password printed once (only its scrypt hash is kept).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import sys

from vbatt.plugins import ServiceSpec

from vbatt.opcua_models.config import OpcuaServerConfig, state_dir

__all__ = ["opcua_services", "server_main", "first_start"]

log = logging.getLogger("vbatt.opcua")
FIRST_USER = "operator"


def first_start(cfg: OpcuaServerConfig, out=None) -> str | None:
    """Certificate and first operator; returns the new password (already printed) or None."""
    # here, not at the top: every `vbatt run` imports this module (SERVICE_FACTORIES) before its scan
    # starts, and asyncua with cryptography is ~0.8 s of a start without an OPC UA server
    from vbatt.opcua_models.security import TrustList, UserStore, ensure_server_certificate

    out = out or sys.stderr
    state = state_dir(cfg)
    state.mkdir(parents=True, exist_ok=True)
    ensure_server_certificate(state, cfg.application_uri)
    TrustList(state).trusted.mkdir(parents=True, exist_ok=True)
    users = UserStore(state / "users.json")
    if not cfg.create_operator or users.load():
        return None
    password = secrets.token_urlsafe(12)
    users.add(FIRST_USER, "operator", password)
    print(f"\nOPC UA: created user {FIRST_USER!r} (role operator) with password: {password}\n"
          f"  It is shown only this once; only its hash is stored in {users.path}.\n"
          f"  Connect to opc.tcp://{cfg.host}:{cfg.port}/ with SignAndEncrypt (Basic256Sha256 or newer).\n"
          f"  Trust your client: vbatt opcua-trust add CLIENT_CERT (or move it from "
          f"{state / 'pki' / 'rejected'} to {state / 'pki' / 'trusted'}).\n", file=out, flush=True)
    return password


def opcua_services(cfg, fleet, image_name: str, spec) -> list[ServiceSpec]:
    if not cfg.opcua.enabled:
        return []
    first_start(cfg.opcua)
    return [ServiceSpec("vbatt-opcua", server_main,
                        (image_name, spec, cfg.opcua, tuple(fleet.ids), cfg.cycle.cycle_ms,
                         logging.getLogger().getEffectiveLevel()))]


def server_main(image_name: str, spec, ocfg: OpcuaServerConfig, node_ids: tuple[str, ...], cycle_ms: float,
                level: int) -> None:
    from vbatt.kernel.image import ProcessImage
    from vbatt.kernel.rt import set_parent_death_signal

    from vbatt.opcua_models.server import VbattOpcuaServer

    set_parent_death_signal(signal.SIGTERM)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("asyncua", "asyncua.crypto.uacrypto"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    img = ProcessImage.attach(image_name, spec)

    async def run() -> None:
        srv = VbattOpcuaServer(ocfg, img, node_ids, cycle_ms=cycle_ms)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: setattr(srv, "_stopping", True))
        await srv.start()
        try:
            await srv.serve()
        finally:
            await srv.stop()

    try:
        asyncio.run(run())
    finally:
        img.close()
