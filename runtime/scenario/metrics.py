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
            "ride_through_s": (end_t - drop_t) if unserved < 0 else max(0.0, unserved * dt - drop_t),
            "served_wh": served_wh,
            "demand_wh": demand_wh,
            "shed_wh": shed_wh,
            "served_fraction": served_wh / demand_wh if demand_wh > 0 else 1.0,
            "never_shed_after_drop": unserved < 0,
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
    return {"classes": classes, "fleet": fleet, "wall_s": r.wall_s,
            "speed_x": (r.steps * dt) / r.wall_s if r.wall_s > 0 else None, "pipeline": r.pipeline,
            "has_runtime": rec.has_runtime}


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
