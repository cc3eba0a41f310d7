"""MQTT Sparkplug B through a real Mosquitto: security, the node agent over MQTT, faults and bad input.

One broker for the module (tests/mqtt_support.py: installed when missing, TLS + passwords + ACL);
tests that restart a broker start their own. Processes are real (`vbatt node`), waits poll a condition
against a generous deadline, nothing asserts speed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import REPO, run_vbatt
from mqtt_support import (EDGE_PW, HOST_PW, HostRun, RunningEdge, broker, edge_link, fleet_process, loop,
                          make_broker, run_all_online, wait_until)
from vbatt.drivers.faults import Fault
from vbatt.drivers.mqtt import sparkplug as sp
from vbatt.drivers.mqtt.config import BrokerLink, MqttDriverConfig

__all__ = ["broker", "loop"]  # the fixtures
pytestmark = pytest.mark.timeout(120)

TWO = """
nodes:
  - {id: A, demand_w: 200, max_discharge_w: 100, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
  - {id: B, demand_w: 50, max_discharge_w: 150, max_charge_w: 100, capacity_wh: 1000, soc: 0.6, link_max_w: 1000}
"""


# -- security ---------------------------------------------------------------------------------------------
def test_plaintext_is_refused_for_a_broker_that_is_not_loopback(write_config):
    with pytest.raises(ValueError, match="plaintext: true is allowed only for a broker on loopback"):
        BrokerLink(host="10.0.0.5", plaintext=True)
    BrokerLink(host="127.0.0.1", plaintext=True)  # asked for, on loopback: allowed
    p = write_config("drivers:\n  mqtt: {host: broker.example, plaintext: true}\n"
                     "nodes:\n  - {id: A, driver: mqtt, edge_node: e1}\n")
    r = run_vbatt("check", str(p))
    assert r.returncode == 2
    assert "plant.yaml:2: drivers.mqtt: Value error, plaintext: true is allowed only for a broker on loopback" \
        in " ".join(r.stderr.split()), r.stderr


def test_a_link_without_tls_or_plaintext_is_a_config_error(write_config):
    p = write_config("nodes:\n  - {id: A, driver: mqtt, edge_node: e1}\n")
    r = run_vbatt("check", str(p))
    assert r.returncode == 2 and "say how to secure the broker link" in r.stderr, r.stderr
    assert MqttDriverConfig().tls is None and not MqttDriverConfig().plaintext  # secure unless told


def test_the_broker_refuses_a_wrong_password(broker, loop):
    h = HostRun(loop, broker, [("g1", "e1", "A")], password="wrong")
    try:
        h.wait(lambda d: d["fault"][0] == Fault.EXCEPTION_REPLY, "refused login")
        assert "refused the connection: Not authorized" in h.host.reason[0]
    finally:
        h.stop()


def test_an_edge_account_cannot_send_a_command_the_acl_refuses_it(broker, loop):
    """An NCMD/DCMD from a client that is not a host application: Mosquitto's ACL refuses it (MQTT 5
    PUBACK 'Not authorized'), the node never sees it; the host's next command is applied."""
    edge = RunningEdge(loop, edge_link(broker, "e2"), "e2", tick=False)
    h = HostRun(loop, broker, [("g1", "e2", "A")])
    try:
        h.wait(lambda d: d["fault"][0] == Fault.NONE, "the edge born")
        acks = []
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="intruder-1", protocol=paho.MQTTv5)
        c.username_pw_set("intruder", EDGE_PW)
        c.tls_set_context(__import__("vbatt.drivers.mqtt.client", fromlist=["x"]).tls_context(broker.ca))
        c.on_publish = lambda cl, ud, mid, rc, props: acks.append(rc)
        c.connect("127.0.0.1", broker.port)
        c.loop_start()
        p = sp.Payload(timestamp=1)
        for name, dt, attr, v in (("instruction/seq", 8, "long_value", 999), ("instruction/lease_ms", 7, "int_value", 60000),
                                  ("instruction/battery_w", 10, "double_value", 1e6), ("instruction/bus_w", 10, "double_value", 0.0),
                                  ("instruction/served_w", 10, "double_value", 0.0), ("instruction/shed_w", 10, "double_value", 0.0)):
            m = p.metrics.add(name=name, datatype=dt)
            setattr(m, attr, v)
        c.publish(sp.topic("g1", "DCMD", "e2", "A"), p.SerializeToString(), qos=1)
        c.publish(sp.topic("g1", "NCMD", "e2"), p.SerializeToString(), qos=1)
        wait_until(lambda: len(acks) == 2, "two PUBACKs")
        assert all(rc.getName() == "Not authorized" for rc in acks), acks
        c.disconnect()
        c.loop_stop()
        h.instruct(5, battery_w=40.0)
        wait_until(lambda: edge.edge.agents.seq[0] == 5, "the host's instruction applied")
        assert edge.edge.agents.cmd["battery_w"][0] == 40.0
        assert [s for _e, s in edge.edge.applied[0]] == [5]  # 999 never arrived
    finally:
        h.stop()
        edge.stop()


