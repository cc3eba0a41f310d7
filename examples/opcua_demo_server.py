"""A plain OPC UA server standing in for a third-party device (a rack controller, a PLC).

It is *not* vbatt's server: it is what `examples/opcua_client.yaml` reads from.
Each rack has its own variables with vendor-style names and units (SoC in %,
power limits in kW) under the namespace ``urn:vbatt:demo-device``:

    ns=2;s=<rack>.SoC  .Voltage  .Current  .Temperature  .Load  .MaxDischargeKW
    .MaxChargeKW  .CapacityWh  .LinkMaxW  .Model (a String)   (read by vbatt)
    ns=2;s=<rack>.BatterySetpointW (Double)  .ServedW (Float)  .ShedW (Int32)   (written by vbatt)

Run it:  python examples/opcua_demo_server.py --port 4841
Secure:  ... --cert server.der --key server-key.pem --trust client.der [--user op --password-env PW]

Tests drive it through stdin, one JSON object per line, answered on stdout:
    {"set": "<rack>.SoC", "value": 55.0}       {"status": "<rack>.SoC", "code": "BadSensorFailure"}
    {"get": "<rack>.BatterySetpointW"}  -> {"value": ...}
    {"set_all": "SoC", "value": 50.0}          (a Double variable of every rack)
It prints ``READY <port>`` once it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from asyncua import Server, ua
from asyncua.crypto import uacrypto
from asyncua.crypto.permission_rules import User, UserRole

NAMESPACE = "urn:vbatt:demo-device"
APP_URI = "urn:vbatt:demo-device:server"

# name, initial value, variant type, writable by clients
VARIABLES = (
    ("SoC", 80.0, ua.VariantType.Double, False),
    ("Voltage", 51.2, ua.VariantType.Double, False),
    ("Current", 0.0, ua.VariantType.Double, False),
    ("Temperature", 27.0, ua.VariantType.Float, False),
    ("Load", 400.0, ua.VariantType.Double, False),
    ("MaxDischargeKW", 1.5, ua.VariantType.Double, False),
    ("MaxChargeKW", 0.8, ua.VariantType.Double, False),
    ("CapacityWh", 2000, ua.VariantType.UInt32, False),
    ("LinkMaxW", 1500.0, ua.VariantType.Double, False),
    ("Model", "DemoRack 48V", ua.VariantType.String, False),
    ("BatterySetpointW", 0.0, ua.VariantType.Double, True),
    ("ServedW", 0.0, ua.VariantType.Float, True),
    ("ShedW", 0, ua.VariantType.Int32, True),
)


class _Users:
    """One user, password from the environment."""

    def __init__(self, name: str | None, password: str | None):
        self.name, self.password = name, password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if self.name is None:
            return User(role=UserRole.User)
        if username == self.name and password == self.password:
            return User(role=UserRole.User)
        return None


async def _trust(paths: list[str]):
    trusted = [await uacrypto.load_certificate(p) for p in paths]
    fingerprints = {c.fingerprint(c.signature_hash_algorithm) for c in trusted}

    async def validate(cert, app_description):
        if cert.fingerprint(cert.signature_hash_algorithm) not in fingerprints:
            raise ua.UaStatusCodeError(ua.StatusCodes.BadCertificateUntrusted)

    return validate


async def serve(args) -> None:
    password = os.environ.get(args.password_env) if args.password_env else None
    server = Server(user_manager=_Users(args.user, password))
    await server.init()
    server.set_endpoint(f"opc.tcp://{args.host}:{args.port}/demo")
    server.set_server_name("vbatt demo device")
    if args.cert:
        await server.set_application_uri(APP_URI)
        await server.load_certificate(args.cert)
        await server.load_private_key(args.key)
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        server.set_certificate_validator(await _trust(args.trust))
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    server.set_identity_tokens([ua.UserNameIdentityToken] if args.user else [ua.AnonymousIdentityToken])
    idx = await server.register_namespace(NAMESPACE)
    objects = server.nodes.objects
    for r in range(args.racks):
        rack = f"rack-{r + 1}"
        obj = await objects.add_object(ua.NodeId(rack, idx), ua.QualifiedName(rack, idx))
        for name, value, vtype, writable in VARIABLES:
            var = await obj.add_variable(ua.NodeId(f"{rack}.{name}", idx), ua.QualifiedName(name, idx),
                                         ua.Variant(value, vtype))
            if writable:
                await var.set_writable()
    async with server:
        print(f"READY {args.port}", flush=True)
        await _commands(server, idx, args.racks)


async def _commands(server: Server, idx: int, racks: int) -> None:
    """Until stdin closes: apply one JSON command per line."""
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        try:
            cmd = json.loads(line)
            if "set_all" in cmd:  # one variable of every rack at once (benchmarks)
                name, value = cmd["set_all"], float(cmd["value"])
                for r in range(racks):
                    nid = ua.NodeId(f"rack-{r + 1}.{name}", idx)
                    await server.write_attribute_value(nid, ua.DataValue(ua.Variant(value, ua.VariantType.Double)))
                print(json.dumps({"ok": True}), flush=True)
                continue
            key = cmd.get("set") or cmd.get("status") or cmd.get("get")
            nid = ua.NodeId(key, idx)
            if "set" in cmd:
                vtype = await server.get_node(nid).read_data_type_as_variant_type()
                value = cmd["value"]
                vtype = getattr(ua.VariantType, cmd.get("type", vtype.name))
                if vtype in (ua.VariantType.Double, ua.VariantType.Float):
                    value = float(value)  # "nan", "inf" travel as strings in JSON
                elif vtype != ua.VariantType.String:
                    value = int(value)
                await server.write_attribute_value(nid, ua.DataValue(ua.Variant(value, vtype)))
                reply = {"ok": True}
            elif "status" in cmd:
                code = getattr(ua.StatusCodes, cmd["code"])
                await server.write_attribute_value(nid, ua.DataValue(StatusCode=ua.StatusCode(code)))
                reply = {"ok": True}
            else:
                reply = {"value": await server.get_node(nid).read_value()}
        except Exception as exc:  # a bad command must not kill the device
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4841)
    p.add_argument("--racks", type=int, default=2)
    p.add_argument("--cert", help="server certificate (DER/PEM): enables Basic256Sha256 SignAndEncrypt only")
    p.add_argument("--key", help="server private key (PEM)")
    p.add_argument("--trust", action="append", default=[], help="a trusted client certificate (repeatable)")
    p.add_argument("--user", help="require this user name (password from --password-env)")
    p.add_argument("--password-env", help="environment variable holding the password")
    args = p.parse_args(argv)
    if bool(args.cert) != bool(args.key):
        p.error("--cert and --key go together")
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
