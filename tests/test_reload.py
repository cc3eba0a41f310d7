"""Online change with `vbatt reload` against a real running controller."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from conftest import REPO, VBATT, read_json, run_vbatt

PLANT = """\
cycle: {cycle_ms: 10}
plant: {main_limit_w: 100}
nodes:
  - {id: A, priority: 1, demand_w: 200, max_discharge_w: 100, capacity_wh: 1000, soc: 0.8}
  - {id: B, priority: 2, demand_w: 50, max_discharge_w: 150, capacity_wh: 1000, soc: 0.8}
"""


@pytest.mark.slow
def test_reload_applies_priorities_and_limits_and_refuses_what_needs_a_restart(tmp_path):
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(PLANT)
    snap, err = tmp_path / "snap.json", tmp_path / "err.txt"
    run = subprocess.Popen([*VBATT, "run", str(cfg), "-v", "-q", "--duration", "120", "--snapshot", str(snap)],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(err, "w"), start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "real-time setup" not in err.read_text():
            assert run.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.1)
        pid = ["--pid", str(run.pid)]

        new = tmp_path / "new.yaml"
        new.write_text(PLANT.replace("main_limit_w: 100", "main_limit_w: 250").replace("priority: 2", "priority: 7"))
        r = run_vbatt("reload", str(new), *pid)
        assert r.returncode == 0, r.stderr
        assert "applied between two cycles" in r.stdout and "main_limit_w 100 -> 250 W" in r.stdout

        bad = tmp_path / "bad.yaml"
        bad.write_text(PLANT.replace("soc: 0.8}", "soc: 3}"))
        r = run_vbatt("reload", str(bad), *pid)
        assert r.returncode == 2 and f"{bad}:4: nodes[0].soc" in r.stderr

        grown = tmp_path / "grown.yaml"
        grown.write_text(PLANT + "  - {id: C, demand_w: 10}\n")
        r = run_vbatt("reload", str(grown), *pid)
        assert r.returncode == 2 and "refused, nothing changed: the node list changed" in r.stderr

        slower = tmp_path / "slower.yaml"
        slower.write_text(PLANT.replace("cycle_ms: 10", "cycle_ms: 20").replace("main_limit_w: 100", "main_limit_w: 5"))
        r = run_vbatt("reload", str(slower), *pid)
        assert r.returncode == 2 and "needs a restart: cycle.cycle_ms changed" in r.stderr

        r = run_vbatt("reload", str(new), *pid)
        assert r.returncode == 0 and "no change" in r.stdout
    finally:
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 0, err.read_text()
    d = read_json(snap)
    assert d["aggregate"]["main_limit_w"] == 250.0  # the refused configs changed nothing
    assert [n["priority"] for n in d["nodes"]] == [1, 7]


def test_reload_without_a_running_controller(tmp_path):
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(PLANT)
    r = run_vbatt("reload", str(cfg), "--pid", "999999999")
    assert r.returncode == 1 and "no process 999999999" in r.stderr and "Traceback" not in r.stderr
