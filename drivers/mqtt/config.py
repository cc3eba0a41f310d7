"""Config models of the MQTT (Sparkplug B) side: the broker link, the host's `drivers.mqtt`, a node entry,
an edge node (`vbatt node` with `mqtt:`, the fleet's edge nodes). See docs/mqtt.md.

Secure by default: a link needs `tls: {ca}` (the broker's CA; `cert`/`key` add a client certificate)
or `plaintext: true`, and plaintext is refused for a host that is not loopback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from vbatt.config.base import NodeId, NodeSettings, Strict

__all__ = ["BrokerTls", "BrokerLink", "FleetEdgeConfig", "MqttDriverConfig", "MqttNodeConfig", "EdgeConfig",
           "LOOPBACK", "mqtt_nodes", "SparkplugId", "split_by_edge",
           "member_topic"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
Ms = Annotated[float, Field(gt=0, le=3_600_000, allow_inf_nan=False)]
# Sparkplug ids are topic levels: no '/', '+', '#'
SparkplugId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


class BrokerTls(Strict):
    """The broker's CA (PEM); `cert` and `key`: a client certificate as well (mutual TLS)."""

    ca: str
    cert: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> "BrokerTls":
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both 'cert' and 'key' (a client certificate), or neither")
        return self


class BrokerLink(Strict):
    """Where the broker is and how to log in."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8883
    tls: BrokerTls | None = None
    plaintext: bool = False  # MQTT without TLS: loopback only, and only when said so
    username: str | None = None
    password: str | None = None
    password_file: str | None = None  # first line of the file is the password (keeps it out of the YAML)
    keepalive_s: Annotated[int, Field(ge=2, le=3600)] = 10

    @model_validator(mode="after")
    def _secure(self) -> "BrokerLink":
        if self.plaintext and self.tls is not None:
            raise ValueError("give either 'tls' (the broker's CA) or 'plaintext: true', not both")
        if self.plaintext and self.host not in LOOPBACK:
            raise ValueError(f"plaintext: true is allowed only for a broker on loopback ({', '.join(LOOPBACK)}), "
                             f"not {self.host!r}: use tls: {{ca: ...}}")
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either 'password' or 'password_file', not both")
        return self

    @property
    def secured(self) -> bool:
        return self.tls is not None or self.plaintext

    def secret(self) -> str | None:
        if self.password_file is not None:
            lines = Path(self.password_file).read_text().splitlines()
            return lines[0] if lines else ""
        return self.password


class FleetEdgeConfig(Strict):
    """The edge nodes that serve the template nodes with `driver: mqtt` (`vbatt fleet CONFIG`): node k of
    those templates is device k % nodes_per_edge of edge node `edge_node.format(e=k // nodes_per_edge)`."""

    edge_node: Annotated[str, Field(min_length=1)] = "fleet-{e}"
    nodes_per_edge: Annotated[int, Field(ge=1, le=100_000)] = 1000
    username: str | None = None  # default: the edge node id (the broker's ACL keys on it)
    password: str | None = None
    password_file: str | None = None
    tick_ms: Ms = 1000.0  # physics period; DDATA carries what changed at every tick
    period_ms: Ms = 10_000.0  # every metric is sent at least this often


class MqttDriverConfig(BrokerLink):
    """`drivers.mqtt`: the controller is the Sparkplug host application `host_id`."""

    host_id: SparkplugId = "vbatt"
    group: SparkplugId = "vbatt"  # the group of nodes that do not name one
    # a DCMD goes to a device when its instruction moved by more than deadband_w (any output) since the last
    # one it was sent, when half its lease has passed since then (a renewal) and when it births; never twice
    # within command_min_ms
    command_ms: Ms = 1000.0  # the pace of instructions the lease is sized for: the default lease is 4 x command_ms
    command_min_ms: Ms = 100.0
    deadband_w: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] = 5.0
    lease_ms: Ms | None = None  # default 4 x command_ms; renewed at half of it
    silence_ms: Ms = 5000.0  # a device that sends nothing for this long is TIMEOUT
    publish_ms: Ms = 20.0
    reconnect_min_ms: Ms = 250.0
    reconnect_max_ms: Ms = 4000.0
    rebirth_min_ms: Ms = 2000.0  # rebirth requests to one edge node at most this often
    # data is as old as its payload timestamp says (clocks in sync, e.g. NTP), so a backlog ages it toward
    # stale; false: as old as its arrival here
    trust_timestamps: bool = True
    fleet: FleetEdgeConfig = FleetEdgeConfig()
    # split the MQTT nodes over this many I/O processes, a whole edge node in one, each with its own broker
    # session subscribed to its own edge nodes; the first owns the STATE (docs/mqtt.md "Several host processes")
    processes: Annotated[int, Field(ge=1, le=64)] = 1

    @model_validator(mode="after")
    def _ranges(self) -> "MqttDriverConfig":
        if self.reconnect_max_ms < self.reconnect_min_ms:
            raise ValueError(f"reconnect_max_ms ({self.reconnect_max_ms}) must be >= reconnect_min_ms "
                             f"({self.reconnect_min_ms})")
        if self.command_min_ms > self.lease / 4:
            # renewals at half the lease, each at most command_min_ms late, must land well inside the lease
            raise ValueError(f"command_min_ms ({self.command_min_ms:g}) must be at most a quarter of the lease "
                             f"({self.lease:g} ms)")
        return self

    @property
    def lease(self) -> float:
        return self.lease_ms if self.lease_ms is not None else 4.0 * self.command_ms

    def split(self, cfg, fleet, a: int, b: int) -> list[tuple[int, int]]:
        """The I/O processes of MQTT nodes [a, b): cut only between edge nodes (runtime/config/plan.py)."""
        return split_by_edge(cfg, fleet, a, b, self.processes)


class MqttNodeConfig(NodeSettings):
    """A node that publishes over Sparkplug B: device `device` (default: the node id) of edge node
    `edge_node` in group `group` (default: drivers.mqtt.group)."""

    id: NodeId
    driver: Literal["mqtt"]
    edge_node: SparkplugId
    device: SparkplugId | None = None
    group: SparkplugId | None = None


class EdgeConfig(BrokerLink):
    """`mqtt:` of a `vbatt node` config: publish as Sparkplug edge node `edge_node` (default: the node id,
    also the default user name) with the node as its device."""

    group: SparkplugId = "vbatt"
    edge_node: SparkplugId | None = None
    device: SparkplugId | None = None
    primary_host: SparkplugId | None = None  # birth only while this host's STATE is online
    period_ms: Ms = 10_000.0


def mqtt_nodes(cfg, fleet) -> dict[int, tuple[str, str, str]]:
    """Image index -> (group, edge node, device) of every node reached over MQTT."""
    d = cfg.drivers.mqtt
    out: dict[int, tuple[str, str, str]] = {}
    i = k = 0
    for entry in cfg.nodes:
        t = getattr(entry, "template", None)
        if t is not None:
            if t.driver == "mqtt":
                for j in range(t.count):
                    out[i + j] = (d.group, d.fleet.edge_node.format(e=k // d.fleet.nodes_per_edge), fleet.ids[i + j])
                    k += 1
            i += t.count
            continue
        if getattr(entry, "driver", None) == "mqtt":
            out[i] = (entry.group or d.group, entry.edge_node, entry.device or entry.id)
        i += 1
    return out


def member_topic(host_id: str, member: str) -> str:
    """Where host process `member` (not the STATE owner) says it is alive: retained, outside the Sparkplug
    namespace, read only by the STATE owner."""
    return f"vbatt/host/{host_id}/{member}"


def split_by_edge(cfg, fleet, a: int, b: int, processes: int) -> list[tuple[int, int]]:
    """Nodes [a, b) (all MQTT) cut into at most `processes` contiguous ranges of about equal size, cut only
    where the edge node changes, so that each edge node lives in one process."""
    where = mqtt_nodes(cfg, fleet)
    if processes <= 1 or b - a <= 1:
        return [(a, b)]
    key = [where[i][:2] for i in range(a, b)]
    starts = [0] + [j for j in range(1, b - a) if key[j] != key[j - 1]]
    seen: dict = {}
    for j in starts:
        if key[j] in seen:
            g, e = key[j]
            raise ValueError(f"edge node {g}/{e}: its nodes are not listed together (node {fleet.ids[a + j]!r} "
                             f"after node {fleet.ids[a + seen[key[j]]]!r} and others): list each edge node's "
                             f"nodes one after the other, or set processes: 1")
        seen[key[j]] = j
    cuts = [0]
    for k in range(1, processes):
        want = round(k * (b - a) / processes)
        best = min(starts, key=lambda j: abs(j - want))
        if best > cuts[-1]:
            cuts.append(best)
    cuts.append(b - a)
    return [(a + x, a + y) for x, y in zip(cuts, cuts[1:])]
