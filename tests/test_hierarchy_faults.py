"""Faults across levels with real processes and real Modbus on 127.0.0.1 (docs/hierarchy.md "Leases
across levels"): a rack controller killed with kill -9, then the top controller killed."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from pymodbus.client import ModbusTcpClient

from vbatt.drivers.modbus import sunspec as ss
from vbatt.hierarchy.demo import Layout, Tree, write_configs

pytestmark = pytest.mark.slow  # a tree of real processes, racks and the top killed

MODE = ss.NODE_MAP.at(ss.VENDOR_ID, "Mode").addr


def modes(ports: list[int]) -> list[int]:
    out = []
    for p in ports:
        c = ModbusTcpClient("127.0.0.1", port=p, timeout=1)
        try:
            c.connect()
            r = c.read_holding_registers(MODE, count=1, device_id=1)
            out.append(-1 if r.isError() else r.registers[0])
        finally:
            c.close()
    return out


def test_rack_killed_then_top_killed(tmp_path):
    lay = Layout(rows=2, racks=2, nodes=3, seed=5, cycle_ms=50, poll_ms=100, lease_ms=600, agents=True,
                 retain=True)
    plan = write_configs(tmp_path, lay)
    tree = Tree(plan, tmp_path)
    racks = [n for n in plan if n.startswith("rack")]
    rows = [n for n in plan if n.startswith("row")]
    ports = {r: plan[f"nodes-{r}"]["ports"] for r in racks}
    try:
        tree.start_all(flat=False)
        tree.wait(lambda: tree.controlled(racks + rows), 120, "every rack and row controlled from above")
        assert all(m == ss.Mode.CONTROLLED for r in racks for m in modes(ports[r]))
        own_before = tree.status("top")["subtree"]["own_w"]
        row_own = {c: tree.status(c)["subtree"]["own_w"] for c in rows}

        # -- a rack killed with kill -9 (supervisor, scan, drivers and link at once) -----------------
        tree.kill("rack-00", signal.SIGKILL)
        tree.wait(lambda: all(m == ss.Mode.AUTONOMOUS for m in modes(ports["rack-00"])), 30,
                  "rack-00's nodes autonomous on lease expiry")
        tree.wait(lambda: not tree.status("row-0")["children"]["rack-00"]["online"], 30, "row-0 marks rack-00 offline")
        # the row re-plans without it: its curves leave the sum the top solves
        tree.wait(lambda: tree.status("top")["subtree"]["own_w"] < own_before - 1e-6, 30, "the top re-planned")
        assert tree.status("row-0")["subtree"]["own_w"] < row_own["row-0"] - 1e-6
        assert tree.controlled(["rack-01", "rack-10", "rack-11", "row-1"])
        assert tree.status("row-0")["levels_from"] == "parent"  # still controlled, with one child less
        assert all(m == ss.Mode.CONTROLLED for r in ("rack-01", "rack-10", "rack-11") for m in modes(ports[r]))

        # -- it rejoins, warm (retained state) ---------------------------------------------------------
        tree.start("rack-00", "-v")
        tree.wait(lambda: tree.controlled(racks + rows), 90, "rack-00 controlled again")
        tree.wait(lambda: all(m == ss.Mode.CONTROLLED for m in modes(ports["rack-00"])), 30, "its nodes controlled")
        log = (tmp_path / "rack-00.log").read_text()
        assert "warm restart" in log, log[-2000:]

        # -- the top killed: the rows fall back to their own limits, nothing stranded ------------------
        tree.kill("top", signal.SIGKILL)
        own_limit = {r: __import__("json").loads(Path(plan[r]["config"]).read_text())["plant"]["main_limit_w"]
                     for r in rows}
        tree.wait(lambda: all(not (s := tree.status(r))["leased_from_parent"] and s["fallbacks"] >= 1
                              and s["levels_from"] == "own" and abs(s["main_limit_w"] - own_limit[r]) < 1e-9
                              for r in rows), 30, "rows on their own limits")
        assert all(tree.status(r)["tree_state"] == 2 for r in rows)  # and they say so (alarm TREE_FALLBACK)
        assert tree.controlled(racks)  # the racks follow their rows' levels
        assert all(m == ss.Mode.CONTROLLED for r in racks for m in modes(ports[r]))  # no node stranded

        # -- the top rejoins -----------------------------------------------------------------------------
        tree.start("top")
        tree.wait(lambda: tree.controlled(racks + rows), 90, "the rows controlled by the top again")
        tree.wait(lambda: all(tree.status(r)["tree_state"] == 1 for r in rows), 30, "rows: controlled from above")
    finally:
        tree.stop_all()
    # in each image (the snapshots of the last cycle): the rows and racks controlled from above, the top none
    state = {n: json.loads(Path(plan[n]["snapshot"]).read_text())["aggregate"]["tree_state"] for n in racks + rows}
    assert set(state.values()) == {1}, state
    assert json.loads(Path(plan["top"]["snapshot"]).read_text())["aggregate"]["tree_state"] == 0
