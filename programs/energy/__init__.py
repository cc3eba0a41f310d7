"""The energy program (DESIGN.md §2b): ride-through targets per priority class, the outage reserve.

Runs after forecast (and protection), before allocation. Every cycle it sums, per priority class,
the demand now, the forecast demand and the pooled usable energy; decides per class how much of
its demand may be served (the main supply in priority order plus the battery energy the class may
draw without cutting into the reserve of the remaining targets of more critical classes); and
writes that as a per-node cap `serve_max_w` (pro rata inside the class), which the allocator
honours in its shedding stage. Nothing here is told that an outage happens: a class depends on
the batteries when the main supply limit cannot carry it (and every more critical class).

Also computes, per class, the runtime if the main supply failed now and whether the target is
reachable; per node, the runtime of its class limited by its own battery. See docs/energy.md.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vbatt.kernel.program import Ctx, Program
from vbatt.kernel.seqblock import ArraySpec

from vbatt.programs.energy.kernel import NX_N, energy_step
from vbatt.programs.energy.rules import ST_N, ST_N_CLS, ST_POS, ST_STARTED

__all__ = ["Energy", "EnergyParams", "MAX_CLASSES", "PRIO_N", "class_rows", "unreachable_texts"]

MAX_CLASSES = 64
PRIO_N = 1001  # priorities 0..1000 (fields.py)


class EnergyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    soc_min: Annotated[float | None, Field(ge=0, le=1, description="usable energy is above it; "
                                                                   "default: the allocation's")] = None
    reset_hold_s: Annotated[float, Field(ge=0, allow_inf_nan=False,
                                         description="a shortage is over after main covered demand "
                                                     "this long")] = 60.0
    horizon_s: Annotated[float, Field(gt=0, allow_inf_nan=False,
                                      description="least horizon for stranded energy")] = 3600.0
    sweep_s: Annotated[float, Field(ge=0, allow_inf_nan=False,
                                    description="the class sums cover every node within this time "
                                                "(0: every cycle)")] = 0.1


class Energy(Program):
    id = "energy"
    Params = EnergyParams
    writes = ("serve_max_w", "runtime_s", "hi_w", "lo_w", "alarm")

    def __init__(self, params, n_nodes):
        super().__init__(params, n_nodes)
        self.targets: dict[int, float] = {}
        self.soc_min = params.soc_min if params.soc_min is not None else 0.1
        self.configured = False

    def configure(self, cfg) -> None:
        self.targets = dict(cfg.plant.ride_through_s)
        if self.params.soc_min is None:
            for e in cfg.programs:
                if e.id == "allocation":
                    self.soc_min = e.params.soc_min
        self.use_forecast = any(e.id == "forecast" for e in cfg.programs)
        self.configured = True

    def _settings(self, img) -> None:
        """The targets (per priority; NaN: none) and soc_min live in memory: a program built again
        without the configuration (a parameter reload) keeps them."""
        by_prio = self.mem(img, "target_by_priority_s")
        by_prio[:] = np.nan
        for p, t in self.targets.items():
            by_prio[p] = t
        self.mem(img, "soc_min")[0] = self.soc_min

    def memory(self) -> list[ArraySpec]:
        k = MAX_CLASSES
        f = [ArraySpec(name, "f8", (k,)) for name in
             ("target_s", "clock_s", "demand_w", "pool_now_w", "reserve_demand_w", "energy_wh", "local_s", "tau_s", "reserve_wh",
              "frac", "runtime_s", "s_tau", "s_cum", "s_tot", "hz_s", "sweep_deliverable_wh", "deliverable_wh", "power_need_w")]
        return [*f, ArraySpec("prev_frac", "f8", (k,)), ArraySpec("latched", "u1", (k,)),
                ArraySpec("reachable", "u1", (k,)), ArraySpec("s_on", "u1", (k,)), ArraySpec("priority", "i8", (k,)),
                ArraySpec("class_of", "i8", (PRIO_N,)), ArraySpec("state", "f8", (ST_N,)),
                ArraySpec("sweep", "f8", (k, NX_N)), ArraySpec("hi_cap_w", "f8", (self.n,)),
                ArraySpec("target_by_priority_s", "f8", (PRIO_N,)), ArraySpec("soc_min", "f8", (1,)),
                ArraySpec("use_forecast", "u1", (1,))]

    def _classes(self, img) -> None:
        """Classes = the distinct priorities present (sorted); beyond MAX_CLASSES they share the last."""
        prios = np.unique(img.node["priority"])
        prios = prios[(prios >= 0) & (prios < PRIO_N)][:MAX_CLASSES]
        cls_of = self.mem(img, "class_of")
        cls_of[:] = np.searchsorted(prios, np.arange(PRIO_N), side="right") - 1
        cls_of[cls_of < 0] = 0
        self.mem(img, "priority")[:] = -1
        self.mem(img, "priority")[: prios.size] = prios
        self.mem(img, "target_s")[:] = 0.0
        by_prio = self.mem(img, "target_by_priority_s")[prios]
        self.mem(img, "target_s")[: prios.size] = np.where(np.isnan(by_prio), 0.0, by_prio)
        self.mem(img, "state")[ST_N_CLS] = prios.size

    def init(self, img) -> None:
        self._settings(img)
        self._classes(img)

    def on_command(self, img, op, node, value, arg) -> None:
        from vbatt.kernel.image import Op

        if op == Op.SET_PRIORITY:
            self._classes(img)

    def bind(self, img, ctx):
        p: EnergyParams = self.params
        nd, agg = img.node, img.agg
        if self.configured:  # from the configuration; else (a reload of parameters) as in memory
            self._settings(img)
        elif self.params.soc_min is not None:
            self.mem(img, "soc_min")[0] = self.params.soc_min
        self._classes(img)
        # the contract: lo_w/hi_w hold the device limits narrowed by the programs before; the forecast
        # is used when the pipeline has one (remembered in memory for a parameter reload)
        narrowed = True
        if self.configured:
            self.mem(img, "use_forecast")[0] = self.use_forecast
        use_fc = bool(self.mem(img, "use_forecast")[0])
        m = lambda k: self.mem(img, k)  # noqa: E731
        state = m("state")
        head = (nd["online"], nd["trip"], nd["priority"], nd["demand_w"], nd["forecast_w"], use_fc, nd["soc"],
                nd["capacity_wh"], nd["max_discharge_w"], nd["link_max_w"], nd["lo_w"], nd["hi_w"], narrowed)
        cycles = max(1, int(round(p.sweep_s / ctx[Ctx.PERIOD_S]))) if ctx[Ctx.PERIOD_S] > 0 else 1
        chunk = max(1, -(-self.n // cycles))
        par = (float(m("soc_min")[0]), p.horizon_s, p.reset_hold_s, chunk, m("class_of"))
        scratch = (np.zeros(self.n, np.int64), *(np.zeros(self.n) for _ in range(10)))
        power = (np.zeros(self.n), np.zeros(self.n), m("power_need_w"))
        tail = (m("target_s"), m("clock_s"), m("latched"), state, m("sweep"), m("demand_w"), m("pool_now_w"),
                m("reserve_demand_w"), m("energy_wh"), m("local_s"), m("tau_s"), m("reserve_wh"), m("frac"),
                m("prev_frac"), m("runtime_s"), m("reachable"), m("s_tau"), m("s_on"), m("s_cum"), m("s_tot"),
                m("hz_s"), m("sweep_deliverable_wh"), m("deliverable_wh"), *scratch, m("hi_cap_w"),
                *power, nd["serve_max_w"], nd["runtime_s"], nd["alarm"])
        state[ST_STARTED] = 0.0  # a (re)bind sweeps every node on its first cycle
        state[ST_POS] = 0.0
        main_limit = agg["main_limit_w"]
        dt = Ctx.DT_S

        def step() -> None:
            energy_step(*head, main_limit[0], ctx[dt], *par, int(state[ST_N_CLS]), *tail)

        return step


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def class_rows(mem: dict[str, np.ndarray]) -> list[dict]:
    """The snapshot's "classes" list from the energy program's memory (empty without it)."""
    if "energy.state" not in mem:
        return []
    k = int(mem["energy.state"][ST_N_CLS])
    g = lambda name: mem["energy." + name]  # noqa: E731
    return [{"priority": int(g("priority")[c]), "demand_w": float(g("demand_w")[c]),
             "reserve_wh": float(g("reserve_wh")[c]), "target_s": float(g("target_s")[c]),
             "runtime_s": _num(g("runtime_s")[c]), "reachable": bool(g("reachable")[c])} for c in range(k)]


def unreachable_texts(mem: dict[str, np.ndarray]) -> list[str]:
    """One line per class whose target is unreachable: "class 1: 1,240 s of 1,800 s"."""
    out = []
    for row in class_rows(mem):
        if not row["reachable"]:
            rt = row["runtime_s"]
            out.append(f"class {row['priority']}: {rt:,.0f} s of {row['target_s']:,.0f} s")
    return out
