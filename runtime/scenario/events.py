"""Scenario events on the step grid, applied between two cycles.

An event at `at_s` is applied before the cycle of the first step at or after it
(t_k = k * step_s >= at_s); its undo (`until_s`) the same way. Operator actions
(main supply limit, priority, trip reset) go through the engine's command ring,
so programs see them exactly as an operator's change (Op.* and on_command). The
rest acts on the simulated plant: a failed node stops reporting (driver fault
SIMULATED: offline) and runs on its own battery as a node whose lease ran out
does (docs/design.md §5); a trip is latched in the node's `trip` field as protection
would; ambient moves the thermal model's ambient (and the battery temperature of
nodes without a thermal model); a capacity scale is a fade of the configured
capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vbatt.drivers.faults import Fault
from vbatt.kernel.image import Op
from vbatt.programs.codes import Trip

from vbatt.scenario.schema import Event

__all__ = ["Schedule", "Plant", "main_limit_drop_step", "event_step"]


def event_step(t_s: float, step_s: float) -> int:
    return max(0, int(math.ceil(t_s / step_s - 1e-9)))


@dataclass
class Plant:
    """What events act on: the engine (commands), the image, the simulated nodes."""

    eng: object  # ScanEngine
    img: object  # ProcessImage
    sim: object  # SimFleet
    fault: np.ndarray  # u4 per node: the driver fault the runner reports (0 = none)
    base_capacity_wh: np.ndarray

    def command(self, op: int, node: int = -1, value: float = 0.0) -> None:
        ring = self.img.commands
        try:
            ring.push(0, op, node, value)
        except BufferError:  # a large event: apply what is queued now, between the same two cycles
            ring.drain(self.eng._apply)
            ring.push(0, op, node, value)


class Schedule:
    """Events and their undos, in time order (ties: file order, undos first)."""

    def __init__(self, events: list[Event], nodes: list[np.ndarray], step_s: float, steps: int):
        self.events, self.nodes = events, nodes
        items = []
        for k, ev in enumerate(events):
            items.append((event_step(ev.at_s, step_s), 1, k))
            if ev.until_s is not None:
                items.append((event_step(ev.until_s, step_s), 0, k))
        self.items = sorted(i for i in items if i[0] < steps)
        self.pos = 0
        self.saved: dict[int, object] = {}

    def next_step(self) -> int:
        return self.items[self.pos][0] if self.pos < len(self.items) else -1

    def apply_due(self, k: int, plant: Plant) -> None:
        while self.pos < len(self.items) and self.items[self.pos][0] <= k:
            _, do, e = self.items[self.pos]
            self.pos += 1
            (self._do if do else self._undo)(e, plant)

    def _do(self, e: int, p: Plant) -> None:
        ev, idx = self.events[e], self.nodes[e]
        a = ev.action
        if a == "main_limit_w":
            self.saved[e] = float(p.img.agg["main_limit_w"][0])
            p.command(Op.SET_MAIN_LIMIT, -1, ev.main_limit_w)
        elif a == "priority":
            self.saved[e] = p.img.node["priority"][idx].copy()
            for i in idx:
                p.command(Op.SET_PRIORITY, int(i), float(ev.priority))
        elif a == "fail":
            self.saved[e] = p.fault[idx].copy()
            p.fault[idx] = int(Fault.SIMULATED) if ev.fail else 0
        elif a == "trip":
            p.img.node["trip"][idx] |= np.uint32(int(Trip[ev.trip]))
        elif a == "reset_trip":
            for i in idx:
                p.command(Op.RESET_TRIP, int(i))
        elif a == "ambient_c":
            self.saved[e] = (p.sim.t_amb[idx].copy(), p.sim.temperature_c[idx].copy())
            p.sim.t_amb[idx] = ev.ambient_c
            no_model = idx[p.sim.r_th[idx] <= 0.0]
            p.sim.temperature_c[no_model] = ev.ambient_c
        elif a == "capacity_scale":
            p.sim.capacity_wh[idx] = p.base_capacity_wh[idx] * ev.capacity_scale

    def _undo(self, e: int, p: Plant) -> None:
        ev, idx = self.events[e], self.nodes[e]
        old = self.saved.pop(e, None)
        if old is None:  # undo before do cannot happen (until_s > at_s), but never guess
            return
        a = ev.action
        if a == "main_limit_w":
            p.command(Op.SET_MAIN_LIMIT, -1, old)
        elif a == "priority":
            for i, v in zip(idx, old):
                p.command(Op.SET_PRIORITY, int(i), float(v))
        elif a == "fail":
            p.fault[idx] = old
        elif a == "ambient_c":
            p.sim.t_amb[idx] = old[0]
            no_model = idx[p.sim.r_th[idx] <= 0.0]
            p.sim.temperature_c[no_model] = old[1][p.sim.r_th[idx] <= 0.0]


def main_limit_drop_step(events: list[Event], initial_w: float, step_s: float, steps: int) -> int:
    """The step of the first event that lowers the main supply limit (-1: none)."""
    sched = Schedule(events, [np.zeros(0, np.int64)] * len(events), step_s, steps)
    value, saved = initial_w, {}
    for k, do, e in sched.items:
        ev = events[e]
        if ev.action != "main_limit_w":
            continue
        new = ev.main_limit_w if do else saved.get(e, value)
        if do:
            saved[e] = value
        if new < value:
            return k
        value = new
    return -1
