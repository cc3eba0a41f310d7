"""When the host sends a DCMD (drivers/mqtt/driver.py `send_due`), through a real Mosquitto: an instruction
within the deadband of the last one sent is not sent, one beyond it is sent at once (not at the next
renewal), an unchanged one is renewed at half the lease so the lease never runs out, a device that births
gets the instruction at once, and every DCMD is acknowledged and matched.

An observer with the controller's account subscribes to the DCMD topics and records what the host sent
(the payload's timestamp is the host's send time). Nothing asserts speed: "at once" is shown with a lease
of a minute, so that no renewal can be what carried a change within the test's waits.
"""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import run_vbatt
from mqtt_support import HOST_PW, HOST_USER, HostRun, RunningEdge, broker, edge_link, loop, wait_until
from vbatt.drivers.faults import Fault
from vbatt.drivers.mqtt import sparkplug as sp
from vbatt.drivers.mqtt.config import MqttDriverConfig

__all__ = ["broker", "loop"]  # the fixtures
pytestmark = pytest.mark.timeout(120)


class Observer:
    """Every DCMD of group g1 as the broker delivers it: (device, host send time ms, {metric: value})."""

    def __init__(self, broker, edge: str):
        self.seen: list[tuple[str, int, dict]] = []
        self.lock = threading.Lock()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"observer-{edge}")
        self.c.username_pw_set(HOST_USER, HOST_PW)
        self.c.on_message = self._on
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.connect("127.0.0.1", broker.plain_port)
        self.c.loop_start()
        self.c.subscribe(sp.topic("g1", "DCMD", edge, "+"), 0)
        assert subscribed.wait(10), "the observer's SUBACK"

    def _on(self, client, userdata, msg) -> None:
        p = sp.Payload.FromString(msg.payload)
        vals = {m.name: sp.get_value(m, m.datatype) for m in p.metrics}
        with self.lock:
            self.seen.append((msg.topic.rsplit("/", 1)[1], p.timestamp, vals))

    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def since(self, k: int) -> list[tuple[str, int, dict]]:
        with self.lock:
            return self.seen[k:]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _one_birth(h: HostRun, loop, broker, edge_id: str, **kw) -> RunningEdge:
    """The edge node started once the host is connected (its rebirth request went to nobody): it births once,
    on its own connect, so no later birth (which sends the instruction again, by rule) falls into the test."""
    wait_until(lambda: h.host.rebirths == 1, "the host connected (and asked an absent edge for a birth)")
    return RunningEdge(loop, edge_link(broker, edge_id), edge_id, **kw)


def test_a_change_beyond_the_deadband_goes_at_once_one_within_it_not_at_all(broker, loop):
    obs = Observer(broker, "e1")
    h = HostRun(loop, broker, [("g1", "e1", "A")], lease_ms=60_000, command_ms=15_000, deadband_w=5.0,
                command_min_ms=50)
    edge = _one_birth(h, loop, broker, "e1", tick=False, period_ms=600_000)
    try:
        h.wait(lambda d: d["fault"][0] == Fault.NONE, "born")
        st, a = h.host.status, edge.edge.agents
        h.instruct(10, battery_w=100.0, served_w=200.0)
        wait_until(lambda: a.seq[0] == 10 and a.cmd["battery_w"][0] == 100.0, "the first instruction applied")
        wait_until(lambda: st["status/ack_seq"][0] == 10 and h.host.rtt_ms[0] > 0, "its acknowledgement matched")
        k = obs.count()
        assert k >= 1 and obs.since(k - 1)[0][2]["instruction/battery_w"] == 100.0
        # the scan moves on with the same instruction, then one within the deadband (4 W on battery_w, 3 W on
        # served_w): the host sends nothing, the node keeps seq 10 and 100 W
        supp = h.host.suppressed
        for seq in range(11, 31):
            h.instruct(seq, battery_w=100.0 if seq < 20 else 104.0, served_w=200.0 if seq < 20 else 197.0)
            time.sleep(0.05)
        wait_until(lambda: h.host.suppressed >= supp + 20, "the scan's instructions taken and held back")
        time.sleep(0.5)  # rounds of send_due (every 50 ms) that could have sent them
        assert obs.since(k) == [] and a.seq[0] == 10 and a.cmd["battery_w"][0] == 100.0
        # beyond the deadband (6 W from the 100 W last sent): sent at once, not 30 s later at the renewal
        h.instruct(31, battery_w=106.0, served_w=197.0)
        wait_until(lambda: a.seq[0] == 31 and a.cmd["battery_w"][0] == 106.0, "the change applied")
        wait_until(lambda: st["status/ack_seq"][0] == 31, "the change acknowledged")
        sent = obs.since(k)
        assert len(sent) == 1 and sent[0][2]["instruction/seq"] == 31, sent
        assert sent[0][2]["instruction/served_w"] == 197.0 and h.host.dcmd["changed"] >= 1
        assert h.host.dcmd["renewed"] == 0
        applied = [s for _e, s in edge.edge.applied[0]]
        assert applied == [10, 31], applied  # in order, none twice, nothing in between
    finally:
        h.stop()
        edge.stop()
        obs.close()