# -- the node agent over MQTT (a real `vbatt node` process) ----------------------------------------------
def _node_yaml(tmp_path, broker, edge: str) -> str:
    p = tmp_path / "node.yaml"
    (tmp_path / "pw").write_text(EDGE_PW + "\n")
    p.write_text(f"""id: {edge}
tick_ms: 100
backend: {{kind: sim, demand_w: 300, max_discharge_w: 600, max_charge_w: 300, capacity_wh: 800, soc: 0.7,
          link_max_w: 800}}
mqtt: {{host: 127.0.0.1, port: {broker.port}, tls: {{ca: '{broker.ca}'}}, username: {edge},
        password_file: '{tmp_path / "pw"}', group: g1, period_ms: 1000, keepalive_s: 3}}
""")
    return str(p)


def _start_node(path: str, tmp_path) -> subprocess.Popen:
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vbatt.cli", "node", path, "--ready-file", str(ready)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc


def test_vbatt_node_over_mqtt_lease_autonomy_death_and_silence(broker, loop, tmp_path):
    proc = _start_node(_node_yaml(tmp_path, broker, "e3"), tmp_path)
    h = HostRun(loop, broker, [("g1", "e3", "e3")], lease_ms=600, command_ms=100, silence_ms=1000)
    try:
        inp = h.wait(lambda d: d["fault"][0] == Fault.NONE, "the node's birth")
        assert inp["soc"][0] == pytest.approx(0.7, abs=0.01) and inp["capacity_wh"][0] == 800.0
        st = h.host.status
        h.instruct(11, battery_w=-100.0, bus_w=400.0, served_w=300.0)
        wait_until(lambda: st["status/ack_seq"][0] == 11 and st["status/mode"][0] == 1, "acknowledged, CONTROLLED")
        wait_until(lambda: st["status/applied_w"][0] == -100.0, "the node applies battery_w")
        assert h.host.rtt_ms[0] > 0
        # the controller stops renewing: the lease runs out, the node is on its own, and says so
        h.loop.soon(setattr, h.host, "have_instruction", False)
        wait_until(lambda: st["status/mode"][0] == 2, "AUTONOMOUS after the lease")
        assert st["status/expiries"][0] >= 1 and int(st["status/alarm"][0]) & 1
        assert st["status/applied_w"][0] == pytest.approx(300.0)  # own battery for own load
        h.instruct(12, battery_w=50.0)
        wait_until(lambda: st["status/mode"][0] == 1 and st["status/ack_seq"][0] == 12, "controlled again")
        # silence without NDEATH (a frozen process): stale, then back
        proc.send_signal(signal.SIGSTOP)
        inp = h.wait(lambda d: d["fault"][0] == Fault.TIMEOUT, "TIMEOUT on silence")
        assert "silent without NDEATH" in h.host.reasons[0]
        proc.send_signal(signal.SIGCONT)
        h.wait(lambda d: d["fault"][0] == Fault.NONE, "data again after the freeze")
        # killed: the broker publishes its will, the NDEATH
        proc.kill()
        h.wait(lambda d: d["fault"][0] == Fault.CONNECTION, "NDEATH", timeout=30)
        assert "sent NDEATH" in h.host.reasons[0]
    finally:
        proc.kill()
        proc.wait(10)
        proc.stderr.close()
        h.stop()


