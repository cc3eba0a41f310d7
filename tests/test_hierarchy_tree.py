"""Three levels of real `vbatt run` processes on 127.0.0.1 (racks -> rows -> top, real Modbus between
them) against a flat controller over the same nodes: the same allocation to 1e-6 W at rest in a
shortage (docs/hierarchy.md)."""

from __future__ import annotations

import pytest

from vbatt.hierarchy.demo import Layout, Tree, compare, write_configs


@pytest.mark.parametrize("share", [0.35, 1.3], ids=["shortage", "spare-main-supply"])
def test_three_level_tree_equals_the_flat_controller(tmp_path, share):
    """In a shortage (a class cut, batteries at their limits) and with main supply to spare (batteries
    charging, split by free room: the battery level inside the curve)."""
    # A lease of several seconds: on a loaded machine a link round took up to 3.5 s, and a rack whose
    # lease ran out just before the stop compared its own fallback allocation with the flat one.
    lay = Layout(rows=2, racks=2, nodes=3, seed=3, cycle_ms=50, poll_ms=100, share=share, lease_ms=4000)
    plan = write_configs(tmp_path, lay)
    tree = Tree(plan, tmp_path)
    try:
        tree.start_all(flat=True)
        levels = [n for n in plan if n.startswith(("rack", "row"))]
        # settled: two more rounds at every level (curves up, levels down), then once more for margin
        tree.settle(levels, 40, 300)  # a cap: a loaded machine is slow to start 9 controllers
    finally:
        tree.stop_all()
    res = compare(plan)
    shed = sum(r["shed_w"]["flat"] for r in res["classes"].values())
    battery = sum(r["battery_w"]["flat"] for r in res["classes"].values())
    if share < 1:
        assert shed > 100.0, "the case must be a shortage (some class cut)"
    else:
        assert battery < -100.0, "with spare main supply the batteries charge"
    assert res["max_node_diff_w"] < 1e-6, res
    assert res["max_class_diff_w"] < 1e-6, res
