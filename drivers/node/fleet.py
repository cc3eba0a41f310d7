"""Many simulated node agents as real Modbus TCP servers on loopback, in one process.

`vbatt fleet --nodes N --base-port P` serves N demo nodes on ports P..P+N-1;
`vbatt fleet CONFIG` serves the template nodes of a plant config that say
`driver: modbus` (the embedded fleet), exactly as `vbatt run CONFIG` would.
The embedded fleet of a run is the same code started by the supervisor as a
service (`embedded_fleet_services`, registered in runtime/supervise/services.py) before
the drivers, so the controller polls real agents over real sockets.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import numpy as np

from vbatt.drivers.node.backends.sim import SimBackend
from vbatt.drivers.modbus.config import embedded_indices, rendezvous_path
from vbatt.drivers.node.agent import AgentSet, AgentSpec, serve_until_signalled

__all__ = ["sub_fleet", "build_fleet_agents", "fleet_main", "embedded_fleet_services", "demo_config_text", "demo_nodes_yaml"]

log = logging.getLogger("vbatt.fleet")


def sub_fleet(fleet, idx: list[int]):
    """The nodes `idx` of a Fleet as a Fleet of their own (SimFleet wants a contiguous range)."""
    from vbatt.config.plant import Fleet

    sel = np.asarray(idx, dtype=np.int64)
    return Fleet([fleet.ids[i] for i in idx], {k: v[sel] for k, v in fleet.values.items()},
                 ["sim"] * len(idx), [fleet.profiles[i] for i in idx], [fleet.physics[i] for i in idx])


def build_fleet_agents(cfg, fleet, base_port: int | None = None, seed: int = 0) -> AgentSet:
    from vbatt.drivers.certs import server_context

    ef = cfg.drivers.modbus.embedded_fleet
    idx = embedded_indices(cfg, fleet)
    if not idx:
        raise ValueError("no template with 'driver: modbus' in this config: nothing for the fleet to serve")
    port0 = ef.base_port if base_port is None else base_port
    if port0 and port0 + len(idx) - 1 > 65535:
        raise ValueError(f"base port {port0} + {len(idx)} nodes runs past port 65535")
    ctx = server_context(ef.tls.ca, ef.tls.cert, ef.tls.key) if ef.tls else None
    sub = sub_fleet(fleet, idx)
    specs = [AgentSpec(sub.ids[k], ef.host, port0 + k if port0 else 0, 1, ctx) for k in range(len(idx))]
    return AgentSet(SimBackend(sub, 0, len(idx), seed=seed), specs, tick_ms=ef.tick_ms)


def fleet_main(cfg, fleet, base_port: int | None = None, ready_file: str | None = None, level: int = 30,
               edge: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or the parent dies, when started by the supervisor)."""
    try:
        from vbatt.kernel.rt import set_parent_death_signal

        set_parent_death_signal(signal.SIGTERM)
    except Exception:  # noqa: BLE001 (not on every OS; only a convenience)
        pass
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    if not embedded_indices(cfg, fleet) and "mqtt" in fleet.drivers:  # Sparkplug edge nodes (docs/mqtt.md)
        from vbatt.drivers.mqtt.edge import fleet_edges_main

        fleet_edges_main(cfg, fleet, edge, ready_file)
        return
    agents = build_fleet_agents(cfg, fleet, base_port)

    def ready(a: AgentSet) -> None:
        log.info("fleet: %d agents on %s:%d..%d", a.n, a.specs[0].host, a.ports[0], a.ports[-1])
        if ready_file:  # atomically: the driver never reads half a list
            tmp = Path(ready_file + ".tmp")
            tmp.write_text("".join(f"{p}\n" for p in a.ports))
            os.replace(tmp, ready_file)

    try:
        asyncio.run(serve_until_signalled(agents, ready))
    finally:
        if ready_file:
            Path(ready_file).unlink(missing_ok=True)


def embedded_fleet_services(cfg, fleet, image_name: str, spec) -> list:
    """SERVICE_FACTORIES entry: the embedded fleet, started before the drivers, when the config has one."""
    from vbatt.plugins import ServiceSpec

    if not embedded_indices(cfg, fleet):
        return []
    ready = str(rendezvous_path(image_name))
    return [ServiceSpec("vbatt-fleet", fleet_main, (cfg, fleet, None, ready), before_drivers=True)]


def demo_nodes_yaml(count: int, id_pattern: str, soc: tuple[float, float] = (0.4, 1.0), **keys) -> str:
    """The `nodes:` section of `count` demo nodes (servers with battery backup units, over Modbus);
    `keys` (e.g. start, seed) go into the template as they are."""
    extra = "".join(f"      {k}: {v}\n" for k, v in keys.items())
    return f"""nodes:
  - template:
      count: {count}
      id: "{id_pattern}"
{extra}      driver: modbus
      priority: [1, 3]
      demand_w: [200, 450]
      demand_profile: {{kind: sine, amplitude_w: 60, period_s: 120, noise_w: 15}}
      max_discharge_w: [400, 800]
      max_charge_w: [200, 400]
      capacity_wh: [300, 900]
      soc: [{soc[0]}, {soc[1]}]
      temperature_c: [24, 32]
      link_max_w: [500, 1000]
"""


def demo_config_text(nodes: int, base_port: int, tick_ms: float = 100.0) -> str:
    """The plant config `vbatt fleet --nodes N` serves: N servers with battery backup units."""
    return f"""
drivers:
  modbus:
    plaintext: true
    embedded_fleet: {{base_port: {base_port}, tick_ms: {tick_ms}}}
""" + demo_nodes_yaml(nodes, "node-{i:05d}")
