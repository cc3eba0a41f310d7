"""The metrics of a simulation run (docs/simulate.md defines each), as plain JSON-able data.

Times are on the step grid: an event or a change seen in step k is at t = k * step_s.
"""

from __future__ import annotations

import math
import os
import platform

from vbatt.scenario.record import CS, FL
from vbatt.scenario.runner import RunResult

__all__ = ["policy_metrics", "sim_metrics", "machine"]


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def policy_metrics(r: RunResult) -> dict:
    rec, dt = r.rec, r.step_s
    drop_t = r.drop_k * dt if r.drop_k >= 0 else 0.0
    end_t = r.steps * dt
    classes = {}
    for c in r.classes:
        first = int(rec.first_c[0, c])
        unserved = int(rec.first_c[1, c]) if r.drop_k >= 0 else first
        demand_wh, served_wh, shed_wh = (float(rec.acc_c[row, c]) for row in range(3))
        classes[str(c)] = {
            "first_shed_s": None if first < 0 else first * dt,
            "ride_through_s": _ride_through(end_t, drop_t, unserved, dt),
            "served_wh": served_wh,
            "demand_wh": demand_wh,
            "shed_wh": shed_wh,
            "served_fraction": served_wh / demand_wh if demand_wh > 0 else 1.0,
            "never_shed_after_drop": unserved < 0,
            "target_s": r.targets_s.get(c, 0.0),
            "target_met": _target_met(r, end_t - drop_t, unserved, _ride_through(end_t, drop_t, unserved, dt),
                                      r.targets_s.get(c, 0.0)),
        }
    fl = rec.fl
    fleet = {
        "battery_wh": float(fl[FL.DIS_WH]),
        "battery_charge_wh": float(fl[FL.CHG_WH]),
        "capacity_wh": r.capacity_wh,
        "peak_main_w": float(fl[FL.PEAK_MAIN_W]),
        "soc_spread_max": float(fl[FL.SPREAD_MAX]),
        "stranded_wh": _num(fl[FL.STRANDED_WH]),
        "setpoint_reversals": int(fl[FL.REVERSALS]),
        "demand_wh": float(fl[FL.DEMAND_WH]),
        "shed_wh": float(fl[FL.SHED_WH]),
        "first_shed_s": None if fl[FL.FIRST_SHED_K] < 0 else float(fl[FL.FIRST_SHED_K]) * dt,
        "main_drop_s": drop_t if r.drop_k >= 0 else None,
    }
    return {"classes": classes, "fleet": fleet, "critical": _critical(r, classes), "reserve": _reserve(r),
            "energy_alarms": list(r.energy_alarms), "wall_s": r.wall_s,
            "speed_x": (r.steps * dt) / r.wall_s if r.wall_s > 0 else None, "pipeline": r.pipeline,
            "has_runtime": rec.has_runtime}


def _ride_through(end_t: float, drop_t: float, unserved: int, dt: float) -> float:
    return (end_t - drop_t) if unserved < 0 else max(0.0, unserved * dt - drop_t)


def _target_met(r: RunResult, after_drop_s: float, unserved: int, ride_s: float, target_s: float) -> bool | None:
    """Rode through its target after the drop (never shed after it counts when the run lasted the
    target). None: no drop, or never shed in a run shorter than the target (not decided)."""
    if r.drop_k < 0:
        return None
    if ride_s >= target_s - 1e-9:
        return True
    return None if unserved < 0 else False


def _critical(r: RunResult, classes: dict) -> dict | None:
    """The most critical class against its pooled-energy bound: every battery's usable energy at the
    drop over that class's demand then (what it would ride on the whole pool, losses aside)."""
    if r.drop_k < 0 or not r.classes or r.usable_at_drop_wh is None:
        return None
    c = r.classes[0]
    d = r.demand_at_drop_w.get(c, 0.0)
    bound = r.usable_at_drop_wh * 3600.0 / d if d > 0 else None
    x = classes[str(c)]
    return {"class": c, "usable_at_drop_wh": r.usable_at_drop_wh, "demand_at_drop_w": d, "pooled_bound_s": bound,
            "ride_through_s": x["ride_through_s"], "never_shed_after_drop": x["never_shed_after_drop"],
            "fraction_of_bound": x["ride_through_s"] / bound if bound else None}


def _reserve(r: RunResult) -> dict:
    """Minimum margins (Wh) over the steps with the main supply on: the energy program's pooled
    energy above its reserve (None without the program), and the usable energy above the whole
    reserve (every class's target at the demand that came: reserve.py). None: the main supply was
    never on."""
    m = r.margin if r.margin is not None else [math.nan, math.nan]
    return {"program_margin_min_wh": _num(m[0]), "whole_margin_min_wh": _num(m[1])}


def sim_metrics(results: list[RunResult]) -> dict:
    r = results[0]
    return {"duration_s": r.steps * r.step_s, "step_s": r.step_s, "steps": r.steps, "nodes": r.n_nodes,
            "wall_s": sum(x.wall_s for x in results), "classes": r.classes}


def machine() -> dict:
    import numba
    import numpy

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": numpy.__version__, "numba": numba.__version__, "system": platform.platform()}


def series(r: RunResult) -> dict:
    """The plot series of a run: time (s) per point, per-class series `c` [point, class], fleet series `f`."""
    rec = r.rec
    t = [(j * rec.bucket) * r.step_s for j in range(rec.points)]
    return {"t_s": t, "c": {name: rec.rec_c[:, row, :] for row, name in enumerate(CS.NAMES)},
            "f": {name: rec.rec_f[:, k] for k, name in enumerate(FL.SERIES)}}
