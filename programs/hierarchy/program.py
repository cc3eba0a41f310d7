"""The `tree` program: a leaf controller applies the levels of the whole tree to its nodes.

List it after `allocation`. While its parent's levels are leased (memory `levels[0]`: the wall-clock
time the lease runs out, set through Op.SET_MEMORY by the hierarchy link process, vbatt.hierarchy.link,
every round), it replaces the allocation's
outputs of every usable node with stages 2 and 4 of docs/design.md §2 evaluated at the tree's common
levels (programs/hierarchy/curves.py says why that is the flat optimum of the whole fleet). The limits
are the ones the allocation used this cycle (its lo_w/hi_w). Nodes the allocation could not use
(offline, tripped, bad data: alarm SAFE_ALLOCATION) keep its safe outputs. Without a lease the
allocation's own answer stands (the link process has then restored the configured main_limit_w). The
deadline is the scan's own check: levels retained across a warm restart, or left behind by a link
process that died, lapse by themselves.

memory `levels`: [lease deadline (wall s; 0 = none), discharge (1) or charge (0), lam, mu of class 0, ...,
mu of class K-1];
a class at or beyond K gets only its free load (as a class the top did not see).
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
from numba import njit
from pydantic import BaseModel, ConfigDict, Field

from vbatt.kernel.fields import NODE_OUTPUTS, names
from vbatt.kernel.program import Program
from vbatt.kernel.seqblock import ArraySpec
from vbatt.programs.codes import Alarm

__all__ = ["Tree", "TreeParams", "LEVELS", "L_LEASED", "L_DIS", "L_LAM", "L_MU"]

LEVELS = "levels"
L_LEASED, L_DIS, L_LAM, L_MU = 0, 1, 2, 3
_SAFE = int(Alarm.SAFE_ALLOCATION)
_SHED = int(Alarm.LOAD_SHED)
_FLOOR_WH = 1e-6


class TreeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    classes: Annotated[int, Field(ge=1, le=64, description="priority classes the levels carry (0..K-1)")] = 8


@njit(nogil=True, cache=True)
def tree_step(online, trip, demand_w, lo_w, hi_w, link_max_w, soc, capacity_wh, priority, serve_max_w,
              soc_bounds, wall_s, levels, battery_w, served_w, shed_w, bus_w, alarm, agg_main_w):
    if not wall_s[0] < levels[L_LEASED]:
        return
    k = levels.shape[0] - L_MU
    dis = levels[L_DIS] == 1.0
    lam = levels[L_LAM]
    soc_min, soc_max = soc_bounds[0], soc_bounds[1]
    main = 0.0
    for i in range(online.shape[0]):
        if online[i] == 0 or trip[i] != 0 or (alarm[i] & _SAFE) != 0:
            main += bus_w[i]
            continue
        d = demand_w[i]
        h = hi_w[i]
        lo = lo_w[i]
        lk = link_max_w[i]
        sm = serve_max_w[i]
        cap = min(d, h + lk, max(sm, 0.0) if sm == sm else math.inf)
        free = min(cap, max(0.0, h - lk))
        p = priority[i]
        mu = levels[L_MU + p] if 0 <= p < k else math.inf
        if d > 0.0:
            s = min(d - free, max(d - cap, mu * d))
        else:
            s = 0.0
        r = d - s
        bh = min(h, r + lk)
        bl = min(max(lo, r - lk), bh)
        cw = capacity_wh[i]
        w = max(cw * max(0.0, soc[i] - soc_min if dis else soc_max - soc[i]), _FLOOR_WH)
        b = min(bh, max(bl, lam * w))
        served_w[i] = r
        shed_w[i] = d - r
        battery_w[i] = b
        bus_w[i] = r - b
        main += r - b
        if d - r > 1e-9 * (1.0 + d):
            alarm[i] |= _SHED
        else:
            alarm[i] &= ~_SHED
    agg_main_w[0] = main


class Tree(Program):
    id = "tree"
    Params = TreeParams
    kernel = tree_step
    writes = names(NODE_OUTPUTS) + ("alarm", "agg_main_w")

    def __init__(self, params, n_nodes):
        super().__init__(params, n_nodes)
        self.soc_bounds = np.array([0.1, 1.0])

    def configure(self, cfg) -> None:
        for e in cfg.programs:  # the same reserve and top as the allocation it overrides
            if e.id == "allocation":
                self.soc_bounds = np.array([e.params.soc_min, e.params.soc_max])

    def memory(self) -> list[ArraySpec]:
        return [ArraySpec(LEVELS, "f8", (L_MU + self.params.classes,))]

    def bindings(self, img) -> dict:
        return {"soc_bounds": self.soc_bounds}

    def set_memory(self, img, name: str, index: int, value: float) -> str | None:
        if name != LEVELS:
            return super().set_memory(img, name, index, value)
        a = self.mem(img, LEVELS)
        if not 0 <= index < a.shape[0] or math.isnan(value):
            return f"tree.levels[{index}] = {value!r}: index out of 0..{a.shape[0] - 1} or NaN"
        a[index] = value
        return None
