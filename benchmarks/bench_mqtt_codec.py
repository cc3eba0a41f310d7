"""The CPU of one Sparkplug message on each side, without the network: what bounds a controller's rate.

Host (controller): decoding one DDATA of a 1,000-device edge node into the staged arrays
(`Host.on_message`, aliases resolved from the births, under its lock), and encoding one DCMD
(`Host._send`, the publish call replaced by a list append, so paho's own per-message cost is not
in it). Edge: one tick's DDATA of every device (`EdgeNode.report`). The messages are the real ones
an edge node of simulated batteries makes.

    make bench ARGS="-k mqtt_codec"
"""

from __future__ import annotations


import numpy as np
import pytest

from vbatt.config.plant import load_config_text
from vbatt.drivers.mqtt import sparkplug as sp
from vbatt.drivers.mqtt.driver import Host
from vbatt.drivers.mqtt.edge import EdgeNode, Link
from vbatt.drivers.node.agent import AgentSet, AgentSpec
from vbatt.drivers.node.backends.sim import SimBackend

N = 1000


class _Capture:
    connected = True

    def __init__(self):
        self.out: list[tuple[str, bytes]] = []
        self.lost = type("E", (), {"is_set": staticmethod(lambda: False)})()

    def publish(self, topic, payload, qos=0, retain=False):
        self.out.append((topic, payload))
        return True


def _edge():
    _cfg, fleet = load_config_text(f"""
nodes:
  - template: {{count: {N}, id: "n-{{i:04d}}", demand_w: [200, 450], max_discharge_w: [400, 800],
               max_charge_w: [200, 400], capacity_wh: [300, 900], soc: [0.4, 1.0], link_max_w: [500, 1000],
               demand_profile: {{kind: sine, amplitude_w: 60, period_s: 120, noise_w: 15}}}}
""")
    agents = AgentSet(SimBackend(fleet, 0, N), [AgentSpec(i, "127.0.0.1", 0) for i in fleet.ids], tick_ms=1000)
    e = EdgeNode(agents, Link("127.0.0.1", 1, None, None, None), group="g", edge="e", devices=list(fleet.ids))
    e.session = _Capture()
    e.bdseq = 0
    return e, fleet


def test_mqtt_codec_host_decode_ddata(benchmark):
    e, fleet = _edge()
    e.birth()
    births = list(e.session.out)
    e.session.out.clear()
    t = 0
    for _ in range(3):  # three ticks of data: what changed, as a fleet sends it
        t += 1_000_000_000
        e.agents.tick(e.agents.t0_ns + t)
        e.report()
    data = [(tp.encode(), pl) for tp, pl in e.session.out]
    h = Host([("g", "e", d) for d in fleet.ids], Link("127.0.0.1", 1, None, None, None), host_id="b",
             lease_ms=4000, command_ms=1000, silence_ms=5000)
    for tp, pl in births:
        h.on_message(tp.encode(), pl)
    assert (h.fault == 0).all()
    metrics = np.mean([len(sp.Payload.FromString(pl).metrics) for _, pl in data])

    def run():
        for tp, pl in data:
            h.on_message(tp, pl)

    benchmark(run)
    per_us = benchmark.stats.stats.median / len(data) * 1e6
    benchmark.group = "mqtt: per message"
    benchmark.extra_info.update({"messages": len(data), "metrics_per_ddata": float(metrics), "us_per_ddata": per_us,
                                 "ddata_per_core_s": 1e6 / per_us})
    assert (h.fault == 0).all()


def test_mqtt_codec_host_encode_dcmd(benchmark):
    _e, fleet = _edge()
    h = Host([("g", "e", d) for d in fleet.ids], Link("127.0.0.1", 1, None, None, None), host_id="b",
             lease_ms=4000, command_ms=1000, silence_ms=5000)
    h.session = _Capture()
    h.aliases = [{}] * N  # every device born
    h.born[:] = True
    outs = {k: np.linspace(-100, 100, N) for k in ("battery_w", "bus_w", "served_w", "shed_w")}
    h.set_instruction(5, outs)

    def run():
        h._send(np.arange(N), 1.0)

    benchmark(run)
    per_us = benchmark.stats.stats.median / N * 1e6
    benchmark.group = "mqtt: per message"
    benchmark.extra_info.update({"us_per_dcmd": per_us, "dcmd_bytes": len(h.session.out[-1][1])})


def test_mqtt_codec_edge_report(benchmark):
    e, _fleet = _edge()
    e.birth()
    state = {"t": 0}

    def run():
        state["t"] += 1_000_000_000
        e.agents.tick(e.agents.t0_ns + state["t"])
        e.session.out.clear()
        return e.report()

    benchmark(run)
    benchmark.group = "mqtt: per message"
    benchmark.extra_info.update({"us_per_device_tick": benchmark.stats.stats.median / N * 1e6})


if __name__ == "__main__":
    pytest.main([__file__, "--benchmark-enable", "-q", "-s"])
