"""A parent that stops in order hands its children's levels back (docs/hierarchy.md "Leases across levels"):
real processes, real Modbus on 127.0.0.1, a leaf under a top. The hand-back leaves the leaf on its own at
once with no fallback counted and no TREE_FALLBACK (tree_state 3); the parent's next levels take it back;
a parent killed with kill -9 still lets the lease run out, counted as a fallback (tree_state 2)."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest

from vbatt.hierarchy.demo import Tree
from vbatt.hierarchy.wire import HAND_BACK_LEASE_MS, HAND_BACK_SEQ, TreeLayout
from vbatt.kernel.ports import free_ports
from vbatt.programs.hierarchy.curves import Levels

pytestmark = pytest.mark.slow  # two controllers of real processes, the parent stopped, restarted and killed

LEASE_MS = 1000
NO_LEVELS = Levels({c: math.nan for c in range(8)}, math.nan, False)


def _plan(tmp_path: Path) -> dict:
    """A top over one leaf (3 nodes), every link and poll 100 ms, the levels' lease LEASE_MS."""
    port = free_ports(1)[0]
    base = {"cycle": {"cycle_ms": 50, "realtime": False}, "retain": {"enabled": False}}
    node = lambda i, p: {"id": f"n{i}", "priority": p, "demand_w": 300.0, "max_discharge_w": 200.0,  # noqa: E731
                         "max_charge_w": 100.0, "capacity_wh": 1e8, "soc": 0.6, "link_max_w": 1000.0}
    hier = lambda name: {"poll_ms": 100, "lease_ms": LEASE_MS, "status_file": str(tmp_path / f"{name}.status.json")}  # noqa: E731
    leaf = {**base, "plant": {"main_limit_w": 250.0},
            "hierarchy": {**hier("leaf"), "uplink": {"port": port, "plaintext": True}},
            "nodes": [node(i, i) for i in range(3)], "programs": ["allocation", "tree"]}
    top = {**base, "plant": {"main_limit_w": 400.0},
           "drivers": {"modbus": {"poll_ms": 100, "plaintext": True, "lease_ms": LEASE_MS}},
           "hierarchy": {**hier("top"), "children": ["leaf"]},
           "nodes": [{"id": "leaf", "driver": "modbus", "host": "127.0.0.1", "port": port}],
           "programs": ["allocation"]}
    plan = {}
    for name, cfg in (("leaf", leaf), ("top", top)):
        (tmp_path / f"{name}.yaml").write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        plan[name] = {f: str(tmp_path / f"{name}.{f}.json") for f in ("status", "snapshot")}
        plan[name]["config"] = str(tmp_path / f"{name}.yaml")
    return plan


def _under_top(tree: Tree) -> bool:
    return tree.controlled(["leaf"]) and tree.status("leaf")["tree_state"] == 1


def test_a_parent_that_stops_in_order_hands_the_levels_back_and_one_killed_lets_them_lapse(tmp_path):
    plan = _plan(tmp_path)
    tree = Tree(plan, tmp_path)
    try:
        tree.start("leaf", "-v")
        tree.start("top", "-v")
        tree.wait(lambda: _under_top(tree), 120, "the leaf controlled from above")
        before = tree.status("leaf")["fallbacks"]  # a lease may run out on a loaded machine before this

        # -- the top stops in order: the leaf on its own at once, no fallback, no alarm ------------------------
        tree.kill("top", signal.SIGTERM)
        tree.wait(lambda: (s := tree.status("leaf"))["tree_state"] == 3 and s["hand_backs"] == 1
                  and s["levels_from"] == "none" and not s["leased_from_parent"] and s["main_limit_w"] == 250.0,
                  30, "the leaf on its own, handed back")
        # two leases of its own cycles later (50 ms each) the levels' lease would long have run out: it has none
        at = tree.status("leaf")["cycle"]
        tree.wait(lambda: tree.status("leaf")["cycle"] > at + 2 * LEASE_MS / 50, 60, "two leases of cycles")
        s = tree.status("leaf")
        assert (s["fallbacks"], s["tree_state"], s["hand_backs"]) == (before, 3, 1), s
        log = (tmp_path / "leaf.log").read_text()
        assert log.count("parent handed the levels back") == 1, log[-3000:]
        assert "parent stopped renewing the levels" not in log.split("parent handed the levels back")[1]
        assert "levels handed back to 1 child: leaf" in (tmp_path / "top.log").read_text()

        # -- the top comes back: its levels take the leaf under it again ---------------------------------------
        tree.start("top")
        tree.wait(lambda: _under_top(tree), 120, "the leaf controlled from above again")

        # -- the top killed with kill -9: no hand-back, the lease runs out and counts --------------------------
        fallbacks = tree.status("leaf")["fallbacks"]
        tree.kill("top", signal.SIGKILL)
        tree.wait(lambda: (s := tree.status("leaf"))["tree_state"] == 2 and s["fallbacks"] == fallbacks + 1
                  and s["main_limit_w"] == 250.0, 30, "the leaf's fallback after the lease")
        assert tree.status("leaf")["hand_backs"] == 1
        assert "parent stopped renewing the levels (lease ran out)" in (tmp_path / "leaf.log").read_text()
    finally:
        tree.stop_all()
    # the image's aggregate (the OPC UA variable tree_state; TREE_FALLBACK is active at 2 only)
    assert json.loads(Path(plan["leaf"]["snapshot"]).read_text())["aggregate"]["tree_state"] == 2


