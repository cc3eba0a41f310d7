"""The uplink of a controller (docs/modbus.md "The uplink"): a standard SunSpec walk sees common, 802,
the vendor model and the tree model; levels written with a lease are applied, and their expiry puts
the controller back on its own main_limit_w. Bad `hierarchy:` sections are refused with file:line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pymodbus.client import ModbusTcpClient

from test_sunspec import SPEC_1, SPEC_802
from vbatt.config.plant import load_config_text
from vbatt.config.yamlsrc import ConfigError
from vbatt.drivers.modbus import sunspec as ss
from vbatt.kernel.ports import free_ports
from vbatt.hierarchy.wire import TREE_ID, TreeLayout
from vbatt.programs.hierarchy.curves import Levels, apply_levels, node_limits

LEAF = """
cycle: {{cycle_ms: 50, realtime: false}}
plant: {{main_limit_w: 250}}
hierarchy:
  uplink: {{port: {port}, plaintext: true, feeder_w: 5000}}
  status_file: {status}
  poll_ms: 50
nodes:
  - {{id: a, priority: 0, demand_w: 400, max_discharge_w: 100, max_charge_w: 100, capacity_wh: 1.0e8, soc: 0.8, link_max_w: 1000}}
  - {{id: b, priority: 2, demand_w: 300, max_discharge_w: 300, max_charge_w: 100, capacity_wh: 2.0e8, soc: 0.6, link_max_w: 1000}}
programs: [allocation, tree]
"""


def _regs(c, addr, n):
    out = []
    for a in range(addr, addr + n, 120):
        r = c.read_holding_registers(a, count=min(120, addr + n - a), device_id=1)
        assert not r.isError(), r
        out += r.registers
    return out


def _status(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _wait(cond, timeout_s, what):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def _start_leaf(tmp_path):
    """A leaf controller (`vbatt run` of LEAF) with its uplink on a free port; its stderr in leaf.log."""
    port = free_ports(1)[0]
    status = tmp_path / "leaf.status.json"
    cfg = tmp_path / "leaf.yaml"
    cfg.write_text(LEAF.format(port=port, status=status))
    snap = tmp_path / "leaf.snapshot.json"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("vbatt")), "run", str(cfg), "-q", "--snapshot",
                             str(snap)], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "leaf.log", "wb"),
                            start_new_session=True)
    return port, status, snap, proc


def test_uplink_sunspec_walk_levels_lease_and_fallback(tmp_path):
    port, status, snap, proc = _start_leaf(tmp_path)
    try:
        _wait(lambda: (s := _status(status)) is not None and s["cycle"] > 5, 60, "the leaf runs")
        c = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
        assert c.connect()
        # -- a standard SunSpec walk: marker, then (ID, L) until the end model -------------------------
        assert _regs(c, 40000, 2) == list(ss.SUNS)
        addr, chain = 40002, []
        while True:
            mid, length = _regs(c, addr, 2)
            if mid == ss.END_ID:
                break
            chain.append((mid, addr, length))
            addr += 2 + length
        assert [m for m, _, _ in chain] == [1, 802, ss.VENDOR_ID, TREE_ID]
        common = _regs(c, chain[0][1] + 2, 66)
        o, n = SPEC_1["Mn"]
        assert ss.decode_string(common[o:o + n]) == "vbatt"
        o, n = SPEC_1["Md"]
        assert ss.decode_string(common[o:o + n]) == "vbatt-controller"
        bat = _regs(c, chain[1][1] + 2, 62)
        sf = lambda v: v - 0x10000 if v >= 0x8000 else v  # noqa: E731
        soc = bat[SPEC_802["SoC"]] * 10.0 ** sf(bat[SPEC_802["SoC_SF"]])
        dis = bat[SPEC_802["WDisChaRteMax"]] * 10.0 ** sf(bat[SPEC_802["WChaDisChaMax_SF"]])
        # the aggregate battery: energy-weighted SoC (%), the sum of what the batteries may give
        assert soc == pytest.approx(100 * (0.8 * 1e8 + 0.6 * 2e8) / 3e8, abs=0.01)
        assert dis == pytest.approx(400.0, abs=1.0)

        # -- levels written as a parent's link does, with a short lease ----------------------------------
        t = TreeLayout(8, 1024)
        lv = Levels({0: -np.inf, 2: 0.5}, 1e-5, True)
        assert not c.write_registers(t.levels_at, t.encode_levels(lv, 7, 1500), device_id=1).isError()
        # one status that shows them applied under the lease (no sleep: a loaded machine may be slow to
        # show it, and the lease may then be over: written again below until seen)
        seen = lambda: ((s := _status(status))["levels_from"] == "parent" and s["leased_from_parent"]  # noqa: E731
                        and s["levels"]["shed"]["2"] == 0.5 and s["tree_state"] == 1)
        end, seq, renewed = time.monotonic() + 30, 7, 0
        while not seen():
            assert time.monotonic() < end, ("levels applied under their lease", _status(status))
            if _status(status)["fallbacks"] > renewed:  # the lease ran out before a round showed it: renew
                seq, renewed = seq + 1, _status(status)["fallbacks"]
                assert not c.write_registers(t.levels_at, t.encode_levels(lv, seq, 1500), device_id=1).isError()
            time.sleep(0.05)
        fallbacks = _status(status)["fallbacks"]
        # the lease runs out: back on the configured main_limit_w, said in the log and the status
        _wait(lambda: (s := _status(status))["fallbacks"] == fallbacks + 1 and s["main_limit_w"] == 250.0
              and s["levels_from"] == "none", 20, "fallback to the own limit")
        log = (tmp_path / "leaf.log").read_text()
        assert "parent stopped renewing the levels" in log and "own main_limit_w 250.0 W" in log
        assert _status(status)["tree_state"] == 2
        c.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    # and in the image: the snapshot's aggregate tree_state (the OPC UA variable, its TREE_FALLBACK alarm)
    agg = json.loads(snap.read_text())["aggregate"]
    assert agg["tree_state"] == 2 and agg["main_limit_w"] == 250.0


def test_levels_applied_by_the_tree_program_are_the_curve_answer(tmp_path):
    """While leased, the scan's outputs are apply_levels on the limits the allocation used."""
    port, status, snap, proc = _start_leaf(tmp_path)
    lv = Levels({0: -np.inf, 2: 0.25}, 1.5e-6, True)
    t = TreeLayout(8, 1024)
    try:
        _wait(lambda: (s := _status(status)) is not None and s["cycle"] > 5, 60, "the leaf runs")
        c = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
        assert c.connect()
        for seq in range(1, 12):  # renewed, as a parent does every poll
            assert not c.write_registers(t.levels_at, t.encode_levels(lv, seq, 3000), device_id=1).isError()
            time.sleep(0.1)
        c.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    nodes = json.loads(snap.read_text())["nodes"]
    col = lambda k: np.array([nd[k] for nd in nodes], float)  # noqa: E731
    nl = node_limits(col("priority").astype(int), col("demand_w"), col("lo_w"), col("hi_w"), col("link_max_w"),
                     col("soc"), col("capacity_wh"))
    want = apply_levels(nl, lv)
    for k, v in want.items():
        assert np.max(np.abs(col(k) - v)) < 1e-9, k
    assert col("shed_w")[1] == pytest.approx(0.25 * 300.0)  # class 2 shed at its level: mu * demand