def test_an_unchanged_instruction_is_renewed_at_half_the_lease_which_never_runs_out(broker, loop):
    lease_ms = 1500.0
    obs = Observer(broker, "e2")
    h = HostRun(loop, broker, [("g1", "e2", "A")], lease_ms=lease_ms, command_ms=375, deadband_w=5.0,
                command_min_ms=50)
    edge = _one_birth(h, loop, broker, "e2", tick_ms=100)  # its lease is judged at every tick
    try:
        h.wait(lambda d: d["fault"][0] == Fault.NONE, "born")
        a, st = edge.edge.agents, h.host.status
        h.instruct(100, battery_w=-50.0)
        wait_until(lambda: a.seq[0] == 100 and a.mode[0] == 1, "controlled")
        # the observer's copy of that DCMD can come after the edge applied it (a loaded machine): counted first
        wait_until(lambda: any(v.get("instruction/seq") == 100 for _d, _t, v in obs.since(0)), "the observer saw seq 100")
        k = obs.count()
        seq = 100
        t_end = time.monotonic() + 4.5 * lease_ms / 1e3  # more than four leases of the same instruction
        while time.monotonic() < t_end:
            seq += 1
            h.instruct(seq, battery_w=-50.0)
            time.sleep(0.05)
            assert a.mode[0] == 1 and a.expiries[0] == 0, "the lease ran out on a healthy link"
        sent = obs.since(k)
        assert len(sent) >= 4, sent  # renewals, each with the scan's newest sequence number ...
        assert all(v["instruction/battery_w"] == -50.0 for _d, _t, v in sent)
        seqs = [v["instruction/seq"] for _d, _t, v in sent]
        assert seqs == sorted(set(seqs))
        # ... never sooner than half the lease after the one before (send times on the host's clock, in ms)
        gaps = [t1 - t0 for (_a, t0, _v), (_b, t1, _w) in zip(sent, sent[1:])]
        assert min(gaps) >= lease_ms / 2 - 1, gaps
        assert len(sent) < (seq - 100) / 5  # far fewer DCMDs than the scan's instructions
        assert h.host.dcmd["renewed"] >= len(sent) - 1 and h.host.dcmd["changed"] <= 2
        last = seqs[-1]
        wait_until(lambda: st["status/ack_seq"][0] >= last, "the last renewal acknowledged")
        assert [s for _e, s in edge.edge.applied[0]] == [100, *seqs]  # each DCMD applied once, in order
    finally:
        h.stop()
        edge.stop()
        obs.close()


def test_a_device_that_births_again_gets_the_unchanged_instruction_at_once(broker, loop):
    obs = Observer(broker, "e3")
    h = HostRun(loop, broker, [("g1", "e3", "A")], lease_ms=60_000, command_ms=15_000)
    edge = _one_birth(h, loop, broker, "e3", tick=False, period_ms=600_000)
    try:
        h.wait(lambda d: d["fault"][0] == Fault.NONE, "born")
        h.instruct(7, battery_w=30.0)
        wait_until(lambda: edge.edge.agents.seq[0] == 7, "applied")
        edge.stop()
        h.wait(lambda d: d["fault"][0] == Fault.CONNECTION, "its NDEATH")
        # a new process (nothing accepted yet) births; the instruction did not change, no renewal is due for 30 s
        edge = RunningEdge(loop, edge_link(broker, "e3"), "e3", tick=False, period_ms=600_000)
        a = edge.edge.agents
        assert a.mode[0] == 0
        wait_until(lambda: a.mode[0] == 1 and a.cmd["battery_w"][0] == 30.0, "the instruction after its birth")
        assert h.host.dcmd["birth"] >= 2 and h.host.dcmd["renewed"] == 0
    finally:
        h.stop()
        edge.stop()
        obs.close()


def test_the_deadband_and_the_spacing_are_checked(write_config):
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        MqttDriverConfig(plaintext=True, deadband_w=-1.0)
    with pytest.raises(ValueError, match=r"command_min_ms \(1500\) must be at most a quarter of the lease"):
        MqttDriverConfig(plaintext=True, lease_ms=4000, command_min_ms=1500)
    assert MqttDriverConfig(plaintext=True).deadband_w == 5.0
    p = write_config("drivers:\n  mqtt: {plaintext: true,\n          deadband_w: .nan}\n"
                     "nodes:\n  - {id: A, driver: mqtt, edge_node: e1}\n")
    r = run_vbatt("check", str(p))
    assert r.returncode == 2 and "plant.yaml:3: drivers.mqtt.deadband_w" in " ".join(r.stderr.split()), r.stderr
