"""`vbatt fleet` and the embedded fleet of `vbatt run` (the default run goes over real Modbus)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymodbus.client import ModbusTcpClient

from test_modbus_support import V, point
from vbatt.config.plant import ConfigError, default_config_path, load_config, load_config_text
from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.modbus.config import embedded_indices, modbus_endpoints
from vbatt.kernel.ports import free_ports

REPO = Path(__file__).resolve().parents[1]


def vbatt(*args, **kw):
    return subprocess.run([sys.executable, "-m", "vbatt.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=kw.pop("timeout", 120), **kw)


def test_vbatt_fleet_serves_n_agents_on_consecutive_ports(tmp_path):
    base = free_ports(5, consecutive=True)[0]
    ready = tmp_path / "ready"
    p = subprocess.Popen([sys.executable, "-m", "vbatt.cli", "fleet", "--nodes", "5", "--base-port", str(base),
                          "--ready-file", str(ready)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), p.communicate(timeout=5)
        ports = [int(x) for x in ready.read_text().split()]
        assert ports == [base + k for k in range(5)]
        c = ModbusTcpClient("127.0.0.1", port=ports[3], timeout=2)
        assert c.connect()
        assert c.read_holding_registers(40000, count=2, device_id=1).registers == [0x5375, 0x6E53]
        common = c.read_holding_registers(40004, count=66, device_id=1).registers
        assert ss.decode_string(common[48:64]) == "node-00003"
        vend = c.read_holding_registers(40136, count=40, device_id=1).registers
        assert 200 - 60 - 100 <= point(vend, 40136, V, "DemandW") <= 450 + 60 + 100  # template range + sine
        c.close()
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=10)
    assert p.returncode == 0


def test_fleet_usage_errors():
    r = vbatt("fleet")
    assert r.returncode == 2 and "either CONFIG or --nodes" in r.stderr
    r = vbatt("fleet", "--nodes", "10", "--base-port", "65530")
    assert r.returncode == 2 and "--base-port must be in [1, 65526]" in r.stderr


def test_embedded_fleet_config_is_a_few_lines_and_validated():
    cfg, fleet = load_config(default_config_path())
    idx = embedded_indices(cfg, fleet)
    assert len(idx) == 100 and fleet.drivers[idx[0]] == "modbus"
    eps = modbus_endpoints(cfg, fleet)
    assert all(eps[i].port == 0 and eps[i].embedded == k for k, i in enumerate(idx))  # free ports, rendezvous
    with pytest.raises(ConfigError, match="drivers.modbus: .*either .tls. .* or .plaintext: true., not both"):
        load_config_text("drivers: {modbus: {plaintext: true, tls: {ca: a, cert: b, key: c}}}\nnodes: [{id: a}]\n")
    with pytest.raises(ConfigError, match="template.driver"):
        load_config_text("nodes: [{template: {count: 2, id: 'n{i}', driver: opcua}}]\n")
    # a port range past 65535 is a config error at `vbatt check`, with its line, not a driver failure later
    with pytest.raises(ConfigError, match=r"^plant.yaml:1: drivers.modbus: .*runs past port 65535"):
        load_config_text("drivers: {modbus: {plaintext: true, embedded_fleet: {base_port: 65500}}}\n"
                         "nodes: [{template: {count: 100, id: 'n{i}', driver: modbus}}]\n", "plant.yaml")


@pytest.mark.slow
def test_run_with_an_embedded_fleet_over_modbus(tmp_path):
    plant = tmp_path / "plant.yaml"
    plant.write_text("""
cycle: {cycle_ms: 10, realtime: false}
plant: {main_limit_w: 0, stale_ms: 500}
drivers:
  modbus: {poll_ms: 100, plaintext: true, embedded_fleet: {tick_ms: 50}}
nodes:
  - {id: local, demand_w: 100, max_discharge_w: 0, capacity_wh: 100, soc: 0.5, link_max_w: 500}
  - template: {count: 12, id: "srv-{i:02d}", driver: modbus, demand_w: 50, max_discharge_w: 200,
               capacity_wh: 1000, soc: 0.9, link_max_w: 500}
programs: [allocation]
""")
    snap = tmp_path / "snap.json"
    r = vbatt("run", str(plant), "--duration", "5", "--snapshot", str(snap), "-q")
    assert r.returncode == 0, r.stderr
    s = json.loads(snap.read_text())
    nodes = {n["id"]: n for n in s["nodes"]}
    srv = [n for k, n in nodes.items() if k.startswith("srv-")]
    assert all(n["online"] == 1 and n["fault"] == 0 and n["io_requests"] >= 10 for n in srv)
    # the sim node has no battery of its own: the Modbus nodes cover its 100 W over the bus
    assert nodes["local"]["bus_w"] == pytest.approx(100.0, abs=1.0)
    assert sum(n["bus_w"] for n in srv) == pytest.approx(-100.0, abs=1.0)


def test_ctrl_c_stops_the_controller_before_its_embedded_fleet(tmp_path):
    """Ctrl-C reaches every process of the terminal's group at once; the supervisor orders the stop, so the
    embedded fleet outlives the drivers: their last instructions reach its nodes, no link is refused, and each
    node is handed back (no lease is left to run out behind the stop, docs/modbus.md)."""
    plant = tmp_path / "plant.yaml"
    # a lease that no stall of a loaded machine lets lapse while running: a lapse logged after the Ctrl-C is the
    # stop's (before the hand-back the fleet, stopped last, saw every lease of the last instructions run out)
    plant.write_text("""
cycle: {cycle_ms: 10, realtime: false}
plant: {main_limit_w: 0, stale_ms: 500}
drivers:
  modbus: {poll_ms: 50, timeout_ms: 500, lease_ms: 3000, plaintext: true, embedded_fleet: {tick_ms: 50}}
nodes:
  - template: {count: 8, id: "srv-{i:02d}", driver: modbus, demand_w: 50, max_discharge_w: 200,
               capacity_wh: 1000, soc: 0.9, link_max_w: 500}
programs: [allocation]
""")
    err = tmp_path / "stderr.txt"
    out = tmp_path / "stdout.txt"
    proc = subprocess.Popen([sys.executable, "-m", "vbatt.cli", "run", str(plant), "-v", "--duration", "120"],
                            cwd=REPO, stdout=open(out, "w"), stderr=open(err, "w"), start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while "data again" not in err.read_text():  # the links have their nodes
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        before = len(err.read_text())
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
        assert proc.wait(60) == 0, err.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    after = err.read_text()[before:]
    assert "stop requested" in out.read_text() + after, (out.read_text(), after)
    assert "CONNECTION" not in after and "Traceback" not in after, after
    assert "8 nodes handed back to their own control (Mode RELEASED)" in after, after
    assert "ran out" not in after and "not handed back" not in after, after
