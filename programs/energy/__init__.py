"""The energy program (docs/design.md §2b): ride-through targets per priority class, the outage reserve.

Runs after forecast (and protection), before allocation. Every cycle it sums, per priority class,
the demand now, the forecast demand and the pooled usable energy; decides per class how much of
its demand may be served (the main supply in priority order plus the battery energy the class may
draw without cutting into the reserve of the remaining targets of more critical classes); and
writes that as a per-node cap `serve_max_w` (pro rata inside the class), which the allocator
honours in its shedding stage. Nothing here is told that an outage happens: a class depends on
the batteries when the main supply limit cannot carry it (and every more critical class).

The class demand of the reserve, D_k, is the class's forecast mean demand over its remaining target
(horizon.py: smoothing plus a daily profile learnt online, seeded at a cold start from each
class's own recorded demand (seed.py), or from the recorded aggregate when the fleet is one class),
never less than the demand now; `demand_forecast: false` keeps the demand now.

Also computes, per class, the runtime if the main supply failed now and whether the target is
reachable; per node, the runtime of its class limited by its own battery. See docs/energy.md.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from numba import njit
from pydantic import BaseModel, ConfigDict, Field

from vbatt.kernel.program import Ctx, Program, bind_kernel
from vbatt.kernel.seqblock import ArraySpec

from vbatt.programs.energy.horizon import HZ_N, preseed
from vbatt.programs.energy.kernel import HP_N, NX_N, energy_step, horizon_params
from vbatt.programs.energy.rules import ST_N, ST_N_CLS, ST_POS, ST_STARTED
from vbatt.programs.energy.tree import T_AT, T_SWEPT, T_USED, probe_at, tree_size

__all__ = ["Energy", "EnergyParams", "MAX_CLASSES", "PRIO_N", "class_rows", "unreachable_texts"]

log = logging.getLogger("vbatt.energy")

MAX_CLASSES = 64
PRIO_N = 1001  # priorities 0..1000 (fields.py)
Pos = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class EnergyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    soc_min: Annotated[float | None, Field(ge=0, le=1, description="usable energy is above it; "
                                                                   "default: the allocation's")] = None
    reset_hold_s: Annotated[float, Field(ge=0, allow_inf_nan=False,
                                         description="a shortage is over after main covered demand "
                                                     "this long")] = 60.0
    horizon_s: Annotated[float, Field(gt=0, allow_inf_nan=False,
                                      description="least horizon for stranded energy")] = 3600.0
    efficiency: Annotated[float, Field(gt=0, le=1, description="the share of the energy above soc_min that "
                                       "reaches the loads (the batteries' discharge efficiency)")] = 1.0
    restore_s: Annotated[float, Field(ge=0, allow_inf_nan=False,
                                      description="a peak-shaved class's cut is calm: its share comes back by "
                                                  "at most its demand over this time (0: just in time)")] = 60.0
    power_runtime: Annotated[bool, Field(description="a class's reserve, runtime and own-need locks end where "
                                                     "the batteries' power and links can no longer carry it "
                                                     "(docs/energy.md; in a tree of controllers: the top's)")] = True
    sweep_s: Annotated[float, Field(ge=0, allow_inf_nan=False,
                                    description="the class sums cover every node within this time "
                                                "(0: every cycle)")] = 0.1
    demand_forecast: Annotated[bool, Field(description="the reserve's class demand is the class forecast "
                                                       "over the horizon (false: the demand now)")] = True
    demand_horizon_s: Annotated[float | None, Field(gt=0, allow_inf_nan=False,
                                                    description="the forecast's window (default: the class's "
                                                                "remaining target)")] = None
    demand_level_tau_s: Pos = 300.0
    demand_trend_tau_s: Pos = 7200.0
    demand_damping_s: Annotated[Pos, Field(description="the trend fades with this time constant")] = 3600.0
    demand_season_s: Annotated[float | None, Field(gt=0, allow_inf_nan=False,
                                                   description="the profile's period (null: none)")] = 86400.0
    demand_season_bins: Annotated[int, Field(ge=2, le=1440)] = 96
    demand_season_tau_s: Annotated[Pos, Field(description="how fast the profile follows change")] = 86400.0
    demand_seed: Annotated[Literal["auto", "always", "never"],
                           Field(description="start each class's profile from its own recorded demand, else "
                                             "from the recorded aggregate's (auto: only when there is one "
                                             "class; always: every class; never: none)")] = "auto"


@njit(nogil=True, cache=True)
def energy_kernel(online, trip, priority, demand_w, forecast_w, soc, capacity_wh, max_discharge_w, link_max_w,
                  lo_w, hi_w, serve_max_w, runtime_s, alarm, agg_main_limit_w, dt_s, wall_s,
                  efficiency, horizon_s, reset_hold_s, chunk, restore_s, power_runtime, settings, classes, sweep,
                  node_memory, scratch, forecast, tree_link):
    """The program's kernel, bound by name (docs/programs.md); its groups are unpacked here, in one
    place, for `energy_step`. lo_w/hi_w arrive narrowed by the programs before it."""
    soc_min, use_forecast, class_of, state, hp = settings
    (target_s, clock_s, latched, dmd, pool_now, reserve_demand, energy_wh, local_s, tau_s, reserve_wh, frac,
     prev_frac, class_runtime_s, reachable, s_tau, s_on, s_cum, s_tot, hz_s, sweep_deliv, deliv, pneed, probe_s,
     probe_wh, power_s, power_cap, stranded_w) = classes
    (hi_cap,) = node_memory
    (v_cls, v_f, v_now, v_res, v_e, v_loc, v_rate, v_g, v_d, v_own, v_eraw, v_pn, v_ps, v_rel, v_yld, v_str,
     v_yls) = scratch
    hz, season, prior, prior_season, dhz = forecast
    tree, prio_of, slack_w = tree_link
    energy_step(online, trip, priority, demand_w, forecast_w, use_forecast[0] != 0, soc, capacity_wh,
                max_discharge_w, link_max_w, lo_w, hi_w, True, agg_main_limit_w[0], dt_s[0],
                soc_min[0], efficiency, horizon_s, reset_hold_s, chunk, restore_s, power_runtime != 0, class_of,
                int(state[ST_N_CLS]),
                target_s, clock_s, latched, state, sweep, dmd, pool_now, reserve_demand, energy_wh, local_s, tau_s,
                reserve_wh, frac, prev_frac, class_runtime_s, reachable, s_tau, s_on, s_cum, s_tot, hz_s,
                sweep_deliv, deliv, probe_s, probe_wh, power_s, power_cap, v_cls, v_f, v_now, v_res, v_e, v_loc,
                v_rate, v_g, v_d, v_own, v_eraw, hi_cap,
                v_pn, v_ps, v_rel, pneed, serve_max_w, runtime_s, alarm, wall_s[0], hp, hz, season, prior,
                prior_season, dhz, tree, prio_of, slack_w, v_yld, v_str, stranded_w, v_yls)


class Energy(Program):
    id = "energy"
    Params = EnergyParams
    writes = ("serve_max_w", "runtime_s", "hi_w", "lo_w", "alarm")
    # the class results SCADA shows (class_rows) travel whole with every publish, and the class sums a
    # controller in a tree offers its parent (programs/hierarchy/classes.py)
    published = ("priority", "demand_w", "demand_horizon_w", "reserve_wh", "target_s", "runtime_s", "reachable",
                 "state", "energy_wh", "local_s", "clock_s", "latched", "pool_now_w", "power_need_w", "power_slack_w",
                 "deliverable_wh", "tree", "reserve_demand_w", "stranded_w")
    SETTING = "target_by_priority_s"  # the operator setting (Op.SET_MEMORY): a ride-through target per priority
    TREE = "tree"  # the tree's class decisions, written by the hierarchy link of a leaf (tree.py)

    def __init__(self, params, n_nodes):
        super().__init__(params, n_nodes)
        self.targets: dict[int, float] = {}
        self.soc_min = params.soc_min if params.soc_min is not None else 0.1
        self.configured = False
        self.history_path: Path | None = None
        self.tree_classes = 0  # a leaf of a controller tree: the tree's classes 0..K-1 are classes here too

    def configure(self, cfg) -> None:
        self.targets = dict(cfg.plant.ride_through_s)
        if self.params.soc_min is None:
            for e in cfg.programs:
                if e.id == "allocation":
                    self.soc_min = e.params.soc_min
        self.use_forecast = any(e.id == "forecast" for e in cfg.programs)
        self.configured = True
        h = getattr(cfg, "hierarchy", None)
        self.tree_classes = h.classes if h is not None and h.role == "leaf" else 0
        o = cfg.opcua
        if o.enabled and o.history.enabled:
            from vbatt.programs.recorded import HISTORY_FILE

            self.history_path = Path(o.state_dir).expanduser() / HISTORY_FILE

    def _targets(self, img) -> None:
        """The configured targets (per priority; NaN: none), set once at a cold start: from then on they
        are an operator setting in memory (set_memory), kept by a parameter reload and a warm restart."""
        by_prio = self.mem(img, self.SETTING)
        by_prio[:] = np.nan
        for p, t in self.targets.items():
            by_prio[p] = t

    def _settings(self, img) -> None:
        """soc_min and the tree's classes live in memory: a program built again without the
        configuration (a parameter reload) keeps them."""
        self.mem(img, "soc_min")[0] = self.soc_min
        self.mem(img, "tree_classes")[0] = self.tree_classes

    def set_memory(self, img, name: str, index: int, value: float) -> str | None:
        if name == self.TREE:
            a = self.mem(img, self.TREE)
            top = probe_at(a.shape[0])  # beyond: the power probe's answer, the program's own
            if not 0 <= index < top or index in (T_USED, T_SWEPT) or (index == 0 and math.isnan(value)):
                return f"energy.tree[{index}] = {value!r}: index out of 0..{top - 1} or a NaN lease"
            a[index] = value
            return None
        if name != self.SETTING:
            return super().set_memory(img, name, index, value)
        if not 0 <= index < PRIO_N:
            return f"ride-through target of priority {index}: expected a priority 0..{PRIO_N - 1}"
        if not (np.isnan(value) or (np.isfinite(value) and value >= 0)):
            return f"ride-through target {value!r} s of priority {index}: expected seconds >= 0 (NaN: none)"
        self.mem(img, self.SETTING)[index] = value
        self._classes(img)
        return None

    def memory(self) -> list[ArraySpec]:
        k = MAX_CLASSES
        f = [ArraySpec(name, "f8", (k,)) for name in
             ("target_s", "clock_s", "demand_w", "pool_now_w", "reserve_demand_w", "energy_wh", "local_s", "tau_s", "reserve_wh",
              "frac", "runtime_s", "s_tau", "s_cum", "s_tot", "hz_s", "power_need_w", "probe_s", "power_s",
              "power_cap_s", "stranded_w")]
        # deliverable energy per horizon (columns) with the classes before the row's served (kernel _horizons)
        f += [ArraySpec(name, "f8", (k + 1, k)) for name in ("sweep_deliverable_wh", "deliverable_wh")]
        # the power runtime's probe per class: deliverable energy and its slope at probe_s (kernel _power_probe)
        f += [ArraySpec("sweep_probe", "f8", (2, k))]
        return [*f, ArraySpec("prev_frac", "f8", (k,)), ArraySpec("latched", "u1", (k,)),
                ArraySpec("reachable", "u1", (k,)), ArraySpec("s_on", "u1", (k,)), ArraySpec("priority", "i8", (k,)),
                ArraySpec("class_of", "i8", (PRIO_N,)), ArraySpec("state", "f8", (ST_N,)),
                ArraySpec("sweep", "f8", (k, NX_N)), ArraySpec("hi_cap_w", "f8", (self.n,)),
                ArraySpec("target_by_priority_s", "f8", (PRIO_N,)), ArraySpec("soc_min", "f8", (1,)),
                ArraySpec("use_forecast", "u1", (1,)), ArraySpec("demand_horizon_w", "f8", (k,)),
                ArraySpec("hz", "f8", (k, HZ_N)), ArraySpec("hz_season_w", "f8", (k, self._bins())),
                ArraySpec("hz_prior", "f8", (3,)), ArraySpec("hz_prior_season_w", "f8", (self._bins(),)),
                # the classes' own recorded profiles, by priority (-1: an empty row), read at a cold start
                ArraySpec("hz_class_prior", "i8", (k,)), ArraySpec("hz_class_prior_w", "f8", (k, self._bins())),
                ArraySpec("hz_params", "f8", (HP_N,)), ArraySpec("power_slack_w", "f8", (k,)),
                ArraySpec(self.TREE, "f8", (tree_size(MAX_CLASSES),)), ArraySpec("tree_classes", "i8", (1,))]

    def _bins(self) -> int:
        return self.params.demand_season_bins if self.params.demand_season_s else 1

    def _classes(self, img) -> None:
        """Classes = the distinct priorities present (sorted); beyond MAX_CLASSES they share the last. A leaf
        of a controller tree also has the tree's classes it has no node of (demand 0): the top's class rules
        need its deliverable energy within every class's remaining target (docs/hierarchy.md)."""
        prios = np.union1d(img.node["priority"], np.arange(self.tree_classes))
        prios = prios[(prios >= 0) & (prios < PRIO_N)][:MAX_CLASSES]
        old = self.mem(img, "priority")
        anew = not np.array_equal(old[: prios.size], prios) or (prios.size < old.size and old[prios.size] != -1)
        if anew:
            self.mem(img, "hz")[:] = 0.0  # other classes: their demand forecasts start anew
        cls_of = self.mem(img, "class_of")
        cls_of[:] = np.searchsorted(prios, np.arange(PRIO_N), side="right") - 1
        cls_of[cls_of < 0] = 0
        self.mem(img, "priority")[:] = -1
        self.mem(img, "priority")[: prios.size] = prios
        self.mem(img, "target_s")[:] = 0.0
        by_prio = self.mem(img, "target_by_priority_s")[prios]
        self.mem(img, "target_s")[: prios.size] = np.where(np.isnan(by_prio), 0.0, by_prio)
        self.mem(img, "state")[ST_N_CLS] = prios.size
        if anew:
            self._preseed(img)

    def init(self, img) -> None:
        self._targets(img)
        self._settings(img)
        self.mem(img, "priority")[:] = -1
        self.mem(img, "hz_class_prior")[:] = -1  # nothing recorded until _seed has read it
        self._classes(img)
        self.mem(img, "hz")[:] = 0.0
        self.mem(img, self.TREE)[:] = np.nan
        self.mem(img, self.TREE)[:T_AT] = 0.0  # no lease
        self._seed(img)

    def _seed(self, img) -> None:
        """The class profiles start from what the OPC UA server recorded, when the history is on: each
        class's own demand (seed.py), else the aggregate's profile through the forecast's reader
        (programs/forecast.py seed_from_history). A file that cannot be read is a log line, never a
        stop: the forecast then learns online, as without a history."""
        prior, season = self.mem(img, "hz_prior"), self.mem(img, "hz_prior_season_w")
        prior[:] = np.nan
        season[:] = 0.0
        rows, own = self.mem(img, "hz_class_prior"), self.mem(img, "hz_class_prior_w")
        rows[:] = -1
        own[:] = np.nan
        p: EnergyParams = self.params
        if self.history_path is None or not p.demand_season_s or not p.demand_forecast or p.demand_seed == "never":
            return
        self._seed_classes(img)
        from vbatt.programs.forecast import ForecastParams, seed_from_history

        fp = ForecastParams(season_s=p.demand_season_s, season_bins=p.demand_season_bins,
                            trend_tau_s=p.demand_trend_tau_s)
        try:
            line = seed_from_history(self.history_path, fp, time.time(), prior, season)
        except Exception as exc:  # a damaged history file must not stop the controller
            prior[:] = np.nan
            line = f"recorded history unusable ({type(exc).__name__}: {exc})"
        log.info("energy: class demand profiles: %s", line)

    def _seed_classes(self, img) -> None:
        """Each class's own recorded profile into memory by priority (the classes present first, then
        any other recorded one, up to MAX_CLASSES rows), then in place for the classes now."""
        from vbatt.programs.energy.seed import class_profiles

        p: EnergyParams = self.params
        rows, own = self.mem(img, "hz_class_prior"), self.mem(img, "hz_class_prior_w")
        try:
            profiles, lines = class_profiles(self.history_path, time.time(), p.demand_season_s, self._bins(),
                                             p.demand_season_tau_s)
        except Exception as exc:  # a damaged history file must not stop the controller
            log.warning("energy: recorded class demand in %s unusable (%s: %s): the classes start without it",
                        self.history_path, type(exc).__name__, exc)
            return
        present = set(int(x) for x in self.mem(img, "priority") if x >= 0)
        order = sorted(profiles, key=lambda q: (q not in present, q))[: rows.shape[0]]
        for r, q in enumerate(order):
            rows[r] = q
            own[r] = profiles[q]
        for line in lines:
            log.info("energy: recorded demand: %s", line)
        self._preseed(img)

    def _preseed(self, img) -> None:
        """The own recorded profile of every class that has not started, in place for its first sample
        (horizon.preseed; the kernel decides there whether it is used: demand_seed)."""
        if not self.params.demand_season_s:
            return
        rows, own = self.mem(img, "hz_class_prior"), self.mem(img, "hz_class_prior_w")
        hz, season = self.mem(img, "hz"), self.mem(img, "hz_season_w")
        at = {int(q): r for r, q in enumerate(rows) if q >= 0}
        for k, q in enumerate(self.mem(img, "priority")):
            if q < 0:
                break
            r = at.get(int(q))
            preseed(hz, season, k, own[r] if r is not None else None)

    def on_command(self, img, op, node, value, arg) -> None:
        from vbatt.kernel.image import Op

        if op == Op.SET_PRIORITY:
            self._classes(img)

    def bind(self, img, ctx):
        p: EnergyParams = self.params
        if self.configured:  # from the configuration; else (a reload of parameters) as in memory
            self._settings(img)
        else:
            self.tree_classes = int(self.mem(img, "tree_classes")[0])
            if self.params.soc_min is not None:
                self.mem(img, "soc_min")[0] = self.params.soc_min
        self._classes(img)
        # the forecast is used when the pipeline has one (remembered in memory for a parameter reload)
        if self.configured:
            self.mem(img, "use_forecast")[0] = self.use_forecast
        m = lambda k: self.mem(img, k)  # noqa: E731
        state = m("state")
        cycles = max(1, int(round(p.sweep_s / ctx[Ctx.PERIOD_S]))) if ctx[Ctx.PERIOD_S] > 0 else 1
        hp = m("hz_params")
        hp[:] = horizon_params(p)
        season = m("hz_season_w")[:, : (p.demand_season_bins if p.demand_season_s else 0)]
        # The kernel is bound by name (vbatt.kernel.program): image fields by their names (read-only
        # unless in `writes`), the rest in named groups. Memory is passed in groups because three of its
        # per-class arrays (priority, demand_w, runtime_s) share a name with a node field.
        own = dict(
            settings=(m("soc_min"), m("use_forecast"), m("class_of"), state, hp),
            classes=(m("target_s"), m("clock_s"), m("latched"), m("demand_w"), m("pool_now_w"),
                     m("reserve_demand_w"), m("energy_wh"), m("local_s"), m("tau_s"), m("reserve_wh"), m("frac"),
                     m("prev_frac"), m("runtime_s"), m("reachable"), m("s_tau"), m("s_on"), m("s_cum"), m("s_tot"),
                     m("hz_s"), m("sweep_deliverable_wh"), m("deliverable_wh"), m("power_need_w"),
                     m("probe_s"), m("sweep_probe"), m("power_s"), m("power_cap_s"), m("stranded_w")),
            sweep=m("sweep"),
            node_memory=(m("hi_cap_w"),),
            scratch=(np.zeros(self.n, np.int64), *(np.zeros(self.n) for _ in range(16))),
            forecast=(m("hz"), season, m("hz_prior"), m("hz_prior_season_w")[: season.shape[1]],
                      m("demand_horizon_w")),
            tree_link=(m(self.TREE), m("priority"), m("power_slack_w")),
        )
        params = dict(efficiency=p.efficiency, horizon_s=p.horizon_s, reset_hold_s=p.reset_hold_s,
                      restore_s=p.restore_s, power_runtime=1 if p.power_runtime else 0,
                      chunk=max(1, -(-self.n // cycles)))
        args = bind_kernel(energy_kernel, where=f"program {self.id!r}", img=img, ctx=ctx, own=own, params=params,
                           writes=self.writes)
        state[ST_STARTED] = 0.0  # a (re)bind sweeps every node on its first cycle
        state[ST_POS] = 0.0
        return lambda: energy_kernel(*args)


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def class_rows(mem: dict[str, np.ndarray]) -> list[dict]:
    """The snapshot's "classes" list from the energy program's memory (empty without it)."""
    if "energy.state" not in mem:
        return []
    k = int(mem["energy.state"][ST_N_CLS])
    g = lambda name: mem["energy." + name]  # noqa: E731
    return [{"priority": int(g("priority")[c]), "demand_w": float(g("demand_w")[c]),
             "demand_horizon_w": float(g("demand_horizon_w")[c]),
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
