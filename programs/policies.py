"""Reference allocation policies that `vbatt simulate` compares with vbatt's allocator.

Each replaces the `allocation` entry of a pipeline (same parameters, same outputs:
battery_w, served_w, shed_w, bus_w, lo_w, hi_w, the allocation alarm bits, and the
aggregate main_w); forecast, protection and health stay as configured.

* `isolated`: what a fleet of independent UPSs does. No node-to-node transfer: a
  node takes main supply for its own load (bus_w >= 0), its battery covers the rest
  of its own load as far as it can, and what is left is shed at that node, whatever
  its priority. The main supply serves load first; when it cannot serve every node,
  every node gets the same fraction of what it wants (no coordinator to do better).
  Main supply to spare charges the batteries, each the same fraction of its room.
  No ramp, no restore hold: an independent UPS reacts at once.
* `proportional`: OpenEMS's NEAR_EQUAL. The bus is shared and priorities order the
  shedding (power order, docs/design.md §2 rule 1), but the battery deficit is split in
  proportion to SoC, capacity ignored: vbatt's own kernel with the usable-energy
  weights capacity_wh * (soc - soc_min) replaced by soc alone. Ramp and restore hold
  as configured for the allocation.

Limits are those of the allocator (stage 1 of `alloc_kernel`): protection's narrowed
lo_w/hi_w when protection runs, the health derate, no discharge at or below soc_min,
no charge at or above soc_max, nothing without capacity.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from vbatt.kernel.program import Ctx

from vbatt.programs.allocation.kernel import ALLOC_ALARMS, allocate
from vbatt.programs.allocation import Allocation, AllocationParams
from vbatt.programs.codes import Alarm

__all__ = ["Isolated", "Proportional", "isolated", "proportional_limits", "POLICIES", "POLICY_DROPS"]

_SAFE = int(Alarm.SAFE_ALLOCATION)
_SHED = int(Alarm.LOAD_SHED)


@njit(nogil=True, cache=True)
def _limits(i, online, trip, demand_w, max_dis_w, max_chg_w, link_w, soc, capacity_wh,
            narrowed, derate, use_derate, soc_min, soc_max, lo_w, hi_w):
    """Stage 1 of the allocator for node i: (usable, lo, hi)."""
    d = demand_w[i]
    g = max_dis_w[i]
    c = max_chg_w[i]
    sc = soc[i]
    lk = link_w[i]
    cw = capacity_wh[i]
    ok = ((online[i] != 0) and (trip[i] == 0) and (d >= 0.0) and (d < math.inf) and (g >= 0.0)
          and (g < math.inf) and (c >= 0.0) and (c < math.inf) and (lk >= 0.0) and (lk < math.inf)
          and (cw >= 0.0) and (cw < math.inf) and (sc >= 0.0) and (sc <= 1.0))
    lo = -c
    hi = g
    if narrowed:
        pl = lo_w[i]
        ph = hi_w[i]
        lo = max(lo, pl) if pl == pl else lo
        hi = min(hi, ph) if ph == ph else hi
    if use_derate:
        f = derate[i]
        f = f if (f >= 0.0) and (f <= 1.0) else 1.0
        lo *= f
        hi *= f
    lo = min(0.0 if (sc >= soc_max) or (cw <= 0.0) else lo, 0.0)
    hi = max(0.0 if (sc <= soc_min) or (cw <= 0.0) else hi, 0.0)
    return ok, lo, hi


@njit(nogil=True, cache=True)
def isolated(online, trip, demand_w, max_dis_w, max_chg_w, link_w, soc, capacity_wh,
             narrowed, derate, use_derate, main_limit_w, soc_min, soc_max,
             battery_w, served_w, shed_w, bus_w, lo_w, hi_w, alarm, want_w, room_w):
    """Every node on its own battery; the main supply shared by a common fraction. Returns main_w.
    want_w/room_w are scratch."""
    n = online.shape[0]
    main = main_limit_w if main_limit_w >= 0.0 and main_limit_w < math.inf else 0.0
    tot_want = 0.0
    for i in range(n):
        ok, lo, hi = _limits(i, online, trip, demand_w, max_dis_w, max_chg_w, link_w, soc, capacity_wh,
                             narrowed, derate, use_derate, soc_min, soc_max, lo_w, hi_w)
        alarm[i] = alarm[i] & ~ALLOC_ALARMS
        lo_w[i] = lo if ok else 0.0
        hi_w[i] = hi if ok else 0.0
        want_w[i] = min(demand_w[i], link_w[i]) if ok else -1.0  # -1: not usable
        tot_want += want_w[i] if ok else 0.0
    f = min(1.0, main / tot_want) if tot_want > 0.0 else 0.0
    spare = max(0.0, main - f * tot_want)
    tot_room = 0.0
    for i in range(n):
        d = demand_w[i]
        if want_w[i] < 0.0:  # offline, tripped or bad data: as the allocator treats them
            battery_w[i] = 0.0
            bus_w[i] = 0.0
            served_w[i] = 0.0
            shed_w[i] = 0.0
            room_w[i] = 0.0
            if online[i] == 0:
                continue
            fine_d = d >= 0.0 and d < math.inf
            if trip[i] != 0:
                shed_w[i] = d if fine_d else 0.0
            else:
                g = max_dis_w[i]
                good = fine_d and g >= 0.0 and g < math.inf
                b = min(d, g) if good else 0.0
                battery_w[i] = b
                served_w[i] = b
                shed_w[i] = d - b if fine_d else 0.0
                hi_w[i] = g if good else 0.0
                alarm[i] |= _SAFE
            if shed_w[i] > 0.0:
                alarm[i] |= _SHED
            continue
        m = f * want_w[i]
        b = min(d - m, hi_w[i])
        bus_w[i] = m
        battery_w[i] = b
        served_w[i] = m + b
        shed_w[i] = d - m - b
        r = min(-lo_w[i], link_w[i] - m) if b <= 0.0 else 0.0
        room_w[i] = max(r, 0.0)
        tot_room += room_w[i]
    g = min(1.0, spare / tot_room) if tot_room > 0.0 else 0.0
    main_w = 0.0
    for i in range(n):
        if want_w[i] < 0.0:
            continue
        c = g * room_w[i]
        battery_w[i] -= c
        bus_w[i] += c
        main_w += bus_w[i]
        if shed_w[i] > 1e-9 * (1.0 + demand_w[i]):
            alarm[i] |= _SHED
    return main_w


@njit(nogil=True, cache=True)
def proportional_limits(online, trip, demand_w, max_dis_w, max_chg_w, link_w, soc, capacity_wh,
                        narrowed, derate, use_derate, soc_min, soc_max, lo_w, hi_w, unit_wh):
    """The allocator's limits written into lo_w/hi_w (with soc_min applied here), and a unit
    capacity per node with a battery: the kernel then weighs each battery by its SoC alone."""
    for i in range(online.shape[0]):
        ok, lo, hi = _limits(i, online, trip, demand_w, max_dis_w, max_chg_w, link_w, soc, capacity_wh,
                             narrowed, derate, use_derate, soc_min, soc_max, lo_w, hi_w)
        lo_w[i] = lo
        hi_w[i] = hi
        c = capacity_wh[i]
        unit_wh[i] = 1.0 if (c > 0.0) and (c < math.inf) else c  # bad data stays bad


class Isolated(Allocation):
    id = "isolated"
    Params = AllocationParams

    def memory(self):
        return []

    def init(self, img) -> None:
        pass

    def on_command(self, img, op, node, value, arg) -> None:
        pass

    def bind(self, img, ctx):
        p: AllocationParams = self.params
        nd, agg = img.node, img.agg
        # the contract: lo_w/hi_w hold the device limits narrowed by the programs before (health's derate
        # included), so the policy reads them as they are
        narrowed, use_derate, derate = True, False, np.ones(self.n)
        head = (nd["online"], nd["trip"], nd["demand_w"], nd["max_discharge_w"], nd["max_charge_w"],
                nd["link_max_w"], nd["soc"], nd["capacity_wh"], narrowed, derate, use_derate)
        tail = (p.soc_min, p.soc_max, nd["battery_w"], nd["served_w"], nd["shed_w"], nd["bus_w"],
                nd["lo_w"], nd["hi_w"], nd["alarm"], np.zeros(self.n), np.zeros(self.n))
        main_limit, main_w = agg["main_limit_w"], agg["main_w"]

        def step() -> None:
            main_w[0] = isolated(*head, main_limit[0], *tail)

        return step


class Proportional(Allocation):
    """The allocator's kernel and memory (ramp, restore hold) with SoC-proportional weights."""

    id = "proportional"
    Params = AllocationParams

    def bind(self, img, ctx):
        from vbatt.programs.allocation import Workspace

        p: AllocationParams = self.params
        nd, agg = img.node, img.agg
        # the contract: lo_w/hi_w hold the device limits narrowed by the programs before (health's derate
        # included), so the policy reads them as they are
        narrowed, use_derate, derate = True, False, np.ones(self.n)
        unit = np.zeros(self.n)
        ws = Workspace(self.n)
        self._ws = ws
        inputs = (nd["online"], nd["trip"], nd["demand_w"], nd["max_discharge_w"], nd["max_charge_w"],
                  nd["link_max_w"], nd["soc"])
        prep = (*inputs, nd["capacity_wh"], narrowed, derate, use_derate, p.soc_min, p.soc_max,
                nd["lo_w"], nd["hi_w"], unit)
        # soc_min 0 in the kernel: the reserve is already in hi_w, and the weight is then soc itself
        head = (*inputs, unit, nd["priority"], True, derate, False, nd["serve_max_w"], True)
        par = (0.0, p.soc_max, p.ramp_w_per_s, p.restore_hold_s, p.restore_margin)
        mem = [self.mem(img, k) for k in ("order", "held_w", "timer_s", "state")]
        tail = (*mem, nd["battery_w"], nd["served_w"], nd["shed_w"], nd["bus_w"], nd["lo_w"], nd["hi_w"],
                nd["alarm"], *ws.scratch())
        main_limit, main_w = agg["main_limit_w"], agg["main_w"]
        dt = Ctx.DT_S

        def step() -> None:
            proportional_limits(*prep)
            main_w[0] = allocate(*head, main_limit[0], ctx[dt], *par, *tail)

        return step


# Policy name -> the program id that takes the place of `allocation` (None: the pipeline as configured).
# `vbatt-instant` is the configured pipeline without the `energy` program (docs/design.md §2 at each instant, no
# ride-through targets): what vbatt did before the energy layer, to show the two side by side.
POLICIES: dict[str, str | None] = {"isolated": "isolated", "proportional": "proportional", "vbatt": None,
                                   "vbatt-instant": None}
# Programs a policy leaves out of the configured pipeline.
POLICY_DROPS: dict[str, tuple[str, ...]] = {"vbatt-instant": ("energy",)}
