"""An orderly stop hands MQTT devices back (seq 0), through a real Mosquitto; a device it cannot reach lapses.

The host (drivers/mqtt/driver.py `Host.goodbye`), after its link's last round, sends every device that holds a
lease its last DCMD once more with seq 0: the edge node runs it through the node agent's own `release` (the
Modbus hand-back), answers `status/mode` RELEASED at once, counts no expiry and raises no alarm. A device
whose link is down at the stop keeps its lease, and the lease runs out on the node as before (also while its
edge node cannot reach the broker). The edge's own checks of a seq 0 DCMD are shown one by one. Nothing here
waits for a time: every wait is for a state.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from mqtt_support import (EDGE_PW, HOST_PW, HOST_USER, Cuttable, HostRun, Link, RunningEdge, broker, edge_link,
                          loop, wait_until)
from vbatt.drivers.faults import Fault
from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.mqtt import driver as mqtt_driver
from vbatt.drivers.mqtt import sparkplug as sp

__all__ = ["broker", "loop"]  # the fixtures
pytestmark = pytest.mark.timeout(120)

WAIT_S = 30.0  # how long the host may wait for the answers to its hand-back here: generous, it ends at the answers
RELEASED = 3  # status/mode of a device handed back, as a Sparkplug host reads it (docs/mqtt.md)
TWO = """
nodes:
  - {id: A, demand_w: 200, max_discharge_w: 100, max_charge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
  - {id: B, demand_w: 50, max_discharge_w: 150, max_charge_w: 100, capacity_wh: 1000, soc: 0.6, link_max_w: 1000}
"""


def _lapsed_past(edge: RunningEdge, deadline_ns: int) -> bool:
    """The edge's agents ticked after `deadline_ns` (a lease that ended then would have run out by now)."""
    return int(edge.edge.agents.last_ns) > deadline_ns


def test_an_orderly_stop_hands_every_device_back_and_no_lease_runs_out(broker, loop, caplog, monkeypatch):
    """Two edge nodes, three devices, all controlled; the host stops in order: all three RELEASED at once, the
    instruction they followed still acknowledged, and past the lease of that instruction none has lapsed."""
    monkeypatch.setattr(mqtt_driver, "HAND_BACK_WAIT_S", WAIT_S)
    e1 = RunningEdge(loop, edge_link(broker, "e1"), "e1", plant=TWO)
    e2 = RunningEdge(loop, edge_link(broker, "e2"), "e2")
    h = HostRun(loop, broker, [("g1", "e1", "A"), ("g1", "e1", "B"), ("g1", "e2", "A")], host_id="h-back",
                lease_ms=800)
    agents = [(e1, 0), (e1, 1), (e2, 0)]
    try:
        h.wait(lambda d: (d["fault"] == Fault.NONE).all(), "all three born")
        h.instruct(7, battery_w=-30.0)
        wait_until(lambda: all(e.edge.agents.mode[i] == ss.Mode.CONTROLLED and e.edge.agents.seq[i] == 7
                               for e, i in agents), "all three controlled by instruction 7")
        with caplog.at_level(logging.INFO):
            h.stop()
            lease_end = max(int(e.edge.agents.clock_ns()) for e, _i in agents) + 800 * 1_000_000
            for e, i in agents:
                a = e.edge.agents
                assert a.mode[i] == RELEASED and a.seq[i] == 7 and e.edge.epoch[i] == h.host.epoch
                assert a.releases[i] == 1 and e.edge.refused[i] == 0
            h.host.hand_back_report()
            assert list(h.host.handed_back) == [True] * 3 and h.host.not_handed_back == {}
            wait_until(lambda: _lapsed_past(e1, lease_end) and _lapsed_past(e2, lease_end), "a tick past the lease")
        assert "3 devices handed back to their own control (status/mode RELEASED): no lease is left to run out" \
            in caplog.text
        for (e, i), own_w in zip(agents, (100.0, 50.0, 100.0)):  # own battery for own load: min(demand, discharge)
            a = e.edge.agents
            assert a.mode[i] == RELEASED and a.expiries[i] == 0 and a.applied_w[i] == own_w
            assert not int(a.alarm[i]) & int(ss.Alarm.LEASE_EXPIRED | ss.Alarm.BAD_INSTRUCTION)
        assert "ran out" not in caplog.text
        assert "handed back by the controller" in caplog.text  # the edge says it, at INFO
    finally:
        if not h.task.done():
            h.stop()
        e1.stop()
        e2.stop()


def test_a_device_cut_off_at_the_stop_keeps_its_lease_and_it_runs_out(broker, loop, caplog, monkeypatch):
    """e2 reaches the broker through a link the test cuts: its NDEATH comes (the broker's will), the host stops
    in order, hands back e1's device and names e2's as not handed back. e2 goes on without a broker: its lease
    runs out there as if the controller had died (counted, LEASE_EXPIRED), e1's device does not lapse."""
    monkeypatch.setattr(mqtt_driver, "HAND_BACK_WAIT_S", WAIT_S)
    cut = Cuttable(loop, broker.plain_port)
    e1 = RunningEdge(loop, edge_link(broker, "e1"), "e1")
    e2 = RunningEdge(loop, Link("127.0.0.1", cut.port, None, "e2", EDGE_PW, keepalive_s=5), "e2")
    h = HostRun(loop, broker, [("g1", "e1", "A"), ("g1", "e2", "A")], host_id="h-cut", lease_ms=800)
    try:
        h.wait(lambda d: (d["fault"] == Fault.NONE).all(), "both born")
        h.instruct(9, battery_w=-20.0)
        wait_until(lambda: e1.edge.agents.mode[0] == e2.edge.agents.mode[0] == ss.Mode.CONTROLLED,
                   "both controlled")
        with caplog.at_level(logging.INFO):
            cut.cut()
            h.wait(lambda d: d["fault"][1] == Fault.CONNECTION, "e2's NDEATH")
            h.stop()
            wait_until(lambda: e2.edge.agents.mode[0] == ss.Mode.AUTONOMOUS, "e2's lease to run out", timeout=30)
            assert e1.edge.agents.mode[0] == RELEASED
            h.host.hand_back_report()
        assert list(h.host.handed_back) == [True, False] and list(h.host.not_handed_back) == [1]
        assert "1 device handed back to their own control (status/mode RELEASED), 1 not at the stop: g1/e2/A " \
               "(edge node e2 sent NDEATH" in caplog.text
        assert "the lease of their last instruction (800 ms) runs out" in caplog.text
        a = e2.edge.agents
        assert a.expiries[0] == 1 and int(a.alarm[0]) & int(ss.Alarm.LEASE_EXPIRED) and a.releases[0] == 0
        assert e1.edge.agents.mode[0] == RELEASED and e1.edge.agents.expiries[0] == 0
        assert "node A: lease of instruction 9 (800 ms) ran out without renewal" in caplog.text
    finally:
        if not h.task.done():
            h.stop()
        e1.stop()
        e2.stop()


class Commander:
    """DCMDs written by hand with the host's account, as any Sparkplug host could send them."""

    def __init__(self, broker, edge: str):
        self.edge = edge
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"commander-{edge}")
        self.c.username_pw_set(HOST_USER, HOST_PW)
        self.c.connect("127.0.0.1", broker.plain_port)
        self.c.loop_start()

    def send(self, seq: int, epoch: int, lease_ms: int = 800, battery_w: float = 10.0, outputs: bool = True) -> None:
        p = sp.Payload(timestamp=int(time.time() * 1000))
        p.metrics.add(name="instruction/seq", datatype=sp.DataType.UInt64, long_value=seq)
        p.metrics.add(name="instruction/lease_ms", datatype=sp.DataType.UInt32, int_value=lease_ms)
        p.metrics.add(name="instruction/epoch", datatype=sp.DataType.UInt64, long_value=epoch)
        if outputs:
            for k in ("battery_w", "bus_w", "served_w", "shed_w"):
                v = battery_w if k == "battery_w" else 0.0
                m = p.metrics.add(name="instruction/" + k, datatype=sp.DataType.Double)
                if math.isnan(v):
                    m.is_null = True
                else:
                    m.double_value = v
        self.c.publish(sp.topic("g1", "DCMD", self.edge, "A"), p.SerializeToString(), qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_what_the_edge_does_with_seq_0(broker, loop, caplog):
    """seq 0 is the hand-back wherever it comes: never an instruction (a node that waits for its first one is
    not put under control with seq 0), accepted within the epoch of the instruction it ends (though its seq is
    lower) or a later one, refused from an earlier epoch (a replay), and checked as any instruction (NaN, the
    lease, half a DCMD). After it, a new instruction takes the node back, with no expiry counted."""
    e = RunningEdge(loop, edge_link(broker, "e3"), "e3")
    a, edge = e.edge.agents, e.edge
    cmd = Commander(broker, "e3")

    def refused(k: int) -> None:
        wait_until(lambda: edge.refused[0] == k, f"{k} refused")

    try:
        wait_until(lambda: edge.connected.is_set(), "the edge connected")
        with caplog.at_level(logging.INFO):
            cmd.send(0, epoch=500)  # nothing to hand back yet: on its own, and still no instruction followed
            wait_until(lambda: a.releases[0] == 1, "the hand-back of a waiting node")
            assert a.mode[0] == RELEASED and a.seq[0] == 0 and a.instructions[0] == 0 and edge.applied[0] == []
            cmd.send(5, epoch=1000, battery_w=-40.0)
            wait_until(lambda: a.mode[0] == ss.Mode.CONTROLLED and a.seq[0] == 5, "instruction 5 followed")
            assert "node A: instruction seq 5 received: controlled again" in caplog.text
            cmd.send(0, epoch=999)  # an earlier controller's stop, replayed: refused, still controlled
            refused(1)
            cmd.send(0, epoch=1000, battery_w=float("nan"))  # a NaN refuses it whole, as any instruction
            refused(2)
            assert int(a.alarm[0]) & int(ss.Alarm.BAD_INSTRUCTION)
            cmd.send(0, epoch=1000, lease_ms=0)  # so does a lease out of range
            refused(3)
            cmd.send(0, epoch=1000, outputs=False)  # and half a DCMD
            refused(4)
            assert a.mode[0] == ss.Mode.CONTROLLED and a.releases[0] == 1
            cmd.send(0, epoch=1000)  # the hand-back of the instruction it follows, seq 0 < 5 as it is
            wait_until(lambda: a.mode[0] == RELEASED, "handed back")
            assert (a.seq[0], edge.epoch[0], a.releases[0], edge.refused[0]) == (5, 1000, 2, 4)
            assert not int(a.alarm[0]) & int(ss.Alarm.BAD_INSTRUCTION | ss.Alarm.LEASE_EXPIRED)
            cmd.send(6, epoch=1000, battery_w=-50.0)  # the controller back: controlled again
            wait_until(lambda: a.mode[0] == ss.Mode.CONTROLLED and a.seq[0] == 6, "instruction 6 followed")
            cmd.send(0, epoch=2000)  # a later epoch's hand-back (a controller started since) is taken
            wait_until(lambda: a.mode[0] == RELEASED, "handed back by a later epoch")
            assert (a.seq[0], edge.epoch[0], a.releases[0], edge.refused[0]) == (6, 1000, 3, 4)
            assert a.expiries[0] == 0 and [s for _e, s in edge.applied[0]] == [5, 6]
    finally:
        cmd.close()
        e.stop()


def test_the_host_never_sends_seq_0_as_an_instruction():
    """seq 0 is the hand-back's alone: an instruction numbered 0 (no scan cycle is) is refused by the host before
    any DCMD could carry it; cycle 1 is an instruction."""
    h = mqtt_driver.Host([("g1", "e1", "A")], Link("127.0.0.1", 1, None, HOST_USER, HOST_PW), host_id="h0",
                         lease_ms=800, command_ms=100, silence_ms=1000)
    out = {k: np.zeros(1) for k in ("battery_w", "bus_w", "served_w", "shed_w")}
    with pytest.raises(ValueError, match=r"instruction seq 0 is the hand-back \(sunspec.RELEASE_SEQ\)"):
        h.set_instruction(0, out)
    assert not h.have_instruction
    h.set_instruction(1, out)
    assert h.have_instruction and h._seq == 1
