"""Scan runtime: latch + publish cost against N, and wake latency of the real scan process.

Wake latency runs `vbatt run` for real (its own scan process, SCHED_FIFO where
granted) for VBATT_BENCH_CYCLES cycles (default 10,000) at 10 ms and 1 ms, idle
and with a CPU-busy Python process writing the image beside it (the simulated
driver set to publish as fast as it can). The figures come from the run's own
statistics (--stats-json), attached to the benchmark as extra_info.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vbatt.kernel.clock import FakeClock
from vbatt.config.plant import load_config_text
from vbatt.kernel.image import Ctl, Mode, ProcessImage
from vbatt.config.plan import build_programs, image_spec, partition
from vbatt.kernel.scan import ScanEngine

CYCLES = int(os.environ.get("VBATT_BENCH_CYCLES", "10000"))


@pytest.fixture(params=[1_000, 100_000], ids=lambda n: f"n={n}")
def engine(request):
    n = request.param
    cfg, fleet = load_config_text(
        f"nodes:\n  - template: {{count: {n}, id: 'n{{i}}', demand_w: [100, 300], max_discharge_w: 500,"
        " capacity_wh: 1000, soc: [0.2, 0.9]}\n", "bench.yaml")
    programs = build_programs(cfg, n)
    spec = image_spec(cfg, fleet, programs, partition(cfg, fleet))
    img = ProcessImage.create(spec)
    img.ctl[Ctl.MODE] = Mode.RUN
    clock = FakeClock()
    block = img.inputs[0].begin()
    for arr in block.values():
        arr[:] = 1
    img.inputs[0].commit()
    eng = ScanEngine(img, programs, cfg, clock)
    yield n, img, eng, clock
    img.close()


def test_latch_and_publish(benchmark, engine):
    n, img, eng, clock = engine
    benchmark.group = "scan: latch + publish"
    benchmark.extra_info["n"] = n

    def latch_publish():
        eng.latch(clock.now_ns())
        img.publish()

    benchmark(latch_publish)


def test_whole_cycle_safe_allocation(benchmark, engine):
    n, img, eng, clock = engine
    benchmark.group = "scan: whole cycle (safe allocation)"
    benchmark.extra_info["n"] = n
    benchmark(eng.cycle, clock.now_ns())


def _run_latency(tmp_path: Path, period_ms: float, busy: bool) -> dict:
    driver_period = 0.001 if busy else period_ms  # a busy writer: publishes as fast as it can
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(
        f"cycle: {{cycle_ms: {period_ms}, stats_window: 10000, watchdog_overruns: 1000000}}\n"
        f"drivers: {{sim: {{period_ms: {driver_period}}}}}\n"
        "nodes:\n  - template: {count: 100, id: 'n{i}', demand_w: [100, 300], max_discharge_w: 500,"
        " capacity_wh: 1000, soc: [0.2, 0.9]}\n")
    stats = tmp_path / "stats.json"
    subprocess.run([sys.executable, "-m", "vbatt.cli", "run", str(cfg), "-q", "--cycles", str(CYCLES),
                    "--stats-json", str(stats)], check=True, timeout=CYCLES * period_ms / 1e3 + 120)
    return json.loads(stats.read_text())


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy-writer"])
@pytest.mark.parametrize("period_ms", [10.0, 1.0], ids=["10ms", "1ms"])
def test_wake_latency(benchmark, tmp_path, period_ms, busy):
    benchmark.group = f"scan: wake latency {period_ms:g} ms"
    result = {}
    benchmark.pedantic(lambda: result.update(_run_latency(tmp_path, period_ms, busy)), rounds=1, iterations=1)
    benchmark.extra_info.update({
        "period_ms": period_ms, "busy_writer": busy, "cycles": result["cycles"],
        "overruns": result["overruns"], "realtime": result["realtime"],
        "wake_latency_us": result["wake_us"]["run"], "exec_us": result["exec_us"]["run"],
        "jitter_us": result["jitter_us"]["run"],
        "wake_latency_hist_us": result["histogram"]["wake_us"],
    })
    w = result["wake_us"]["run"]
    print(f"\n{period_ms:g} ms {'busy' if busy else 'idle'}: {result['cycles']} cycles, "
          f"{result['overruns']} overruns, wake p50 {w['p50']} p99 {w['p99']} p99.9 {w['p99.9']} max {w['max']} µs")
    assert result["cycles"] == CYCLES
