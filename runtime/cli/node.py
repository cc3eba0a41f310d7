"""`vbatt node`, `vbatt fleet`, `vbatt certs`: the node side of the Modbus link, and its certificates."""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["add_command", "cmd_node", "cmd_fleet", "cmd_certs"]

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _err(msg: str) -> None:
    from vbatt.cli.main import err

    err.print(msg, markup=False)


def cmd_node(args) -> int:
    from vbatt.drivers.node.agent import load_node_config, run_node

    from vbatt.cli.main import _report_config_error
    from vbatt.config.plant import ConfigError

    try:
        cfg = load_node_config(args.config)
    except ConfigError as exc:
        return _report_config_error(exc)
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    try:
        run_node(cfg, ready_file=args.ready_file)
    except (OSError, ValueError) as exc:
        _err(f"vbatt node: {exc}")
        return EXIT_FAIL
    return EXIT_OK


def cmd_fleet(args) -> int:
    from vbatt.drivers.node.fleet import demo_config_text, fleet_main

    from vbatt.cli.main import _report_config_error
    from vbatt.config.plant import ConfigError, load_config, load_config_text

    if (args.config is None) == (args.nodes is None):
        _err("usage error: give either CONFIG or --nodes N (with --base-port P)")
        return EXIT_USAGE
    try:
        if args.config:
            cfg, fleet = load_config(args.config)
        else:
            if args.nodes < 1:
                _err("usage error: --nodes must be >= 1")
                return EXIT_USAGE
            if not 1 <= args.base_port <= 65536 - args.nodes:
                _err(f"usage error: --base-port must be in [1, {65536 - args.nodes}] for {args.nodes} nodes")
                return EXIT_USAGE
            cfg, fleet = load_config_text(demo_config_text(args.nodes, args.base_port, args.tick_ms), "<fleet demo>")
    except ConfigError as exc:
        return _report_config_error(exc)
    try:
        fleet_main(cfg, fleet, args.base_port if args.config and args.base_port_given else None,
                   ready_file=args.ready_file, level=logging.INFO if args.verbose else logging.WARNING,
                   edge=getattr(args, "edge", None))
    except (OSError, ValueError) as exc:
        _err(f"vbatt fleet: {exc}")
        return EXIT_FAIL
    return EXIT_OK


def cmd_certs(args) -> int:
    from vbatt.drivers.certs import make_fleet_certs

    if args.fleet < 0:
        _err("usage error: --fleet must be >= 0")
        return EXIT_USAGE
    d = Path(args.dir)
    if (d / "ca.pem").exists() and not args.force:
        _err(f"vbatt certs: {d / 'ca.pem'} exists (use --force to replace the CA and every certificate)")
        return EXIT_FAIL
    out = make_fleet_certs(d, args.fleet, tuple(args.host))
    print(f"{d}: CA, controller and {args.fleet} node certificate(s) for {', '.join(args.host)} "
          f"({len(out) * 2} files; keys are mode 0600)")
    return EXIT_OK



def add_command(sub) -> None:
    n = sub.add_parser("node", help="run a node agent (SunSpec over Modbus TCP/TLS)",
                       description="Serve one battery-backed device's SunSpec map and obey the controller's "
                                   "leased instructions.")
    n.add_argument("config", help="node YAML (see docs/modbus.md)")
    n.add_argument("--ready-file", metavar="FILE", help="write the listening port here once serving")
    n.set_defaults(func=cmd_node)

    f = sub.add_parser("fleet", help="many simulated node agents on 127.0.0.1",
                       description="Serve simulated nodes as real Modbus TCP agents, one port each: "
                                   "--nodes N --base-port P, or the 'driver: modbus' templates of CONFIG.")
    f.add_argument("config", nargs="?", help="plant YAML whose templates say 'driver: modbus'")
    f.add_argument("--nodes", type=int, metavar="N")
    f.add_argument("--base-port", type=int, metavar="P", default=None)
    f.add_argument("--tick-ms", type=float, default=100.0, metavar="MS", help="physics/register refresh period")
    f.add_argument("--ready-file", metavar="FILE", help="write the first and last port here once serving")
    f.add_argument("--edge", type=int, metavar="K", default=None,
                   help="driver: mqtt templates: serve only Sparkplug edge node K (default: all)")
    f.add_argument("-v", "--verbose", action="store_true")

    def fleet(args):
        args.base_port_given = args.base_port is not None
        if args.base_port is None:
            args.base_port = 15020
        return cmd_fleet(args)

    f.set_defaults(func=fleet)

    c = sub.add_parser("certs", help="create a CA and certificates for a controller and a fleet",
                       description="Modbus/TCP Security: writes ca.pem/key, controller.pem/key and "
                                   "node-<i>.pem/key into DIR.")
    c.add_argument("dir", help="output directory")
    c.add_argument("--fleet", type=int, default=1, metavar="N", help="node certificates to issue (default 1)")
    c.add_argument("--host", action="append", default=None, metavar="H",
                   help="IP or DNS name the certificates are valid for (repeatable; default 127.0.0.1, localhost)")
    c.add_argument("--force", action="store_true", help="replace an existing CA")

    def certs(args):
        args.host = args.host or ["127.0.0.1", "localhost"]
        return cmd_certs(args)

    c.set_defaults(func=certs)