def test_the_parents_standard_instruction_becomes_the_main_limit_until_its_lease_runs_out(tmp_path):
    """A parent that sends no levels (one weight per child): its BusW is the child's share of the feed."""
    port = free_ports(1)[0]
    status = tmp_path / "leaf.status.json"
    cfg = tmp_path / "leaf.yaml"
    cfg.write_text(LEAF.format(port=port, status=status))
    proc = subprocess.Popen([str(Path(sys.executable).with_name("vbatt")), "run", str(cfg), "-q"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "leaf.log", "wb"),
                            start_new_session=True)
    codec = ss.CODEC
    try:
        _wait(lambda: (s := _status(status)) is not None and s["cycle"] > 5, 60, "the leaf runs")
        assert _status(status)["main_limit_w"] == 250.0
        c = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
        assert c.connect()
        rows = np.zeros((1, ss.NODE_MAP.size), np.uint16)
        codec.encode_instruction(rows, [3], [1200], {"battery_w": np.array([150.0]), "bus_w": np.array([420.0]),
                                                     "served_w": np.array([570.0]), "shed_w": np.array([130.0])})
        block = rows[0, codec.instr_first - ss.NODE_MAP.base:codec.instr_end - ss.NODE_MAP.base].tolist()
        assert not c.write_registers(codec.instr_first, block, device_id=1).isError()
        _wait(lambda: (s := _status(status))["main_limit_w"] == 420.0 and s["uplink_mode"] == "CONTROLLED", 10,
              "BusW as the main limit")
        c.close()
        _wait(lambda: (s := _status(status))["main_limit_w"] == 250.0 and s["uplink_mode"] == "AUTONOMOUS", 10,
              "back on the configured limit when the lease runs out")
        assert "ran out without renewal" in (tmp_path / "leaf.log").read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


