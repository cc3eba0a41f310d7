"""The fixed-cycle scan: latch -> programs -> aggregates -> publish, at absolute deadlines.

Overrun policy (written down, as neither model codebase does): a cycle that ends
after the next deadline has missed the slots it ran into. Those slots are
skipped and counted in OVERRUNS; the next cycle is released at the next future
slot of the original grid, so there is never a burst of catch-up cycles and the
grid never drifts. After `watchdog_overruns` consecutive overrunning cycles the
watchdog latches: the scan goes to STOP, outputs hold the safe allocation, and
an alarm is raised until an operator sets RUN again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import gc
import logging
import time

import numpy as np
from numba import njit

from vbatt.kernel.aggregates import bind_aggregates
from vbatt.kernel.safe import safe_allocation, zero_power

from vbatt.kernel.clock import Clock
from vbatt.kernel.fields import Scope, fields
from vbatt.kernel.image import Ctl, Mode, Op, ProcessImage, ScanState, gather
from vbatt.kernel.program import Ctx, Program
from vbatt.kernel.seqblock import TornRead
from vbatt.kernel.stats import Stats, phase_names

if TYPE_CHECKING:
    from vbatt.config.plant import Config

__all__ = ["ScanEngine"]

log = logging.getLogger(__name__)

# The settings by the command that sets them (field table: command; an operator's or a process's).
_SETTERS = {getattr(Op, f.command): f for f in fields() if f.command is not None}


@njit(nogil=True, cache=True)
def derive_online(now_ns, stale_ns, updated_ns, fault, online, max_charge_w, max_discharge_w, lo_w, hi_w):
    """A node is online when its driver reports no fault and its data is fresh. In the same pass
    (one sweep over the nodes, not two) the limits start from what the device allows now."""
    for i in range(online.shape[0]):
        u = updated_ns[i]
        online[i] = 1 if (fault[i] == 0 and u > 0 and now_ns - u <= stale_ns) else 0
        lo_w[i] = -max_charge_w[i]
        hi_w[i] = max_discharge_w[i]


@njit(nogil=True, cache=True)
def device_limits(max_charge_w, max_discharge_w, lo_w, hi_w):
    """The limit reset of derive_online on its own (for benchmarks that run the programs without the latch)."""
    for i in range(lo_w.shape[0]):
        lo_w[i] = -max_charge_w[i]
        hi_w[i] = max_discharge_w[i]


LARGE_BLOCK_BYTES = 64 * 1024


def _copy_fields(raw, pairs0, pairs1, raw0) -> None:
    for dst, src in (pairs0 if raw is raw0 else pairs1):
        dst[...] = src


class ScanEngine:
    def __init__(self, img: ProcessImage, programs: list[Program], cfg: "Config", clock: Clock,
                 reload_programs: Callable[[int], list[Program]] | None = None):
        """reload_programs(n): the programs of online change number n, built with their new
        parameters (the supervisor's side of the reload protocol, injected so that the kernel does
        not know where they come from)."""
        self.img = img
        self.clock = clock
        self.ctl = img.ctl
        self.period_ns = int(round(cfg.cycle.cycle_ms * 1e6))
        self.spin_ns = int(round(cfg.cycle.spin_us * 1e3))
        self.watchdog_k = cfg.cycle.watchdog_overruns
        self.stale_ns = int(round(cfg.plant.stale_ms * 1e6))
        self.start_timeout_ns = int(cfg.cycle.start_timeout_s * 1e9)
        self.stats = Stats(img.mem)
        self.ctx = img.mem["scan.ctx"]
        self.ctx[Ctx.PERIOD_S] = self.period_ns / 1e9
        # One offset for the whole run: the wall time programs see moves with the monotonic clock
        # (no jumps when NTP steps the system clock), and an injected clock moves it too.
        self.wall_offset_s = time.time() - clock.now_ns() * 1e-9
        self.programs = programs
        # The cap on the load served starts open; a program that declares it writes it (energy) narrows it.
        img.node["serve_max_w"][:] = np.inf
        if not img.ctl[Ctl.WARM]:
            for p in programs:
                p.init(img)
        self.steps = [(p.id, p.bind(img, self.ctx)) for p in programs]
        self._bind_fixed(cfg.cycle.safe_state)
        self._latchers = [self._latcher(k) for k in range(len(img.inputs))]
        self._stamps = np.zeros(len(self.steps) + 3, dtype=np.int64)  # phase boundaries of one cycle
        self.phase_names = phase_names([p.id for p in programs])
        self.consecutive_overruns = 0
        self.last_release_ns = -1
        self.last_due_ns = -1
        self._fault_logged = False
        self._reload = 0
        self._reload_programs = reload_programs

    # -- binding (once) --------------------------------------------------------------
    def _bind_fixed(self, safe_state: str) -> None:
        n = self.img.node
        if safe_state == "own_battery":
            args = (n["online"], n["trip"], n["demand_w"], n["max_discharge_w"],
                    n["battery_w"], n["served_w"], n["shed_w"], n["bus_w"], n["lo_w"], n["hi_w"])
            self._safe = lambda: safe_allocation(*args)
        else:
            args = (n["online"], n["demand_w"], n["battery_w"], n["served_w"], n["shed_w"], n["bus_w"],
                    n["lo_w"], n["hi_w"])
            self._safe = lambda: zero_power(*args)
        self._aggregate = bind_aggregates(self.img)
        self._online_args = (n["updated_ns"], n["fault"], n["online"], n["max_charge_w"], n["max_discharge_w"],
                             n["lo_w"], n["hi_w"])

    def _latcher(self, k: int):
        """How input block k is copied in: one numba call while it is small (call overhead
        dominates), one memcpy per field once it is large (numba's byte copy is ~10x slower)."""
        block = self.img.inputs[k]
        plan = self.img.latch_plan(k)
        work, src_off, dst_off, nbytes = plan
        if int(nbytes.sum()) < LARGE_BLOCK_BYTES:
            return block, gather, plan
        per_buffer = [[(work[d:d + n], raw[s:s + n]) for s, d, n in zip(src_off, dst_off, nbytes)]
                      for raw in block._raw]
        return block, _copy_fields, (per_buffer[0], per_buffer[1], block._raw[0])

    # -- commands (between cycles) -------------------------------------------------------
    def _apply(self, op: int, node: int, value: float, arg: int) -> None:
        n, ctl = self.img.node, self.ctl
        if op == Op.SET_MODE:
            ctl[Ctl.MODE] = Mode.RUN if int(value) == Mode.RUN else Mode.STOP
            if ctl[Ctl.MODE] == Mode.RUN and ctl[Ctl.WATCHDOG]:
                ctl[Ctl.WATCHDOG] = 0
                self.consecutive_overruns = 0
                log.warning("watchdog reset by operator: RUN")
        elif op == Op.RESET_TRIP and 0 <= node < self.img.spec.n_nodes:
            n["trip"][node] = 0
        elif op in _SETTERS and _SETTERS[op].lo <= value <= _SETTERS[op].hi and \
                (_SETTERS[op].scope is Scope.AGGREGATE or 0 <= node < self.img.spec.n_nodes):
            f = _SETTERS[op]  # an operator setting of the field table, inside its range
            if f.scope is Scope.NODE:
                n[f.name][node] = int(value) if f.np_dtype.kind in "iu" else value
            else:
                self.img.agg[f.name][0] = value
        elif op == Op.ACK_ALARM:
            pass  # alarm state belongs to the programs (on_command below)
        elif op == Op.SET_MEMORY:
            names = self.img.spec.memory_names()
            name = names[arg] if 0 <= arg < len(names) else "?"
            owner = next((p for p in self.programs if name.startswith(p.id + ".")), None)
            why = (owner.set_memory(self.img, name[len(owner.id) + 1:], node, value) if owner is not None
                   else f"memory #{arg} ({name}) belongs to no program")
            if why:
                log.warning("command refused at the scan: %s (element %d, value %r)", why, node, value)
                return
        elif op == Op.RELOAD_PROGRAMS:
            self._reload = arg  # done after this cycle is published, in its slack
            return
        else:
            log.warning("command refused at the scan: op=%d node=%d value=%r", op, node, value)
            return
        for p in self.programs:
            p.on_command(self.img, op, node, value, arg)

    def _rebind(self, n: int) -> None:
        """New parameters, same memory: build the programs again and bind them to the same arrays."""
        self._reload = 0
        try:
            if self._reload_programs is None:
                raise ValueError("this engine was built without a program loader")
            programs = self._reload_programs(n)
            if [p.id for p in programs] != [p.id for p in self.programs]:
                raise ValueError("program list differs")
            steps = [(p.id, p.bind(self.img, self.ctx)) for p in programs]
        except Exception:
            log.exception("program reload %d failed: the running programs stay", n)
            self.ctl[Ctl.RELOADED] = -n
            return
        self.programs, self.steps = programs, steps
        self.ctl[Ctl.RELOADED] = n
        log.warning("program parameters reloaded (reload %d)", n)

    # -- one scan --------------------------------------------------------------------------
    def latch(self, now_ns: int) -> None:
        for block, fn, plan in self._latchers:
            if block.seq:
                try:
                    block.read_into(fn, plan)
                except TornRead:
                    self.ctl[Ctl.TORN_READS] += 1  # keep the old values; freshness marks them stale
        derive_online(now_ns, self.stale_ns, *self._online_args)

    def cycle(self, now_ns: int) -> None:
        ctl, ctx, stamps, now = self.ctl, self.ctx, self._stamps, self.clock.now_ns
        stamps[0] = now_ns
        self.img.commands.drain(self._apply)
        self.latch(now_ns)
        stamps[1] = now()
        ctx[Ctx.NOW_S] = now_ns * 1e-9
        ctx[Ctx.WALL_S] = now_ns * 1e-9 + self.wall_offset_s
        ctx[Ctx.DT_S] = (now_ns - self.last_release_ns) * 1e-9 if self.last_release_ns >= 0 else ctx[Ctx.PERIOD_S]
        ctx[Ctx.CYCLE] = ctl[Ctl.CYCLES] + 1
        safe = ctl[Ctl.MODE] != Mode.RUN or ctl[Ctl.WATCHDOG] != 0
        if not safe:
            try:
                k = 2
                for _pid, step in self.steps:
                    step()
                    stamps[k] = now()
                    k += 1
            except Exception:
                ctl[Ctl.PROGRAM_FAULTS] += 1
                if not self._fault_logged:
                    log.exception("program failed: outputs hold the safe allocation (logged once)")
                    self._fault_logged = True
                safe = True
        if safe:
            self._safe()
            stamps[2:-1] = now()  # in the safe state the programs took no time
        ctl[Ctl.SAFE_STATE] = 1 if safe else 0
        self._aggregate()
        ctl[Ctl.CYCLES] += 1
        self.img.cycle[0] = ctl[Ctl.CYCLES]
        self.img.time_ns[0] = now_ns
        self.img.publish()
        stamps[-1] = now()
        self.stats.record_phases(stamps)
        if self._reload:
            self._rebind(self._reload)

    # -- the loop -----------------------------------------------------------------------------
    def wait_for_inputs(self) -> list[int]:
        """Hold the first cycle until every driver has published once (or the start timeout)."""
        self.ctl[Ctl.STATE] = ScanState.WAITING
        give_up = self.clock.now_ns() + self.start_timeout_ns
        while True:
            missing = [k for k, b in enumerate(self.img.inputs) if b.seq == 0]
            if not missing or self.ctl[Ctl.STOP_REQ] or self.clock.now_ns() >= give_up:
                return missing
            self.clock.sleep_until(self.clock.now_ns() + 1_000_000)

    def run(self, max_cycles: int | None = None) -> None:
        clock, ctl, period = self.clock, self.ctl, self.period_ns
        spin = self.spin_ns
        ctl[Ctl.STATE] = ScanState.RUNNING
        ctl[Ctl.STARTED_NS] = clock.now_ns()
        gc_was = gc.isenabled()
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            due = clock.now_ns() + period
            done = 0
            while not ctl[Ctl.STOP_REQ] and (max_cycles is None or done < max_cycles):
                if spin:
                    clock.sleep_until(due - spin)
                    while clock.now_ns() < due:
                        pass
                else:
                    clock.sleep_until(due)
                t0 = clock.now_ns()
                self.cycle(t0)
                t1 = clock.now_ns()
                jitter = (abs((t0 - self.last_release_ns) - (due - self.last_due_ns))
                          if self.last_release_ns >= 0 else -1)
                self.stats.record(t1 - t0, t0 - due, jitter)
                self.last_release_ns, self.last_due_ns = t0, due
                done += 1
                due += period
                if t1 > due:
                    missed = (t1 - due) // period + 1
                    due += missed * period
                    ctl[Ctl.OVERRUNS] += missed
                    self.consecutive_overruns += 1
                    if self.consecutive_overruns >= self.watchdog_k and not ctl[Ctl.WATCHDOG]:
                        self.trip_watchdog()
                else:
                    self.consecutive_overruns = 0
        finally:
            if gc_was:
                gc.enable()
            gc.unfreeze()

    def trip_watchdog(self) -> None:
        self.ctl[Ctl.WATCHDOG] = 1
        self.ctl[Ctl.MODE] = Mode.STOP
        log.error("ALARM watchdog: %d consecutive overruns; outputs held in the safe state until RUN",
                  self.consecutive_overruns)

    def shutdown(self) -> None:
        """Leave the outputs in the safe state for the drivers to send.

        This publish is not a cycle: the buffer of the last cycle stays readable
        for the final snapshot (`ProcessImage.read_last_cycle`).
        """
        self.ctl[Ctl.LAST_SEQ] = self.img.pub.seq
        self.ctl[Ctl.MODE] = Mode.STOP
        self.latch(self.clock.now_ns())
        self._safe()
        self.ctl[Ctl.SAFE_STATE] = 1
        self._aggregate()
        self.img.publish()
        self.ctl[Ctl.STATE] = ScanState.DONE
