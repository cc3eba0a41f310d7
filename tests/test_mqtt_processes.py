"""Several MQTT host processes (`drivers.mqtt.processes`) through a real Mosquitto: the nodes split by edge node,
every node online and commanded, one STATE owner whose STATE is online only while every process lives.
"""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mqtt_support import (EDGE_PW, HOST_PW, HostRun, RunningEdge, broker, edge_link, fleet_process, loop,
                          run_all_online, wait_until)
from vbatt.config.plan import partition
from vbatt.config.plant import ConfigError, load_config
from vbatt.drivers.faults import Fault

__all__ = ["broker", "loop"]  # the fixtures
pytestmark = pytest.mark.timeout(120)

FLEET = """
plant: {{stale_ms: 2000, main_limit_w: 1000}}
drivers:
  mqtt: {{host: 127.0.0.1, port: {port}, tls: {{ca: '{ca}'}}, username: controller, password: {pw}, host_id: {host_id},
         group: g8, command_ms: 200, lease_ms: 1000, silence_ms: 3000, publish_ms: 20, processes: 2,
         fleet: {{edge_node: "fleet-{{e}}", nodes_per_edge: 2, password: {epw}, tick_ms: 200, period_ms: 2000}}}}
nodes:
  - template: {{count: 4, id: "n-{{i:02d}}", driver: mqtt, demand_w: [200, 400], max_discharge_w: 500,
               max_charge_w: 300, capacity_wh: 900, soc: [0.5, 0.9], link_max_w: 800}}
programs: [allocation]
"""


class Watcher:
    """Every retained-or-live message on the STATE topics and on the host processes' liveness topics."""

    def __init__(self, broker, host_id: str):
        self.seen: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{host_id}")
        self.c.username_pw_set("controller", HOST_PW)
        self.c.on_message = self._msg
        self.c.on_connect = lambda c, *_a: c.subscribe([("spBv1.0/STATE/#", 1), (f"vbatt/host/{host_id}/#", 1)])
        self.c.connect("127.0.0.1", broker.plain_port)
        self.c.loop_start()

    def _msg(self, client, userdata, msg) -> None:
        with self.lock:
            self.seen.append((msg.topic, json.loads(msg.payload)))

    def on(self, topic: str) -> list[dict]:
        with self.lock:
            return [p for t, p in self.seen if t == topic]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_a_fleet_split_over_two_host_processes_is_online_commanded_with_one_state_owner(broker, tmp_path):
    """`vbatt run` with `processes: 2` and 2 edge nodes of 2 devices: one I/O process per edge node, every
    node online and acknowledging, the STATE published by one session only (one timestamp), the second
    process saying it is alive on its own topic."""
    host_id = "h-split"
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(FLEET.format(port=broker.port, ca=broker.ca, pw=HOST_PW, epw=EDGE_PW, host_id=host_id))
    c, fleet = load_config(cfg)
    assert partition(c, fleet) == [(0, 2, "mqtt"), (2, 4, "mqtt")]  # fleet-0 | fleet-1
    w = Watcher(broker, host_id)
    with fleet_process(cfg):
        try:
            run_all_online(cfg, tmp_path, 4)
            wait_until(lambda: (w.on(f"spBv1.0/STATE/{host_id}") or [{}])[-1].get("online") is False,
                       "the STATE offline after the run")
            wait_until(lambda: (w.on(f"vbatt/host/{host_id}/2") or [{}])[-1].get("online") is False,
                       "the member process offline after the run")
            state = w.on(f"spBv1.0/STATE/{host_id}")
            online = [p["online"] for p in state]
            # one birth, then only its death (the clean goodbye, a member's departure, the will: the same death)
            assert online[0] is True and online.count(True) == 1 and len(online) >= 2, state
            assert len({p["timestamp"] for p in state}) == 1, state  # ... of one session: one owner
            member = w.on(f"vbatt/host/{host_id}/2")  # the process of nodes [2, 4) is a member, not an owner
            assert [p["online"] for p in member][:2] == [True, False], member
            assert not w.on(f"vbatt/host/{host_id}/0")
        finally:
            w.close()


def test_the_state_goes_offline_while_a_member_process_is_dead(broker, loop):
    """A member process that dies (no DISCONNECT: its will) takes the STATE offline, so that its edge
    nodes do not trust a dead host; back, the STATE is online again (same timestamp) and its edge node
    births to it."""
    host_id = "h-die"
    w = Watcher(broker, host_id)
    owner = HostRun(loop, broker, [("g1", "e1", "A")], host_id=host_id, members=("m1",), per_edge=True,
                    silence_ms=3000)
    member = HostRun(loop, broker, [("g1", "e2", "B")], host_id=host_id, member="m1", per_edge=True,
                     silence_ms=3000)
    e1 = RunningEdge(loop, edge_link(broker, "e1"), "e1", primary_host=host_id)
    e2 = RunningEdge(loop, edge_link(broker, "e2"), "e2", devices=["B"], primary_host=host_id)
    topic = f"spBv1.0/STATE/{host_id}"
    try:
        owner.wait(lambda d: d["fault"][0] == Fault.NONE, "e1/A online at the owner")
        member.wait(lambda d: d["fault"][0] == Fault.NONE, "e2/B online at the member")
        assert owner.host.foreign == 0 and member.host.foreign == 0  # each subscribed to its own edge node
        assert [p["online"] for p in w.on(topic)] == [True]
        births = e2.edge.births
        loop.soon(member.host.session.close, False)  # dies: the broker sends its will
        wait_until(lambda: [p["online"] for p in w.on(topic)][-2:] == [True, False], "the STATE offline")
        wait_until(lambda: [p["online"] for p in w.on(topic)][-3:] == [True, False, True],
                   "the STATE online again once the member reconnected")
        assert len({p["timestamp"] for p in w.on(topic)}) == 1
        member.wait(lambda d: d["fault"][0] == Fault.NONE, "e2/B online at the member again")
        assert e2.edge.births > births  # it held back while the STATE was offline, and births to it now
    finally:
        for x in (e1, e2, member, owner):
            x.stop()
        w.close()


def test_an_edge_node_whose_nodes_are_apart_cannot_be_split(write_config):
    path = write_config("""
drivers: {mqtt: {plaintext: true, processes: 2}}
nodes:
  - {id: a, driver: mqtt, edge_node: e1}
  - {id: b, driver: mqtt, edge_node: e2}
  - {id: c, driver: mqtt, edge_node: e1}
""")
    c, fleet = load_config(path)
    with pytest.raises(ConfigError, match=r"drivers\.mqtt\.processes: edge node vbatt/e1: its nodes are not listed together"):
        partition(c, fleet)
    with pytest.raises(ConfigError, match="processes"):
        load_config(write_config("drivers: {mqtt: {plaintext: true, processes: 0}}\nnodes:\n"
                                 "  - {id: a, driver: mqtt, edge_node: e1}\n"))
