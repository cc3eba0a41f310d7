"""Snapshots of the image as JSON, keyed by the docs/design.md names, and run statistics."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from vbatt.kernel.fields import AGGREGATES, NODE_FIELDS
from vbatt.kernel.image import Ctl, ProcessImage
from vbatt.kernel.stats import histogram, phases, summarize

__all__ = ["snapshot", "run_stats", "write_json"]


def _py(v):
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None  # JSON has no NaN
    return int(v)


def snapshot(img: ProcessImage, views: dict[str, np.ndarray] | None = None) -> dict:
    """`{"cycle", "aggregate": {...}, "nodes": [{"id", <every node field>}, ...], "classes": [...]}`
    from published views (classes: `{"priority", "demand_w", "reserve_wh", "target_s", "runtime_s",
    "reachable"}` per priority class when the energy program runs)."""
    v = views if views is not None else img.read_published()[0]
    agg = {f.name: _py(v["agg." + f.name][0]) for f in AGGREGATES}
    cols = {f.name: v["node." + f.name].tolist() for f in NODE_FIELDS}
    ids = img.spec.node_ids
    nodes = []
    for i in range(img.spec.n_nodes):
        row = {"id": ids[i] if ids else str(i)}
        for f in NODE_FIELDS:
            x = cols[f.name][i]
            row[f.name] = (x if math.isfinite(x) else None) if isinstance(x, float) else x
        nodes.append(row)
    return {"cycle": int(v["cycle"][0]), "aggregate": agg, "nodes": nodes}


def run_stats(img: ProcessImage, period_ms: float, phase_names: list[str]) -> dict:
    c = img.ctl
    return {
        "cycles": int(c[Ctl.CYCLES]),
        "period_ms": period_ms,
        "overruns": int(c[Ctl.OVERRUNS]),
        "watchdog_tripped": bool(c[Ctl.WATCHDOG]),
        "safe_state": bool(c[Ctl.SAFE_STATE]),
        "program_faults": int(c[Ctl.PROGRAM_FAULTS]),
        "torn_reads": int(c[Ctl.TORN_READS]),
        "realtime": {"sched_fifo_priority": int(c[Ctl.RT_FIFO]), "mlockall": bool(c[Ctl.RT_MLOCK]),
                     "timer_slack_1ns": bool(c[Ctl.RT_SLACK])},
        **summarize(img.mem),
        "phases_us": phases(img.mem, phase_names),
        "histogram": histogram(img.mem),
    }


def write_json(path: str | Path, data: dict) -> None:
    """Atomically: a reader never sees half a file."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
