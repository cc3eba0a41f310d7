"""`vbatt run` as a user runs it: real processes, real shared memory, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vbatt.kernel.fields import AGGREGATES, NODE_FIELDS
from vbatt.kernel.shm import SHM_DIR
from conftest import REPO, VBATT, read_json, run_vbatt

SEED = REPO / "examples" / "seed.yaml"


def _session_pids(sid: int) -> list[int]:
    """Processes still alive in the session started for the run."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: session id
                out.append(int(d.name))
    return out


def _segments(pid: int) -> list[str]:
    return [p.name for p in SHM_DIR.glob(f"vbatt-{pid}-*")]


def test_n_cycles_give_n_in_stats_and_a_full_snapshot(tmp_path):
    stats, snap = tmp_path / "stats.json", tmp_path / "snap.json"
    r = run_vbatt("run", str(SEED), "--cycles", "25", "--stats-json", str(stats), "--snapshot", str(snap))
    assert r.returncode == 0, r.stderr
    s = read_json(stats)
    assert s["cycles"] == 25
    assert s["exec_us"]["run"]["count"] == 25 and s["wake_us"]["run"]["count"] == 25
    for metric in ("exec_us", "wake_us", "jitter_us"):
        assert set(s[metric]["run"]) >= {"p50", "p99", "p99.9", "max"}
        assert set(s[metric]["window"]) >= {"p50", "p99", "p99.9", "max"}
    d = read_json(snap)
    assert d["cycle"] == 25
    assert set(d["aggregate"]) == {f.name for f in AGGREGATES}
    assert [n["id"] for n in d["nodes"]] == ["A", "B"]
    for node in d["nodes"]:
        assert set(node) == {"id"} | {f.name for f in NODE_FIELDS}
        assert node["online"] == 1
        assert node["served_w"] == node["battery_w"] + node["bus_w"]
    a, b = d["nodes"]
    assert (a["demand_w"], a["max_discharge_w"], b["demand_w"], b["max_discharge_w"]) == (200, 100, 50, 150)
    assert "25 cycles" in r.stdout


def test_a_10000_node_template_fleet_runs(tmp_path, write_config):
    cfg = write_config(
        "cycle: {cycle_ms: 20}\n"
        "nodes:\n"
        "  - template: {count: 10000, id: 'rack-{i:05d}', priority: [0, 3], demand_w: [100, 300],\n"
        "               max_discharge_w: [200, 400], capacity_wh: [500, 900], soc: [0.3, 0.9]}\n")
    snap = tmp_path / "snap.json"
    r = run_vbatt("run", str(cfg), "--cycles", "5", "--snapshot", str(snap))
    assert r.returncode == 0, r.stderr
    d = read_json(snap)
    assert len(d["nodes"]) == 10000 and d["nodes"][-1]["id"] == "rack-09999"
    assert d["aggregate"]["nodes_online"] == 10000
    assert abs(d["aggregate"]["battery_w"] - sum(n["battery_w"] for n in d["nodes"])) < 1e-6


def _start(tmp_path, *extra) -> tuple[subprocess.Popen, Path]:
    err = tmp_path / "stderr.txt"
    proc = subprocess.Popen([*VBATT, "run", str(SEED), "-v", "--duration", "120", *extra], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(err, "w"), start_new_session=True)
    deadline = time.monotonic() + 60
    while "real-time setup" not in err.read_text():
        assert proc.poll() is None, err.read_text()
        assert time.monotonic() < deadline, "the scan did not start"
        time.sleep(0.1)
    time.sleep(0.5)  # some cycles
    return proc, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_stops_cleanly(tmp_path, sig):
    stats = tmp_path / "stats.json"
    proc, err = _start(tmp_path, "--stats-json", str(stats))
    assert _segments(proc.pid), "the run should have its shared-memory segment"
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C in a terminal reaches the whole process group
    else:
        proc.send_signal(sig)
    assert proc.wait(30) == 0, err.read_text()
    assert read_json(stats)["cycles"] > 10
    time.sleep(0.2)
    assert _session_pids(proc.pid) == [], "a child process was left behind"
    assert _segments(proc.pid) == [], "the shared-memory segment was left behind"
    assert "Traceback" not in err.read_text()


def test_kill_9_of_the_supervisor_leaves_no_orphan_and_the_next_start_cleans_up(tmp_path):
    proc, _ = _start(tmp_path)
    leftovers = _segments(proc.pid)
    assert leftovers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 15
    while _session_pids(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)  # children get SIGTERM from the kernel (parent-death signal)
    assert _session_pids(proc.pid) == []
    r = run_vbatt("run", str(SEED), "--cycles", "1")
    assert r.returncode == 0, r.stderr
    assert _segments(proc.pid) == []