def test_the_leaf_shows_the_hand_back_in_its_image_and_takes_levels_again(tmp_path):
    """The hand-back as the parent's link writes it, straight to a leaf's uplink: tree_state 3 in the image
    (no TREE_FALLBACK), and an ordinary write after it is taken (its LvSeq starts again at 1)."""
    from pymodbus.client import ModbusTcpClient

    plan = _plan(tmp_path)
    port = json.loads(Path(plan["leaf"]["config"]).read_text())["hierarchy"]["uplink"]["port"]
    tree = Tree(plan, tmp_path)
    t = TreeLayout(8, 1024)
    lv = Levels({0: -np.inf, 1: -np.inf, 2: 0.5}, 1e-5, True)
    back = t.encode_levels(NO_LEVELS, HAND_BACK_SEQ, HAND_BACK_LEASE_MS)  # the hand-back as docs/modbus.md spells it
    try:
        tree.start("leaf")
        tree.wait(lambda: (s := tree.status("leaf")) is not None and s["cycle"] > 5, 60, "the leaf runs")
        c = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
        assert c.connect()
        # a lease long enough for any machine: only the hand-back can end it within this test
        assert not c.write_registers(t.levels_at, t.encode_levels(lv, 1, 3_600_000), device_id=1).isError()
        tree.wait(lambda: tree.status("leaf")["tree_state"] == 1, 30, "levels taken")
        assert not c.write_registers(t.levels_at, back, device_id=1).isError()
        tree.wait(lambda: (s := tree.status("leaf"))["tree_state"] == 3 and s["levels_from"] == "none", 30,
                  "handed back")
        assert not c.write_registers(t.levels_at, t.encode_levels(lv, 1, 3_600_000), device_id=1).isError()
        tree.wait(lambda: (s := tree.status("leaf"))["tree_state"] == 1 and s["levels"]["shed"]["2"] == 0.5, 30,
                  "levels taken again after the hand-back")
        assert not c.write_registers(t.levels_at, back, device_id=1).isError()
        tree.wait(lambda: tree.status("leaf")["tree_state"] == 3, 30, "handed back again")
        s = tree.status("leaf")
        assert (s["fallbacks"], s["hand_backs"]) == (0, 2), s
        c.close()
    finally:
        tree.stop_all()
    assert json.loads(Path(plan["leaf"]["snapshot"]).read_text())["aggregate"]["tree_state"] == 3


def test_the_hand_back_is_no_levels_to_a_child_without_it_and_no_renewal_is_ever_one():
    t = TreeLayout(8, 1024)
    assert t.encode_hand_back() == t.encode_levels(NO_LEVELS, HAND_BACK_SEQ, HAND_BACK_LEASE_MS)
    seq, lease, lv = t.decode_levels(t.encode_hand_back() + [0] * t.dec_len)
    assert (seq, lease) == (HAND_BACK_SEQ, HAND_BACK_LEASE_MS) and t.is_hand_back(seq, lease)
    # what a child before the hand-back checks of a levels write (link.py _parent_levels): refused, so its
    # lease runs out as it did
    assert not (0 < lease <= 3_600_000) and math.isnan(lv.lam) and all(math.isnan(m) for m in lv.shed.values())
    assert lv.energy is None
    assert [t.next_seq(s) for s in (0, 1, 0xFFFFFFFE, 0xFFFFFFFF)] == [1, 2, 0xFFFFFFFF, 1]
