"""The scan engine, one cycle at a time, on an injected clock: deadlines, overruns, watchdog, commands."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from vbatt.kernel.clock import FakeClock, MonotonicClock
from vbatt.config.plant import load_config_text
from vbatt.kernel.image import Ctl, Mode, Op, ProcessImage
from vbatt.config.plan import build_programs, image_spec, partition
from vbatt.kernel.program import Program
from vbatt.kernel.scan import ScanEngine

P = 10_000_000  # 10 ms in ns

PLANT = """\
cycle: {cycle_ms: 10, watchdog_overruns: 3}
plant: {main_limit_w: 0, stale_ms: 100}
nodes:
  - {id: A, demand_w: 200, max_discharge_w: 100, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
  - {id: B, demand_w: 50, max_discharge_w: 150, capacity_wh: 1000, soc: 0.8, link_max_w: 1000}
"""


class Scripted(Program):
    """A test program: commands a fixed (unsafe-looking) setpoint and can take time or fail."""

    id = "scripted"

    def __init__(self, clock: FakeClock | None = None, takes_ns: int = 0, sleep_s: float = 0.0):
        super().__init__(None, 2)
        self.clock, self.takes_ns, self.sleep_s = clock, takes_ns, sleep_s
        self.calls = 0
        self.fail = False

    def bind(self, img, ctx):
        battery = img.node["battery_w"]

        def step():
            self.calls += 1
            if self.fail:
                raise ZeroDivisionError("program bug")
            battery[:] = 999.0
            if self.clock is not None:
                self.clock.advance(self.takes_ns)
            if self.sleep_s:
                time.sleep(self.sleep_s)

        return step


@pytest.fixture
def plant():
    cfg, fleet = load_config_text(PLANT, "plant.yaml")
    progs = build_programs(cfg, len(fleet))
    spec = image_spec(cfg, fleet, progs, partition(cfg, fleet))
    img = ProcessImage.create(spec)
    img.ctl[Ctl.MODE] = Mode.RUN
    yield cfg, fleet, img
    img.close()


def feed(img: ProcessImage, now_ns: int, demand=(200.0, 50.0), fault=(0, 0)) -> None:
    """Act as the driver: publish one whole set of inputs."""
    a = img.inputs[0].begin()
    a["demand_w"][:] = demand
    a["max_discharge_w"][:] = (100.0, 150.0)
    a["capacity_wh"][:] = 1000.0
    a["soc"][:] = 0.8
    a["updated_ns"][:] = now_ns
    a["fault"][:] = fault
    img.inputs[0].commit()


def test_deadlines_are_an_absolute_grid(plant):
    cfg, _, img = plant
    clock = FakeClock()
    feed(img, clock.now_ns())
    eng = ScanEngine(img, [], cfg, clock)
    t0 = clock.now_ns()
    eng.run(max_cycles=5)
    assert clock.sleeps == [t0 + k * P for k in range(1, 6)]
    assert int(img.ctl[Ctl.CYCLES]) == 5 and int(img.ctl[Ctl.OVERRUNS]) == 0
    assert img.mem["stats.count"].tolist() == [5, 5, 4]  # the first cycle has no period to measure


def test_safe_allocation_from_latched_inputs(plant):
    cfg, _, img = plant
    clock = FakeClock()
    feed(img, clock.now_ns())
    eng = ScanEngine(img, build_programs(cfg, 2), cfg, clock)
    eng.run(max_cycles=1)
    views, seq = img.read_published()
    assert seq == 1 and int(views["cycle"][0]) == 1
    assert views["node.online"].tolist() == [1, 1]
    assert views["node.battery_w"].tolist() == [100.0, 50.0]
    assert views["node.bus_w"].tolist() == [0.0, 0.0]
    assert views["node.shed_w"].tolist() == [100.0, 0.0]
    assert views["agg.demand_w"][0] == 250.0 and views["agg.battery_w"][0] == 150.0


def test_overruns_skip_slots_and_watchdog_goes_safe(plant):
    cfg, _, img = plant
    clock = FakeClock()
    feed(img, clock.now_ns() + 100 * P)  # fresh for the whole test
    slow = Scripted(clock, takes_ns=int(2.5 * P))
    eng = ScanEngine(img, [slow], cfg, clock)
    t0 = clock.now_ns()
    eng.run(max_cycles=6)
    # each slow cycle runs 2.5 periods: it misses 2 slots, the next release is 3 periods later
    assert clock.sleeps[:3] == [t0 + P, t0 + 4 * P, t0 + 7 * P]
    assert slow.calls == 3  # the watchdog (K = 3) stopped the program
    assert int(img.ctl[Ctl.OVERRUNS]) == 6
    assert img.ctl[Ctl.WATCHDOG] == 1 and img.ctl[Ctl.MODE] == Mode.STOP and img.ctl[Ctl.SAFE_STATE] == 1
    views, _ = img.read_published()
    assert views["node.battery_w"].tolist() == [100.0, 50.0]  # the safe allocation, not 999
    # no catch-up burst after the overruns: the remaining cycles are one period apart
    assert np.diff(clock.sleeps[3:]).tolist() == [P, P]

    # the operator sets RUN: the watchdog clears and the program runs again
    img.commands.push(0, Op.SET_MODE, value=Mode.RUN)
    slow.takes_ns = 0
    eng.run(max_cycles=1)
    assert img.ctl[Ctl.WATCHDOG] == 0 and img.ctl[Ctl.SAFE_STATE] == 0 and slow.calls == 4
    assert img.read_published()[0]["node.battery_w"].tolist() == [999.0, 999.0]


def test_program_exception_gives_safe_allocation(plant):
    cfg, _, img = plant
    clock = FakeClock()
    feed(img, clock.now_ns() + 100 * P)
    bad = Scripted()
    bad.fail = True
    eng = ScanEngine(img, [bad], cfg, clock)
    eng.run(max_cycles=2)
    assert int(img.ctl[Ctl.PROGRAM_FAULTS]) == 2 and img.ctl[Ctl.SAFE_STATE] == 1
    assert img.read_published()[0]["node.battery_w"].tolist() == [100.0, 50.0]


def test_stale_or_faulted_inputs_are_marked_offline(plant):
    cfg, _, img = plant
    clock = FakeClock()
    feed(img, clock.now_ns(), fault=(0, 3))
    eng = ScanEngine(img, build_programs(cfg, 2), cfg, clock)
    eng.run(max_cycles=1)
    v = img.read_published()[0]
    assert v["node.online"].tolist() == [1, 0]
    assert v["node.battery_w"].tolist() == [100.0, 0.0]  # nothing commanded to a faulted node
    clock.advance(200_000_000)  # beyond stale_ms = 100: A's data is now stale too
    eng.run(max_cycles=1)
    assert img.read_published()[0]["node.online"].tolist() == [0, 0]


def test_commands_apply_between_cycles(plant):
    cfg, _, img = plant
    clock = FakeClock()
    feed(img, clock.now_ns() + 100 * P)
    eng = ScanEngine(img, build_programs(cfg, 2), cfg, clock)
    ticket = img.commands.push(1, Op.SET_MAIN_LIMIT, value=1234.0)
    img.commands.push(1, Op.SET_PRIORITY, node=1, value=7)
    img.node["trip"][0] = 4
    img.commands.push(1, Op.RESET_TRIP, node=0)
    assert img.commands.applied(1) == 0  # nothing happens before the scan runs
    eng.run(max_cycles=1)
    assert img.commands.applied(1) == ticket + 2
    v = img.read_published()[0]
    assert v["agg.main_limit_w"][0] == 1234.0 and v["node.priority"].tolist() == [0, 7]
    assert v["node.trip"].tolist() == [0, 0]
    img.commands.push(1, Op.SET_MODE, value=Mode.STOP)
    eng.run(max_cycles=1)
    assert img.ctl[Ctl.MODE] == Mode.STOP and img.ctl[Ctl.SAFE_STATE] == 1


def test_command_ring_refuses_when_full(plant):
    _, _, img = plant
    for _ in range(img.spec.command_slots):
        img.commands.push(2, Op.SET_MAIN_LIMIT, value=1.0)
    with pytest.raises(BufferError, match="command ring 2 is full"):
        img.commands.push(2, Op.SET_MAIN_LIMIT, value=2.0)


def test_real_clock_slow_program_counts_overruns(plant):
    cfg, _, img = plant
    clock = MonotonicClock()
    feed(img, clock.now_ns() + 10**12)
    slow = Scripted(sleep_s=0.025)  # 2.5 periods of real time
    eng = ScanEngine(img, [slow], cfg, clock)
    eng.run(max_cycles=5)
    assert int(img.ctl[Ctl.OVERRUNS]) >= 2 * 3  # at least two slots missed per slow cycle
    assert img.ctl[Ctl.WATCHDOG] == 1 and slow.calls == 3
    assert img.read_published()[0]["node.battery_w"].tolist() == [100.0, 50.0]


class NrtCount:
    """numba's own allocation statistics (NRT) over a stretch of cycles, and the part of them that is the
    call boundary: every ndarray passed from Python to a compiled function is wrapped in one NRT MemInfo
    for the call (one alloc, one free; the array's data is not copied). What is left is allocated by
    the kernels themselves."""

    def __init__(self, monkeypatch):
        from numba.core.dispatcher import Dispatcher
        from numba.core.runtime import _nrt_python, rtsys

        self.rtsys = rtsys
        self.boundary = 0
        _nrt_python.memsys_enable_stats()
        call = Dispatcher.__call__

        def counting(disp, *args, **kw):
            self.boundary += _arrays_in(args) + _arrays_in(tuple(kw.values()))
            return call(disp, *args, **kw)

        monkeypatch.setattr(Dispatcher, "__call__", counting)

    def allocs(self) -> tuple[int, int, int]:
        st = self.rtsys.get_allocation_stats()
        return st.alloc, st.free, self.boundary


def _arrays_in(args) -> int:
    return sum(1 if isinstance(a, np.ndarray) else _arrays_in(a) if isinstance(a, tuple) else 0 for a in args)


def test_the_default_pipeline_allocates_nothing_per_cycle(monkeypatch, tmp_path):
    """The full default pipeline (runtime/default.yaml: its fleet and programs) in the real ScanEngine on a
    FakeClock, inputs changing every cycle (loads beyond what the feed covers: shedding, hot and warming
    nodes: derating, low SoC, a stale node): numba's NRT counters move by exactly the call boundary,
    so no kernel allocates in a cycle (forecast, protection, allocation, health, the latch, the
    aggregates, the online check)."""
    from vbatt.config import load_config

    # default.yaml's state dirs (./var/...) resolve in an empty directory, not in what a `make run` left in
    # the repository
    monkeypatch.chdir(tmp_path)
    cfg, fleet = load_config(str(Path(__file__).resolve().parents[1] / "runtime" / "default.yaml"))
    n = len(fleet)
    progs = build_programs(cfg, n)
    assert [p.id for p in progs] == [e.id for e in cfg.programs] and len(progs) >= 4
    img = ProcessImage.create(image_spec(cfg, fleet, progs, partition(cfg, fleet)))
    rng = np.random.default_rng(1)

    class DriversBetweenCycles(FakeClock):
        """While the scan sleeps to its next deadline, the drivers publish new inputs (as they do)."""

        cycle = 0

        def sleep_until(self, deadline_ns: int) -> None:
            super().sleep_until(deadline_ns)
            feed(self.cycle)
            self.cycle += 1

    clock = DriversBetweenCycles(record=False)

    def feed(cycle: int) -> None:
        for block in img.inputs:
            a = block.begin()
            m = a["demand_w"].shape[0]
            a["demand_w"][:] = rng.uniform(100, 2500 if cycle % 50 < 25 else 500, m)  # shortage in bursts
            a["max_discharge_w"][:] = rng.uniform(0, 800, m)
            a["max_charge_w"][:] = rng.uniform(0, 400, m)
            a["capacity_wh"][:] = 1000.0
            a["soc"][:] = rng.uniform(0.05, 1.0, m)
            a["link_max_w"][:] = rng.uniform(200, 1000, m)
            a["voltage_v"][:] = rng.uniform(42, 57, m)
            a["current_a"][:] = rng.uniform(-30, 30, m)
            a["temperature_c"][:] = 25.0 + 0.05 * cycle + rng.uniform(0, 25, m)  # warming, some hot
            a["fault"][:] = 0
            a["updated_ns"][:] = clock.now_ns()
            a["updated_ns"][0] = clock.now_ns() - 10**12  # one node's data is stale
            block.commit()

    try:
        img.ctl[Ctl.MODE] = Mode.RUN
        img.agg["main_limit_w"][0] = cfg.plant.main_limit_w
        eng = ScanEngine(img, progs, cfg, clock)
        eng.run(max_cycles=5)  # compile and first-cycle set-up
        nrt = NrtCount(monkeypatch)
        alloc0, free0, bound0 = nrt.allocs()
        cycles = 1000
        eng.run(max_cycles=cycles)
        alloc1, free1, bound1 = nrt.allocs()
        boundary = bound1 - bound0
        assert boundary >= cycles * len(progs)  # the counter sees the kernel calls
        assert alloc1 - alloc0 == boundary, f"the cycle allocated {(alloc1 - alloc0 - boundary) / cycles:.2f} " \
                                            f"NRT blocks per cycle beyond the call boundary"
        assert free1 - free0 == alloc1 - alloc0
        assert int(img.cycle[0]) >= cycles
        out = img.read_published()[0]
        assert (out["node.shed_w"] > 0).any() or (out["node.lo_w"] < 0).any()  # the allocator did work
        assert np.isfinite(out["node.battery_w"]).all()
    finally:
        img.close()
