"""The optimal allocation program (docs/design.md §2); the kernel is in `alloc_kernel`.

Bound by name (kernel `allocation_step`): reads online, trip, demand_w, max_discharge_w,
max_charge_w, link_max_w, soc, capacity_wh, priority, lo_w/hi_w (the device limits as narrowed by the
programs before it: protection, health's derate, a user's), battery_w (last setpoint, for the ramp)
and the aggregate main_limit_w. Writes: battery_w, served_w, shed_w, bus_w, lo_w, hi_w (the limits it
used), the alarm bits SAFE_ALLOCATION and LOAD_SHED, and the aggregate main_w.

First cycle: there is no previous setpoint, so the ramp limit starts from the
first allocation rather than from zero (a virtual battery that must pick up a
load at start-up must not be held back by a ramp from an arbitrary 0 W; the
seed example of docs/design.md §2 is exact in one cycle). After that every setpoint
moves at most `ramp_w_per_s` per second unless the load could not be served
otherwise (serving load outranks smoothness).
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from numba import njit
from pydantic import BaseModel, ConfigDict, Field, model_validator

from vbatt.kernel.program import Program
from vbatt.kernel.seqblock import ArraySpec

from vbatt.programs.allocation.kernel import ST_N, allocate

__all__ = ["Allocation", "AllocationParams", "solve", "solver", "Workspace"]


class AllocationParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    soc_min: Annotated[float, Field(ge=0, le=1, description="reserve: energy below it is not usable")] = 0.1
    soc_max: Annotated[float, Field(ge=0, le=1, description="charging fills up to this SoC")] = 1.0
    ramp_w_per_s: Annotated[float, Field(ge=0, allow_inf_nan=False,
                                         description="largest setpoint change per second; 0 = no ramp")] = 0.0
    restore_hold_s: Annotated[float, Field(ge=0, allow_inf_nan=False,
                                           description="shed load is restored only after this long")] = 0.0
    restore_margin: Annotated[float, Field(ge=0, lt=1, description="... and only when the shed would fall "
                                                                    "by at least this fraction")] = 0.0

    @model_validator(mode="after")
    def _order(self) -> "AllocationParams":
        if self.soc_max < self.soc_min:
            raise ValueError(f"soc_max ({self.soc_max}) must be >= soc_min ({self.soc_min})")
        return self


class Workspace:
    """Per-node scratch and memory arrays of the kernel (scratch is not in the image)."""

    SCRATCH_F = ("cap", "fa", "x", "w", "blo", "bhi", "s_w", "s_lo", "s_hi", "s_x")

    def __init__(self, n: int):
        self.use = np.zeros(n, np.uint8)
        self.f = {k: np.zeros(n) for k in self.SCRATCH_F}
        self.sidx = np.zeros(n, np.int64)
        self.tmp = np.zeros(n, np.int64)

    def scratch(self) -> tuple:
        f = self.f
        return (self.use, f["cap"], f["fa"], f["x"], f["w"], f["blo"], f["bhi"], self.sidx,
                f["s_w"], f["s_lo"], f["s_hi"], f["s_x"], self.tmp)


@njit(nogil=True, cache=True)
def allocation_step(online, trip, demand_w, max_discharge_w, max_charge_w, link_max_w, soc, capacity_wh,
                    priority, serve_max_w, agg_main_limit_w, agg_main_w, dt_s, soc_min, soc_max, ramp_w_per_s,
                    restore_hold_s, restore_margin, order, held_w, timer_s, state,
                    battery_w, served_w, shed_w, bus_w, lo_w, hi_w, alarm, scratch):
    """The program's kernel, bound by name. lo_w/hi_w arrive narrowed by the programs before it
    (from the device limits the scan set at the latch); the kernel never goes beyond the device
    limits whatever they say. serve_max_w caps the load it may serve (+inf unless a program such
    as `energy` narrows it)."""
    use, cap, fa, x, w, blo, bhi, sidx, s_w, s_lo, s_hi, s_x, tmp = scratch
    agg_main_w[0] = allocate(online, trip, demand_w, max_discharge_w, max_charge_w, link_max_w, soc, capacity_wh,
                             priority, True, lo_w, False, serve_max_w, True, agg_main_limit_w[0], dt_s[0],
                             soc_min, soc_max, ramp_w_per_s, restore_hold_s, restore_margin,
                             order, held_w, timer_s, state, battery_w, served_w, shed_w, bus_w, lo_w, hi_w, alarm,
                             use, cap, fa, x, w, blo, bhi, sidx, s_w, s_lo, s_hi, s_x, tmp)


class Allocation(Program):
    id = "allocation"
    Params = AllocationParams
    kernel = allocation_step
    allocates = True
    writes = ("battery_w", "served_w", "shed_w", "bus_w", "lo_w", "hi_w", "alarm", "agg_main_w")

    def memory(self) -> list[ArraySpec]:
        n = self.n
        return [ArraySpec("order", "i8", (n,)), ArraySpec("held_w", "f8", (n,)),
                ArraySpec("timer_s", "f8", (n,)), ArraySpec("state", "f8", (ST_N,))]

    def init(self, img) -> None:
        self.mem(img, "order")[:] = np.argsort(img.node["priority"], kind="stable")
        self.mem(img, "state")[:] = np.nan
        self.mem(img, "state")[0] = 0.0

    def on_command(self, img, op, node, value, arg) -> None:
        from vbatt.kernel.image import Op

        if op == Op.SET_PRIORITY:  # re-sort outside the cycle (the kernel would otherwise do it)
            self.mem(img, "order")[:] = np.argsort(img.node["priority"], kind="stable")

    def bindings(self, img) -> dict:
        self._ws = Workspace(self.n)
        return {"scratch": self._ws.scratch()}


def solver(demand_w, max_discharge_w, max_charge_w, link_max_w, soc, capacity_wh, priority=None,
           main_limit_w: float = 0.0, *, online=None, trip=None, lo_w=None, hi_w=None, serve_max_w=None,
           params: AllocationParams | None = None):
    """An allocation from scratch (no memory, no ramp) on arrays prepared once: returns `run`,
    which solves the instance again on every call (as a cycle does: nothing allocated) and returns
    the outputs and main_w. For tests, tools and benchmarks (timing the solve, not the set-up).

    lo_w/hi_w, when given, are protection's narrowed limits; serve_max_w a cap on the served load."""
    d = np.asarray(demand_w, dtype=np.float64)
    n = d.shape[0]
    f = lambda a, v=0.0: np.full(n, v) if a is None else np.asarray(a, dtype=np.float64).copy()  # noqa: E731
    p = params or AllocationParams()
    prio = np.zeros(n, np.int64) if priority is None else np.asarray(priority, dtype=np.int64)
    on = np.ones(n, np.uint8) if online is None else np.asarray(online, dtype=np.uint8)
    tr = np.zeros(n, np.uint32) if trip is None else np.asarray(trip, dtype=np.uint32)
    narrowed = lo_w is not None or hi_w is not None
    inf_cap = np.full(n, np.inf)
    smax = inf_cap if serve_max_w is None else np.asarray(serve_max_w, dtype=np.float64).copy()
    lo0, hi0 = f(lo_w, -np.inf), f(hi_w, np.inf)
    lo, hi = lo0.copy(), hi0.copy()  # the kernel writes the limits it used into them
    out = {k: np.zeros(n) for k in ("battery_w", "served_w", "shed_w", "bus_w")}
    alarm = np.zeros(n, np.uint32)
    order0 = np.argsort(prio, kind="stable").astype(np.int64)
    order, held, timer, state = order0.copy(), np.zeros(n), np.zeros(n), np.zeros(ST_N)
    head = (on, tr, d, f(max_discharge_w), f(max_charge_w), f(link_max_w), f(soc), f(capacity_wh), prio,
            narrowed, np.ones(n), False, smax, smax is not inf_cap, float(main_limit_w), 0.0, p.soc_min, p.soc_max, 0.0, 0.0, 0.0,
            order, held, timer, state, out["battery_w"], out["served_w"], out["shed_w"], out["bus_w"], lo, hi,
            alarm, *Workspace(n).scratch())

    def run() -> dict[str, np.ndarray | float]:
        lo[:] = lo0
        hi[:] = hi0
        order[:] = order0
        held[:] = 0.0
        timer[:] = 0.0
        state[:] = np.nan  # no warm start: lam from scratch
        state[0] = 0.0
        main_w = allocate(*head)
        return {**out, "lo_w": lo, "hi_w": hi, "alarm": alarm, "main_w": main_w}

    return run


def solve(*args, **kwargs) -> dict[str, np.ndarray | float]:
    """One allocation from scratch (see `solver`): for tests and tools."""
    return solver(*args, **kwargs)()