# -- faults and bad input ----------------------------------------------------------------------------------
def test_garbled_payload_and_unknown_metric_fault_only_that_device(broker, loop):
    # rebirth requests at most once a minute: a device that sent garbage stays faulty until it births again
    h = HostRun(loop, broker, [("g1", "e4", "A"), ("g1", "e4", "B")], silence_ms=60_000, rebirth_min_ms=60_000)
    wait_until(lambda: h.host.rebirths == 1, "the host connected (and asked an absent edge for a birth)")
    edge = RunningEdge(loop, edge_link(broker, "e4"), "e4", plant=TWO, tick=False)  # births once, on connect
    try:
        h.wait(lambda d: (d["fault"] == 0).all(), "both born")
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-e4")
        c.username_pw_set("e4", EDGE_PW)
        c.connect("127.0.0.1", broker.plain_port)
        c.loop_start()
        c.publish(sp.topic("g1", "DDATA", "e4", "B"), b"\x0a\xff\xff garbage", qos=1).wait_for_publish(5)
        inp = h.wait(lambda d: d["fault"][1] == Fault.GARBLED, "B garbled")
        assert inp["fault"][0] == Fault.NONE and "no Sparkplug B protobuf" in h.host.reasons[1]
        p = sp.Payload(timestamp=1)  # no seq: no gap, nothing else asks for a rebirth
        p.metrics.add(name="bogus_w", datatype=sp.DataType.Double, double_value=1.0)
        c.publish(sp.topic("g1", "DDATA", "e4", "A"), p.SerializeToString(), qos=1).wait_for_publish(5)
        inp = h.wait(lambda d: d["fault"][0] == Fault.GARBLED, "A: unknown metric")
        assert "'bogus_w' is not one vbatt knows" in h.host.reasons[0]
        c.disconnect()
        c.loop_stop()
        time.sleep(1.5)  # the edge's full reports (every second) do not clear it: no birth, no trust
        assert (h.inputs()["fault"] == Fault.GARBLED).all()

        def ask():
            h.host.rebirth_min_s = 0.0
            with h.host.lock:
                h.host._rebirth(("g1", "e4"), h.host.edges[("g1", "e4")])

        h.loop.soon(ask)
        h.wait(lambda d: (d["fault"] == 0).all(), "both back after a rebirth")
    finally:
        h.stop()
        edge.stop()


def test_a_sequence_gap_asks_for_a_rebirth(broker, loop):
    h = HostRun(loop, broker, [("g1", "e5", "A")], rebirth_min_ms=1)
    wait_until(lambda: h.host.rebirths == 1, "the host connected (and asked an absent edge for a birth)")
    edge = RunningEdge(loop, edge_link(broker, "e5"), "e5", tick=False)  # births once, on connect
    try:
        h.wait(lambda d: d["fault"][0] == Fault.NONE, "born")
        births = edge.edge.births
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-e5")
        c.username_pw_set("e5", EDGE_PW)
        c.connect("127.0.0.1", broker.plain_port)
        c.loop_start()
        p = sp.Payload(timestamp=1, seq=(edge.edge.seq + 100) % 256)  # a message from the future: a gap
        c.publish(sp.topic("g1", "NDATA", "e5"), p.SerializeToString(), qos=1).wait_for_publish(5)
        wait_until(lambda: edge.edge.births > births, "a rebirth")
        assert h.host.gaps >= 1 and h.host.rebirths >= 1
        c.disconnect()
        c.loop_stop()
    finally:
        h.stop()
        edge.stop()


