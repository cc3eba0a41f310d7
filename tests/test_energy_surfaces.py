"""The surfaces of the energy layer (issue #12): targets changed at run time (`vbatt reload`, OPC UA),
kept across a restart, and shown per class (live view, OPC UA objects, history, alarm)."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from conftest import REPO, VBATT, read_json, run_vbatt
from vbatt.config.plant import ConfigError, load_config_text

PLANT = """\
cycle: {cycle_ms: 10}
plant:
  main_limit_w: 0
  ride_through_s: {0: 600, 1: 60}
nodes:
  - {id: A, priority: 0, demand_w: 100, max_discharge_w: 500, link_max_w: 500, capacity_wh: 100, soc: 0.6}
  - {id: B, priority: 1, demand_w: 100, max_discharge_w: 500, link_max_w: 500, capacity_wh: 100, soc: 0.6}
programs: [energy, allocation]
"""


def test_targets_without_the_energy_program_are_a_config_error_with_file_line():
    with pytest.raises(ConfigError) as e:
        load_config_text(PLANT.replace("programs: [energy, allocation]", "programs: [allocation]"), "p.yaml")
    msg = str(e.value)
    assert "p.yaml:4: plant.ride_through_s: ride-through targets need the energy program" in msg
    assert "add 'energy' to programs, before the allocation" in msg
    load_config_text(PLANT.replace("  ride_through_s: {0: 600, 1: 60}\n", "").replace(
        "[energy, allocation]", "[allocation]"), "p.yaml")  # no targets, no program: today's behaviour


def _wait_for(err, text, proc, timeout_s=90.0):
    deadline = time.monotonic() + timeout_s
    while text not in err.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.1)


def test_reload_changes_the_targets_between_two_cycles(tmp_path):
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(PLANT)
    snap, err = tmp_path / "snap.json", tmp_path / "err.txt"
    run = subprocess.Popen([*VBATT, "run", str(cfg), "-v", "-q", "--duration", "120", "--snapshot", str(snap)],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(err, "w"), start_new_session=True)
    try:
        _wait_for(err, "real-time setup", run)
        new = tmp_path / "new.yaml"
        new.write_text(PLANT.replace("{0: 600, 1: 60}", "{0: 900}"))
        r = run_vbatt("reload", str(new), "--pid", str(run.pid))
        assert r.returncode == 0, r.stderr
        assert "ride_through_s {0: 600 -> 900 s, 1: none}" in r.stdout, r.stdout
        r = run_vbatt("reload", str(new), "--pid", str(run.pid))
        assert r.returncode == 0 and "no change" in r.stdout
    finally:
        run.send_signal(signal.SIGTERM)
        assert run.wait(30) == 0, err.read_text()
    classes = read_json(snap)["classes"]
    assert [(c["priority"], c["target_s"]) for c in classes] == [(0, 900.0), (1, 0.0)]
