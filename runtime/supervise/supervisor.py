"""`vbatt run`: create the image, start the scan and the driver processes, watch, stop cleanly.

Stop order: ask the scan to finish (it publishes the safe state), give the
drivers a moment to send it, stop them, then write statistics and the snapshot
and unlink the shared memory. A driver process that dies is restarted with
backoff; its nodes go stale (offline) meanwhile. Nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from vbatt.config.plant import Config, ConfigError, Fleet, setting_values
from vbatt.kernel.fields import Scope
from vbatt.kernel.image import Ctl, Mode, Op, ProcessImage, ScanState
from vbatt.config.plan import build_programs, image_spec, partition
from vbatt.supervise.processes import io_main, scan_main, service_main
from vbatt.retain.retainer import Retainer
from vbatt.supervise.services import plan_services
from vbatt.kernel.stats import phase_names

__all__ = ["Supervisor", "RunResult"]

log = logging.getLogger("vbatt.run")
# A child is forked while this process runs no other thread: it inherits the imports, where a spawned
# child imports vbatt, numba and its driver again (about a second of CPU each, most of a controller's
# start-up). With another thread running (the retainer, a live view, a caller's) a lock that thread
# holds would stay held in a forked child: spawn then, as a restart does.
_FORK, _SPAWN = mp.get_context("fork"), mp.get_context("spawn")
STOP_GRACE_S = 0.3


def _as_if_spawned(target, args) -> None:
    """A forked child starts as a spawned one would: default signal handling (the supervisor's own
    handlers would swallow SIGTERM), the process's own stdio (a live view swaps sys.stderr for the
    terminal) and unconfigured logging, then runs `target(*args)`."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    root = logging.getLogger()
    for h in root.handlers[:]:
        root.removeHandler(h)
    root.setLevel(logging.WARNING)
    target(*args)


@dataclass
class RunResult:
    ok: bool
    reason: str = ""
    restarts: dict[int, int] = field(default_factory=dict)


class _Child:
    def __init__(self, name: str, target, args):
        self.name, self.target, self.args = name, target, args
        self.proc: mp.Process | None = None
        self.restarts = 0
        self.next_start = 0.0

    def start(self) -> None:
        if threading.active_count() == 1:
            self.proc = _FORK.Process(target=_as_if_spawned, args=(self.target, self.args), name=self.name,
                                      daemon=False)
        else:
            self.proc = _SPAWN.Process(target=self.target, args=self.args, name=self.name, daemon=False)
        self.proc.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def ask_to_stop(self) -> None:
        """SIGTERM: an orderly stop (every child turns it into one)."""
        if self.alive():
            self.proc.terminate()

    def stop(self, timeout: float) -> None:
        """Wait for the child to end, then end it."""
        p = self.proc
        if p is None:
            return
        p.join(timeout)
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


