"""Entry points of the child processes: the scan, and one per driver partition.

Each child asks the kernel for SIGTERM when its parent dies, ignores SIGINT (the
supervisor coordinates Ctrl-C), and turns SIGTERM into an orderly stop.
"""

from __future__ import annotations

import logging
import signal
import sys
import time

from vbatt.kernel.clock import MonotonicClock
from vbatt.config.plant import Config, Fleet
from vbatt.kernel.image import Ctl, ImageSpec, Mode, ProcessImage, ScanState
from vbatt.kernel.jitcache import compiling_once
from vbatt.kernel.rt import leave_realtime, set_parent_death_signal, setup_realtime
from vbatt.kernel.signals import ignore_ctrl_c

__all__ = ["scan_main", "io_main", "service_main", "warm_up"]

log = logging.getLogger("vbatt.kernel.scan")


def _child_setup(level: int) -> None:
    set_parent_death_signal(signal.SIGTERM)
    ignore_ctrl_c()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def service_main(target, args: tuple) -> None:
    """A service (the OPC UA server, the embedded fleet, the tree's link) as the supervisor's child."""
    ignore_ctrl_c()
    target(*args)


def warm_up(cfg: Config) -> None:
    """Compile (or load from the numba cache) every kernel on a one-node scratch image,
    so that the first real cycle does not pay for it."""
    from vbatt.kernel.clock import FakeClock
    from vbatt.config.plan import build_programs, image_spec
    from vbatt.kernel.scan import ScanEngine

    programs = build_programs(cfg, 1, configure=False)
    spec = image_spec(cfg, Fleet(["warm-up"], {}, ["sim"], [None], [None]), programs, [(0, 1, "sim")])
    img = ProcessImage.create(spec)
    try:
        img.node["online"][:] = 1
        img.node["capacity_wh"][:] = 1.0
        img.node["updated_ns"][:] = 1
        img.ctl[Ctl.MODE] = Mode.RUN
        img.inputs[0].begin()
        img.inputs[0].commit()  # so that the latch runs (and compiles) too
        eng = ScanEngine(img, programs, cfg, FakeClock())
        eng.cycle(2)
        eng.stats.record(1, 1, 1)
    finally:
        img.close()


def load_reloaded_programs(image_name: str, n: int, n_nodes: int) -> list:
    """The programs of online change n, as the supervisor wrote them (supervise.reload)."""
    import pickle

    from vbatt.programs.registry import program_class
    from vbatt.supervise.reload import programs_path

    pid = int(image_name[len("vbatt-"):].split("-")[0])
    path = programs_path(pid, n)
    with open(path, "rb") as fh:
        entries = pickle.load(fh)
    path.unlink(missing_ok=True)
    return [program_class(e.id)(e.params, n_nodes) for e in entries]


def scan_main(name: str, spec: ImageSpec, cfg: Config, max_cycles: int | None, level: int) -> None:
    _child_setup(level)
    img = ProcessImage.attach(name, spec)
    signal.signal(signal.SIGTERM, lambda *_: img.ctl.__setitem__(Ctl.STOP_REQ, 1))
    from vbatt.config.plan import build_programs
    from vbatt.kernel.scan import ScanEngine

    try:
        t = time.perf_counter()
        # controllers started together on a cold cache: one compiles what it lacks, the others then load it
        with compiling_once() as done:
            warm_up(cfg)
        log.info("programs compiled/loaded in %.2f s: %d function%s compiled, %.2f s of it waiting for another "
                 "process's compile", time.perf_counter() - t, done.compiled, "" if done.compiled == 1 else "s",
                 done.waited_s)
        engine = ScanEngine(img, build_programs(cfg, spec.n_nodes), cfg, MonotonicClock(),
                            reload_programs=lambda n: load_reloaded_programs(img.name, n, spec.n_nodes))
        rt = setup_realtime(cfg.cycle.fifo_priority if cfg.cycle.realtime else None)
        img.ctl[Ctl.RT_FIFO] = int(rt["sched_fifo"] or 0)
        img.ctl[Ctl.RT_MLOCK] = int(rt["mlockall"])
        img.ctl[Ctl.RT_SLACK] = int(rt["timer_slack_1ns"])
        log.info("real-time setup: %s", rt.summary())
        missing = engine.wait_for_inputs()
        if missing:
            log.warning("no data from input block(s) %s after %.1f s: their nodes start offline",
                        missing, cfg.cycle.start_timeout_s)
        engine.run(max_cycles)
        engine.shutdown()
        leave_realtime()
    except BaseException:
        img.ctl[Ctl.STATE] = ScanState.FAILED
        log.exception("scan failed")
        raise


def io_main(name: str, spec: ImageSpec, cfg: Config, fleet: Fleet, k: int, kind: str, level: int) -> None:
    _child_setup(level)
    from vbatt.drivers.base import IoContext
    from vbatt.drivers.registry import driver_class

    img = ProcessImage.attach(name, spec)
    io = IoContext(img, k)
    signal.signal(signal.SIGTERM, lambda *_: io.request_stop())
    a, b = spec.partitions[k]
    driver = driver_class(kind)(cfg, fleet, a, b)
    driver.run(io)