def test_broker_restart_reconnects_rebirths_and_never_applies_an_instruction_twice(loop, tmp_path):
    b = make_broker(tmp_path / "own")
    b.start()
    edge = RunningEdge(loop, edge_link(b, "e6"), "e6", tick=False)
    h = HostRun(loop, b, [("g1", "e6", "A")], command_ms=50)
    try:
        h.wait(lambda d: d["fault"][0] == Fault.NONE, "born")
        births = edge.edge.births
        seqs = iter(range(100, 10_000))
        for _ in range(10):  # the scan moves on while the broker goes away and comes back
            h.instruct(next(seqs), battery_w=10.0)
            time.sleep(0.05)
        b.kill()  # no goodbye, no wills
        h.wait(lambda d: d["fault"][0] == Fault.CONNECTION, "the broker gone")
        for _ in range(5):
            h.instruct(next(seqs), battery_w=20.0)
            time.sleep(0.05)
        b.start()
        h.wait(lambda d: d["fault"][0] == Fault.NONE, "reconnected and born again", timeout=30)
        assert edge.edge.births > births
        last = next(seqs)
        h.instruct(last, battery_w=30.0)
        wait_until(lambda: edge.edge.agents.seq[0] == last, "the newest instruction applied")
        applied = [s for _e, s in edge.edge.applied[0]]
        assert applied == sorted(set(applied)), applied  # in order, none twice
        assert edge.edge.agents.cmd["battery_w"][0] == 30.0
    finally:
        h.stop()
        edge.stop()
        b.stop()


# -- a fleet of edge nodes and the driver in its I/O role --------------------------------------------------
FLEET = """
plant: {{stale_ms: 2000}}
drivers:
  mqtt: {{host: 127.0.0.1, port: {port}, tls: {{ca: '{ca}'}}, username: controller, password: {pw}, host_id: h9,
         group: g9, command_ms: 200, lease_ms: 1000, silence_ms: 3000, publish_ms: 20,
         fleet: {{edge_node: "fleet-{{e}}", nodes_per_edge: 3, password: {epw}, tick_ms: 200, period_ms: 2000}}}}
nodes:
  - template: {{count: 5, id: "n-{{i:02d}}", driver: mqtt, demand_w: [200, 400], max_discharge_w: 500,
               max_charge_w: 300, capacity_wh: 900, soc: [0.5, 0.9], link_max_w: 800}}
  - {{id: solo, driver: mqtt, edge_node: e1, group: g9}}
"""


def test_vbatt_fleet_edges_and_the_driver_on_a_real_image(broker, tmp_path):
    """`vbatt fleet CONFIG` serves the `driver: mqtt` template as 2 edge nodes (3 + 2 devices) that birth
    once the host's STATE is online; the registered driver, on a real image, gets every node and each
    node acknowledges the instruction; `solo` (no edge node serves it) stays NO_DATA."""
    from test_driver_conformance import Run

    cfg = tmp_path / "plant.yaml"
    cfg.write_text(FLEET.format(port=broker.port, ca=broker.ca, pw=HOST_PW, epw=EDGE_PW))
    ready = tmp_path / "ready"
    r = None
    with fleet_process(cfg, "--ready-file", str(ready), stderr=subprocess.PIPE):
        try:
            wait_until(lambda: ready.exists(), "the fleet's edge nodes connected", timeout=30)
            assert ready.read_text().split() == ["fleet-0", "fleet-1"]
            r = Run(cfg, "mqtt")
            inp = r.wait(lambda d: (d["fault"][:5] == 0).all(), "the 5 fleet nodes online")
            assert inp["fault"][5] == Fault.NO_DATA
            assert ((inp["soc"][:5] >= 0.5) & (inp["soc"][:5] <= 0.9)).all() and (inp["capacity_wh"][:5] == 900).all()
            r.command(77, battery_w=15.0, bus_w=5.0, served_w=20.0, shed_w=0.0)
            h = r.driver.links
            wait_until(lambda: (h.status["status/ack_seq"][:5] == 77).all(), "every node acknowledged seq 77")
            assert (h.status["status/applied_w"][:5] == 15.0).all() and (h.rtt_ms[:5] > 0).all()
        finally:
            if r is not None:
                r.stop()