@pytest.mark.parametrize("text, needle", [
    ("hierarchy: {children: [a]}\nnodes: [{id: a, demand_w: 1}]\nprograms: [allocation]\n",
     "'a' is not a node with 'driver: modbus'"),
    ("hierarchy: {uplink: {port: 0, plaintext: true}}\nnodes: [{id: a, demand_w: 1}]\nprograms: [allocation]\n",
     "list 'tree' after 'allocation'"),
    ("hierarchy: {uplink: {port: 0}}\nnodes: [{id: a, demand_w: 1}]\nprograms: [allocation, tree]\n",
     "plaintext: true"),
    ("hierarchy: {uplink: {port: 0, plaintext: true}, colour: red}\nnodes: [{id: a, demand_w: 1}]\n"
     "programs: [allocation, tree]\n", "colour: unknown key"),
])
def test_bad_hierarchy_sections_are_refused_with_their_line(text, needle):
    with pytest.raises(ConfigError) as e:
        load_config_text(text, "plant.yaml")
    msg = str(e.value)
    assert needle in msg and "plant.yaml:" in msg, msg


def test_the_uplink_serves_modbus_tcp_security_to_a_parent_with_the_right_certificate(tmp_path):
    """`hierarchy.uplink.tls`: the leaf serves its virtual battery over mutual TLS (as `vbatt node`); a
    parent's poller with a certificate of the same CA reads it, one with a plaintext link or another
    CA's certificate gets nothing."""
    import asyncio

    from test_modbus_support import endpoint, poll_for, poller
    from vbatt.drivers.certs import client_context, create_ca, issue, make_fleet_certs
    from vbatt.drivers.faults import Fault

    certs = make_fleet_certs(tmp_path / "pki", 1)
    rogue_ca = create_ca(tmp_path / "rogue", "rogue CA")
    rogue = issue(rogue_ca, tmp_path / "rogue", "controller")
    n = certs["node-0"]
    port = free_ports(1)[0]
    status = tmp_path / "leaf.status.json"
    cfg = tmp_path / "leaf.yaml"
    cfg.write_text(LEAF.format(port=port, status=status).replace(
        "plaintext: true", f"tls: {{ca: {certs['ca'].cert}, cert: {n.cert}, key: {n.key}}}"))
    proc = subprocess.Popen([str(Path(sys.executable).with_name("vbatt")), "run", str(cfg), "-q"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "leaf.log", "wb"), start_new_session=True)

    async def poll(ctx, plaintext=False, want=None):
        """Poll until the node's fault is `want` (None: one second), for 30 s at most: on a loaded machine
        a handshake can take longer than a second, and until it ends the node is only "not connected"."""
        p = poller([endpoint(port, "leaf", plaintext=plaintext)], contexts=[ctx], timeout_ms=1000)
        for _ in range(30):
            await poll_for(p, 1.0)
            staged, faults, reasons = p.decode()
            if want is None or (int(faults[0]) == want and (want != 0 or p.requests[0] >= 2)):
                break
        await p.close()
        return int(faults[0]), reasons[0], int(p.requests[0]), staged

    try:
        _wait(lambda: (s := _status(status)) is not None and s["cycle"] > 5, 60, "the leaf runs")
        c = certs["controller"]
        fault, reason, requests, staged = asyncio.run(poll(client_context(certs["ca"].cert, c.cert, c.key), want=0))
        assert fault == 0 and requests >= 2, reason
        assert staged["demand_w"][0] == pytest.approx(700.0, abs=1.0)  # the leaf's two nodes, 400 + 300 W
        fault, reason, _, _ = asyncio.run(poll(client_context(certs["ca"].cert, rogue.cert, rogue.key),
                                               want=Fault.TLS))
        assert fault == Fault.TLS, reason
        fault, _, _, _ = asyncio.run(poll(None, plaintext=True))
        assert fault != 0  # a plaintext client reads nothing from a TLS listener
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_an_uplink_tls_file_that_does_not_exist_is_refused_with_its_line(tmp_path):
    text = ("hierarchy:\n  uplink:\n    port: 0\n    tls: {ca: /nonexistent/ca.pem, cert: /nonexistent/c.pem, "
            "key: /nonexistent/c.key}\nnodes: [{id: a, demand_w: 1}]\nprograms: [allocation, tree]\n")
    with pytest.raises(ConfigError) as e:
        load_config_text(text, "plant.yaml")
    assert "plant.yaml:4" in str(e.value) and "hierarchy.uplink.tls.ca" in str(e.value), str(e.value)