class Supervisor:
    def __init__(self, cfg: Config, fleet: Fleet, *, max_cycles: int | None = None,
                 duration_s: float | None = None, log_level: int = logging.WARNING, cold: bool = False):
        self.cfg, self.fleet = cfg, fleet
        self.max_cycles, self.duration_s = max_cycles, duration_s
        self.level = log_level
        self.programs = build_programs(cfg, len(fleet))
        self.parts = partition(cfg, fleet)
        self.spec = image_spec(cfg, fleet, self.programs, self.parts)
        self.phase_names = phase_names([p.id for p in self.programs])
        self.img: ProcessImage | None = None
        self.scan: _Child | None = None
        self.drivers: list[_Child] = []
        self._stop_requested = False
        self._reload_requested = False
        self._reloads = 0
        self.services: list[_Child] = []
        self.cold = cold
        self.retainer: Retainer | None = None
        self.restart_line = ""

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> ProcessImage:
        img = self.img = ProcessImage.create(self.spec)
        for f, v in setting_values(self.cfg, self.fleet).items():  # the configured operator settings
            (img.node if f.scope is Scope.NODE else img.agg)[f.name][:] = v
        img.ctl[Ctl.MODE] = Mode.RUN
        if self.cfg.retain.enabled:
            self.retainer = Retainer(self.cfg.retain, img, cold=self.cold)
            self.restart_line = self.retainer.restore()
        services = plan_services(self.cfg, self.fleet, img.name, self.spec)
        for svc in services:
            if svc.before_drivers:
                self._start_service(svc)
        for k, (_a, _b, kind) in enumerate(self.parts):
            child = _Child(f"vbatt-io{k}-{kind}", io_main,
                           (img.name, self.spec, self.cfg, self.fleet, k, kind, self.level))
            child.start()
            self.drivers.append(child)
        self.scan = _Child("vbatt-scan", scan_main, (img.name, self.spec, self.cfg, self.max_cycles, self.level))
        self.scan.start()
        for svc in services:
            if not svc.before_drivers:
                self._start_service(svc)
        if self.retainer:  # its thread last: every child above is forked without it
            self.retainer.start()
        return img

    def _start_service(self, svc) -> None:
        child = _Child(svc.name, service_main, (svc.target, svc.args))
        child.start()
        self.services.append(child)

    def request_stop(self, *_args) -> None:
        self._stop_requested = True

    def request_reload(self, *_args) -> None:
        self._reload_requested = True

    def install_signals(self) -> None:
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    # -- online change (vbatt reload) ----------------------------------------------------------
    def reload(self, config_path: str) -> dict:
        """Apply a new config between cycles, or refuse it whole; returns the answer."""
        from vbatt.config.plant import load_config
        from vbatt.supervise.reload import RELOAD_PRODUCER, diff, write_programs

        img = self.img
        try:
            new_cfg, new_fleet = load_config(config_path)
        except ConfigError as exc:
            return {"ok": False, "message": "invalid config, nothing changed:\n" + "\n".join(exc.problems)}

        def memory_of(cfg):
            return [s for p in build_programs(cfg, len(self.fleet)) for s in p.memory_specs()]

        plan = diff(self.cfg, self.fleet, new_cfg, new_fleet, memory_of)
        if plan.refused:
            return {"ok": False, "message": "refused, nothing changed: " + "; ".join(plan.refused)}
        if not plan.commands and not plan.memory and not plan.programs_changed:
            return {"ok": True, "message": "no change"}
        ticket = 0
        for op, node, value in plan.commands:
            ticket = img.commands.push(RELOAD_PRODUCER, op, node, value)
        for name, element, value in plan.memory:
            ticket = img.commands.push(RELOAD_PRODUCER, Op.SET_MEMORY, element, value,
                                       arg=self.spec.memory_index(name))
        if plan.programs_changed:
            self._reloads += 1
            write_programs(os.getpid(), self._reloads, new_cfg)
            ticket = img.commands.push(RELOAD_PRODUCER, Op.RELOAD_PROGRAMS, arg=self._reloads)
        deadline = time.monotonic() + 10
        while img.commands.applied(RELOAD_PRODUCER) < ticket or (
                plan.programs_changed and abs(int(img.ctl[Ctl.RELOADED])) != self._reloads):
            if time.monotonic() > deadline or not self.scan.alive():
                return {"ok": False, "message": "the scan did not apply the change in time"}
            time.sleep(0.01)
        if plan.programs_changed and int(img.ctl[Ctl.RELOADED]) < 0:
            return {"ok": False, "message": "the scan could not rebind the programs; the running ones stay"}
        self.cfg, self.fleet = new_cfg, new_fleet
        return {"ok": True, "message": f"applied between two cycles (cycle {int(img.ctl[Ctl.CYCLES])}): "
                                       + ", ".join(plan.summary)}

    def _serve_reload(self) -> None:
        from vbatt.supervise.reload import request_path, result_path

        self._reload_requested = False
        req = request_path(os.getpid())
        try:
            path = json.loads(req.read_text())["config"]
            req.unlink(missing_ok=True)
        except (OSError, ValueError, KeyError) as exc:
            log.error("SIGHUP without a readable reload request (%s)", exc)
            return
        answer = self.reload(path)
        (log.warning if answer["ok"] else log.error)("reload %s: %s", path, answer["message"])
        tmp = result_path(os.getpid()).with_suffix(".tmp")
        tmp.write_text(json.dumps(answer))
        os.replace(tmp, result_path(os.getpid()))

    def poll(self) -> str | None:
        """One supervision step; returns why the run ends, or None to go on."""
        assert self.img is not None and self.scan is not None
        if self._stop_requested:
            return "stop requested"
        if self._reload_requested:
            self._serve_reload()
        if not self.scan.alive():
            state = int(self.img.ctl[Ctl.STATE])
            return "cycles done" if state == ScanState.DONE else f"scan process failed (exit {self.scan.proc.exitcode})"
        now = time.monotonic()
        for child in self.drivers + self.services:
            if child.alive() or self.img.ctl[Ctl.IO_STOP]:
                continue
            if child.next_start == 0.0:
                child.restarts += 1
                child.next_start = now + min(30.0, 0.5 * 2 ** min(child.restarts, 6))
                log.error("%s died (exit %s): restart in %.1f s", child.name, child.proc.exitcode,
                          child.next_start - now)
            elif now >= child.next_start:
                child.next_start = 0.0
                child.start()
        return None

    def wait(self, on_tick=None, tick_s: float = 0.25) -> str:
        started = None  # --duration counts from the first cycle, not from compiling
        while True:
            reason = self.poll()
            if started is None and self.img.ctl[Ctl.STATE] == ScanState.RUNNING:
                started = time.monotonic()
            if (reason is None and self.duration_s is not None and started is not None
                    and time.monotonic() - started >= self.duration_s):
                reason = "duration reached"
            if reason:
                return reason
            if on_tick:
                on_tick()
            time.sleep(min(tick_s, 0.05) if self.max_cycles else tick_s)

    def stop(self) -> None:
        """Safe state out, every child gone. Safe to call twice."""
        img = self.img
        if img is None:
            return
        if self.retainer:
            self.retainer.stop()
            self.retainer = None
        img.ctl[Ctl.STOP_REQ] = 1
        if self.scan:
            self.scan.stop(timeout=10.0)
        # Let the drivers pick up the safe state the scan published last; each driver also
        # sends its last instruction when it sees IO_STOP, before it returns.
        time.sleep(STOP_GRACE_S)
        img.ctl[Ctl.IO_STOP] = 1
        for child in self.drivers:
            child.stop(timeout=5.0)
        # The drivers are done: the services are asked to stop (each stops in order on SIGTERM; the
        # embedded fleet watches no image, and waiting for it to end by itself only let its nodes' leases
        # run out), all at once, then awaited
        for child in self.services:
            child.ask_to_stop()
        for child in self.services:
            child.stop(timeout=5.0)

    def close(self) -> None:
        if self.img is not None:
            self.img.close()
            self.img = None

    @property
    def scan_failed(self) -> bool:
        return self.img is not None and int(self.img.ctl[Ctl.STATE]) == ScanState.FAILED