def test_data_as_old_as_its_timestamp_a_backlog_is_not_fresh(broker, loop):
    """A DDATA that arrives now but was sampled 10 s ago (a broker or a controller behind on its backlog)
    counts as 10 s old: the node is stale, not fresh."""
    h = HostRun(loop, broker, [("g1", "e1", "A")], silence_ms=6000, rebirth_min_ms=60_000)
    wait_until(lambda: h.host.rebirths == 1, "the host connected (and asked an absent edge for a birth)")
    edge = RunningEdge(loop, edge_link(broker, "e1"), "e1", tick=False, period_ms=600_000)  # births once
    try:
        h.wait(lambda d: d["fault"][0] == Fault.NONE, "born")
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="raw-e1")
        c.username_pw_set("e1", EDGE_PW)
        c.connect("127.0.0.1", broker.plain_port)
        c.loop_start()
        p = sp.Payload(timestamp=int(time.time() * 1000) - 10_000)
        p.metrics.add(name="soc", datatype=sp.DataType.Double, double_value=0.5)
        c.publish(sp.topic("g1", "DDATA", "e1", "A"), p.SerializeToString(), qos=1).wait_for_publish(5)
        inp = h.wait(lambda d: d["fault"][0] == Fault.TIMEOUT and d["soc"][0] == 0.5, "our message, stale at once")
        assert inp["updated_ns"][0] == 0
        ms = float(h.host.reasons[0].split("no data for ")[1].split(" ms")[0])
        assert ms >= 9_000, h.host.reasons[0]  # its own age (10 s), not the silence since the birth
        c.disconnect()
        c.loop_stop()
    finally:
        h.stop()
        edge.stop()


def test_vbatt_run_allocates_over_mqtt_and_hands_every_node_back_as_it_stops(broker, tmp_path):
    """The whole stack: `vbatt fleet` publishes 5 nodes, `vbatt run` (supervisor, scan, the mqtt driver in
    its I/O process, the allocation) latches them all and their acknowledgements come back. Its orderly stop
    (`--duration`) hands every node back: the fleet, stopped after it, finds them all RELEASED, none lapsed."""
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(FLEET.replace("  - {{id: solo, driver: mqtt, edge_node: e1, group: g9}}\n", "").format(
        port=broker.port, ca=broker.ca, pw=HOST_PW, epw=EDGE_PW)
        .replace("plant: {stale_ms: 2000}", "plant: {stale_ms: 2000, main_limit_w: 1000}")
        + "programs: [allocation]\n")
    fleet_log = tmp_path / "fleet.txt"
    with open(fleet_log, "w") as err, fleet_process(cfg, "-v", stderr=err):
        snap, log = run_all_online(cfg, tmp_path, 5, "-v")
        assert snap["aggregate"]["main_w"] == pytest.approx(1000.0, abs=1e-6)  # the limit binds: batteries help
    assert "5 devices handed back to their own control (status/mode RELEASED)" in log, log
    assert "not at the stop" not in log and "Traceback" not in log, log
    agents = fleet_log.read_text()
    assert "stopping 5 nodes: 5 handed back by the controller, 0 autonomous after a lapsed lease, 0 still " \
           "controlled" in agents, agents
    assert "ran out" not in agents, agents
