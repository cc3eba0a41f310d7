"""Retentive state through real runs: settings survive a restart, warm or cold, and say which."""

from __future__ import annotations

import time

import pytest

from vbatt.config.plant import load_config_text
from vbatt.kernel.image import Ctl, Mode, Op, ScanState
from vbatt.supervise.supervisor import Supervisor

pytestmark = pytest.mark.slow  # controllers started, killed and restarted

PLANT = """\
cycle: {cycle_ms: 10}
plant: {main_limit_w: 100}
retain: {enabled: true, dir: '%s', period_s: 0.2}
nodes:
  - {id: A, priority: 1, demand_w: 200, max_discharge_w: 100, capacity_wh: 1000, soc: 0.8}
  - {id: B, priority: 2, demand_w: 50, max_discharge_w: 150, capacity_wh: 1000, soc: 0.8}
"""


def _run(text: str, cold: bool = False, act=None) -> tuple[Supervisor, dict]:
    cfg, fleet = load_config_text(text, "plant.yaml")
    sup = Supervisor(cfg, fleet, cold=cold)
    img = sup.start()
    try:
        deadline = time.monotonic() + 60
        while img.ctl[Ctl.STATE] != ScanState.RUNNING or img.ctl[Ctl.CYCLES] < 3:
            assert sup.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        if act:
            act(img)
        views, _ = img.read_published()
        seen = {"priority": views["node.priority"].tolist(), "main_limit_w": float(views["agg.main_limit_w"][0]),
                "mode": int(img.ctl[Ctl.MODE])}
    finally:
        sup.stop()
        sup.close()
    return sup, seen


def _settle(img, ticket: int) -> None:
    deadline = time.monotonic() + 10
    while img.commands.applied(0) < ticket or img.pub.seq < 5:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)  # a few cycles published and one retain poll


def test_operator_settings_survive_a_restart(tmp_path):
    text = PLANT % tmp_path

    def operate(img):
        img.commands.push(0, Op.SET_PRIORITY, node=0, value=5)
        t = img.commands.push(0, Op.SET_MAIN_LIMIT, value=777.0)
        _settle(img, t)

    first, seen = _run(text, act=operate)
    assert first.restart_line == f"first start: no retained state yet in {tmp_path}"
    assert seen == {"priority": [5, 2], "main_limit_w": 777.0, "mode": Mode.RUN}
    assert (tmp_path / "state.bin").exists()

    again, seen = _run(text)
    assert again.restart_line.startswith("warm restart: all retained state restored")
    assert seen == {"priority": [5, 2], "main_limit_w": 777.0, "mode": Mode.RUN}

    cold, seen = _run(text, cold=True)
    assert cold.restart_line.startswith("cold restart: operator settings restored")
    assert seen["priority"] == [5, 2] and seen["main_limit_w"] == 777.0


def test_a_changed_node_list_restores_settings_by_id_only(tmp_path):
    def operate(img):
        t = img.commands.push(0, Op.SET_PRIORITY, node=1, value=9)
        _settle(img, t)

    _run(PLANT % tmp_path, act=operate)
    changed = (PLANT % tmp_path).replace("  - {id: A,", "  - {id: C, priority: 0, demand_w: 1}\n  - {id: A,")
    sup, seen = _run(changed)
    assert sup.restart_line.startswith("cold restart: operator settings restored")
    assert "node list changed (2 saved, 3 configured)" in sup.restart_line
    assert seen["priority"] == [0, 1, 9]  # C new (config), A and B by id


def test_a_corrupt_file_is_reported_and_the_previous_copy_used(tmp_path):
    def operate(img):
        t = img.commands.push(0, Op.SET_MAIN_LIMIT, value=321.0)
        _settle(img, t)

    _run(PLANT % tmp_path, act=operate)
    assert (tmp_path / "state.bin.prev").exists()
    data = bytearray((tmp_path / "state.bin").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "state.bin").write_bytes(bytes(data))
    sup, seen = _run(PLANT % tmp_path)
    assert "bad_checksum" in sup.restart_line or "checksum" in sup.restart_line
    assert sup.restart_line.startswith("warm restart")
    assert seen["main_limit_w"] == 321.0
