"""`vbatt size`: the least battery for the ride-through targets, pooled (vbatt) against isolated.

One scale factor on every node's capacity_wh, found by bisection: the smallest at
which every class with a target stays fully served on batteries alone for its
target, for an outage that starts at the worst moment of the scenario's demand
(the start that needs the most energy: the sum over classes of the class's demand
over its target). The outage run starts from the configured state of charge, with
the scenario's demand shifted to that moment; the scenario's own events do not
apply. A class meets its target when its ride-through (metrics.py) is at least the
target, on the step grid.

Power limits do not scale with capacity: a class whose nodes cannot deliver its
power at any capacity is reported as unreachable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vbatt.drivers.sim.driver import SimFleet
from vbatt.drivers.sim.physics import demand_at

from vbatt.scenario.metrics import policy_metrics
from vbatt.scenario.runner import _seed, simulate
from vbatt.scenario.schema import Event, Loaded

__all__ = ["SizeResult", "size", "worst_start", "parse_targets"]

MAX_SCALE = 1024.0


@dataclass
class SizeResult:
    policy: str
    scale: float | None  # None: unreachable up to MAX_SCALE
    capacity_wh: float | None
    runs: int
    ride_through_s: dict[str, float] = field(default_factory=dict)  # at the found scale


def parse_targets(text: str) -> dict[int, float]:
    """'0=14400,1=1800' -> {0: 14400.0, 1: 1800.0}; ValueError with what is expected."""
    out: dict[int, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = part.partition("=")
        try:
            c, t = int(k), float(v)
        except ValueError:
            c, t = -1, math.nan
        if not sep or c < 0 or c > 1000 or not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"--targets: {part!r} is not CLASS=SECONDS (expected e.g. 0=14400,1=1800,2=600)")
        if c in out:
            raise ValueError(f"--targets: class {c} given twice")
        out[c] = t
    if not out:
        raise ValueError("--targets: no target given (expected e.g. 0=14400,1=1800)")
    return out


def worst_start(loaded: Loaded, targets: dict[int, float]) -> float:
    """The outage start (s, on the step grid) that needs the most energy for the targets."""
    step_s, steps = loaded.step_s, loaded.steps
    fleet = loaded.fleet
    n = len(fleet)
    horizon = max(targets.values())
    span = int(math.ceil(horizon / step_s - 1e-9))
    starts = max(1, steps - span + 1) if span < steps else 1
    _seed(loaded.scenario.seed)
    sim = SimFleet(fleet, 0, n, seed=loaded.scenario.seed)
    prio = fleet.values["priority"]
    classes = sorted(targets)
    masks = [prio == c for c in classes]
    total = starts + span
    per = np.zeros((len(classes), total + 1))
    d = np.zeros(n)
    for k in range(total):
        demand_at(k * step_s, sim.kind, sim.base_w, sim.p1, sim.p2, sim.p3, sim.p4, sim.trace, d)
        for j, m in enumerate(masks):
            per[j, k + 1] = per[j, k] + d[m].sum()
    need = np.zeros(starts)
    for j, c in enumerate(classes):
        w = int(math.ceil(targets[c] / step_s - 1e-9))
        ks = np.arange(starts)
        need += per[j, ks + w] - per[j, ks]
    return float(np.argmax(need)) * step_s


def _meets(loaded: Loaded, policy: str, scale: float, targets: dict[int, float], t0_s: float,
           horizon_s: float) -> tuple[bool, dict[str, float]]:
    r = simulate(loaded, policy, points=64, capacity_scale=scale, t0_s=t0_s,
                 events=[Event(at_s=0.0, main_limit_w=0.0)], event_nodes=[np.zeros(0, np.int64)],
                 duration_s=horizon_s)
    m = policy_metrics(r)["classes"]
    rt = {c: m[c]["ride_through_s"] for c in m}
    ok = all(rt[str(c)] >= t - 1e-9 for c, t in targets.items() if str(c) in rt and t > 0)
    return ok, rt


def size(loaded: Loaded, policy: str, targets: dict[int, float], *, t0_s: float, tolerance: float = 0.01,
         on_run=None) -> SizeResult:
    """Bisection on the capacity scale (relative tolerance `tolerance`)."""
    horizon = max(targets.values())
    if horizon <= 0:
        return SizeResult(policy, 0.0, 0.0, 0)
    base_wh = float(loaded.fleet.values["capacity_wh"].sum())
    runs = 0

    def test(s: float):
        nonlocal runs
        runs += 1
        ok, rt = _meets(loaded, policy, s, targets, t0_s, horizon)
        if on_run:
            on_run(policy, s, ok)
        return ok, rt

    hi = 1.0
    ok, rt_hi = test(hi)
    while not ok:
        if hi >= MAX_SCALE:
            return SizeResult(policy, None, None, runs, rt_hi)
        hi *= 2.0
        ok, rt_hi = test(hi)
    lo = hi / 2.0 if hi > 1.0 else 0.0
    if hi == 1.0:  # enough at the configured size: halve until it is not
        while hi > 1.0 / MAX_SCALE:
            ok, rt = test(hi / 2.0)
            if not ok:
                lo = hi / 2.0
                break
            hi, rt_hi = hi / 2.0, rt
        else:
            lo = 0.0
    while hi - lo > tolerance * hi:
        mid = 0.5 * (lo + hi)
        ok, rt = test(mid)
        if ok:
            hi, rt_hi = mid, rt
        else:
            lo = mid
    return SizeResult(policy, hi, hi * base_wh, runs, rt_hi)
