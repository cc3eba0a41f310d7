"""One policy through one scenario: the real scan engine in simulated time.

The plant's programs with the plant's parameters (the policy only takes the place
of the `allocation` entry), built and bound as `vbatt run` builds them, driven by
a FakeClock: no sleeping, no child processes, no sockets. Per step:

1. the simulated nodes advance over the last step under the last battery command
   (drivers/sim_physics.py) and take the demand of the new time;
2. the events due are applied (events.py);
3. the node data goes into the image as the sim driver publishes it, and the
   engine runs one cycle (latch, programs, aggregates, publish);
4. failed nodes run on their own battery (their lease ran out), and the step is
   recorded (record.py).

The OPC UA server is not part of a simulation, so nothing reads its history: the
forecast starts cold, the same on every run. The wall clock the programs see
starts at `scenario.start_unix_s`. Demand noise comes from numba's generator,
seeded with `scenario.seed` before every run: every policy sees the same demand.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from vbatt.kernel.clock import FakeClock
from vbatt.config.plant import NodeConfig, ProgramEntry, TemplateConfig
from vbatt.drivers.sim.driver import SimFleet
from vbatt.kernel.fields import Role, Scope, fields, names
from vbatt.kernel.image import Ctl, Mode, ProcessImage
from vbatt.config.plan import build_programs, image_spec
from vbatt.programs.allocation import AllocationParams
from vbatt.programs.energy import unreachable_texts
from vbatt.programs.energy.rules import ST_E_WH, ST_N, ST_R_WH
from vbatt.programs.policies import POLICIES, POLICY_DROPS
from vbatt.kernel.scan import ScanEngine
from vbatt.config.yamlsrc import ConfigError

from vbatt.scenario.events import Plant, Schedule, main_limit_drop_step
from vbatt.scenario.record import CS, Recorder, observe
from vbatt.scenario.reserve import HindsightReserve
from vbatt.scenario.schema import Event, Loaded

__all__ = ["simulate", "RunResult", "pipeline", "classes_of"]

START_NS = 1_000_000_000
# What the simulated driver writes (the measurements and their freshness), and what a run keeps of
# the last step: from the field table.
_INPUTS = (*names(fields(Scope.NODE, Role.MEASUREMENT)), "updated_ns", "fault")
_FINAL = names(fields(Scope.NODE, (Role.MEASUREMENT, Role.OUTPUT, Role.STATE)))


@njit(cache=True)
def _seed(seed):
    np.random.seed(seed)  # numba's own generator (np.random.seed from Python seeds only NumPy's)


@njit(nogil=True, cache=True)
def settle(fault, demand_w, avail_dis_w, battery_w, served_w, shed_w, command_w, served, shed):
    """The step's outcome per node: the controller's outputs, except where the node's link has
    failed: that node runs autonomously, its own battery for its own load (docs/design.md §5)."""
    for i in range(fault.shape[0]):
        if fault[i] != 0:
            d = demand_w[i]
            own = min(d, avail_dis_w[i])
            command_w[i] = own
            served[i] = own
            shed[i] = d - own
        else:
            command_w[i] = battery_w[i]
            served[i] = served_w[i]
            shed[i] = shed_w[i]


def _margins(step_c, e_state, r_state, has_energy, main_on, out, hindsight):
    """The reserve margins of this step while the main supply is on (it may fail at any moment; in
    an outage the reserve is being spent), their minima kept in out: out[0] the energy program's own
    (its pooled energy above the reserve of the classes it has not shed); out[1], independent of the
    program, the usable energy of every battery above the whole reserve at the demand that came
    (reserve.py: known once the longest target has passed, or at the end of the run)."""
    hindsight.push(float(step_c[CS.USABLE_WH].sum()), main_on, step_c[CS.DEMAND_W])
    if main_on and has_energy:
        out[0] = min(out[0], e_state - r_state)


@dataclass
class RunResult:
    policy: str
    rec: Recorder
    classes: list[int]  # the priority classes present (rec arrays are indexed by priority)
    n_nodes: int
    steps: int
    step_s: float
    duration_s: float
    drop_k: int  # step of the first main supply drop (-1: none)
    soc_min: float
    wall_s: float
    t0_s: float = 0.0
    capacity_wh: float = 0.0
    pipeline: list[str] = field(default_factory=list)
    final: dict = field(default_factory=dict)  # the image's node outputs and aggregates after the last step
    targets_s: dict[int, float] = field(default_factory=dict)  # plant.ride_through_s (0 for a class without one)
    usable_at_drop_wh: float | None = None  # fleet usable energy (above soc_min) in the step of the drop
    demand_at_drop_w: dict[int, float] = field(default_factory=dict)  # per class, in the step of the drop
    energy_alarms: list[str] = field(default_factory=list)  # unreachable_texts in the step of the drop
    margin: np.ndarray | None = None  # see _margins: [program's E - R, usable - the demand that came], minima


def pipeline(loaded: Loaded, policy: str) -> list[ProgramEntry]:
    """The plant's program list with the policy in the place of its allocation."""
    if policy not in POLICIES:
        raise ConfigError([f"unknown policy {policy!r} (expected one of: {', '.join(POLICIES)})"])
    drop = POLICY_DROPS.get(policy, ())
    entries = [e for e in loaded.cfg.programs if e.id not in drop]
    pid = POLICIES[policy]
    if pid is None:
        return entries
    for k, e in enumerate(entries):
        if e.id == "allocation":
            entries[k] = ProgramEntry(id=pid, params=e.params)
            return entries
        if e.id == "safe_allocation":
            entries[k] = ProgramEntry(id=pid, params=AllocationParams())
            return entries
    raise ConfigError([f"{loaded.located.where(('programs',))}: programs: policy {policy!r} takes the place of "
                       f"'allocation' (or 'safe_allocation'), and this plant runs neither"])


def classes_of(loaded: Loaded) -> list[int]:
    prios = set(int(p) for p in loaded.fleet.values["priority"])
    prios |= {ev.priority for ev in loaded.scenario.events if ev.priority is not None}
    return sorted(prios)


def _check_simulated(loaded: Loaded) -> None:
    problems = []
    for k, entry in enumerate(loaded.cfg.nodes):
        if not isinstance(entry, (NodeConfig, TemplateConfig)):
            problems.append(f"{loaded.located.where(('nodes', k))}: nodes[{k}]: a '{entry.driver}' node has no "
                            f"physics to simulate (expected simulated nodes or templates)")
    if problems:
        raise ConfigError(problems)


def _soc_min(entries: list[ProgramEntry]) -> float:
    for e in entries:
        if isinstance(getattr(e, "params", None), AllocationParams):
            return e.params.soc_min
    for e in entries:
        v = getattr(e.params, "soc_min", None)
        if isinstance(v, float):
            return v
    return AllocationParams().soc_min


def simulate(loaded: Loaded, policy: str, *, points: int = 2000, capacity_scale: float = 1.0,
             t0_s: float = 0.0, events: list[Event] | None = None, event_nodes: list[np.ndarray] | None = None,
             duration_s: float | None = None) -> RunResult:
    """Run `policy` over the scenario. Sizing overrides: every capacity times `capacity_scale`,
    demand and wall clock shifted by `t0_s`, other events and duration."""
    _check_simulated(loaded)
    cfg, fleet, sc = loaded.cfg, loaded.fleet, loaded.scenario
    events = sc.events if events is None else events
    event_nodes = loaded.event_nodes if event_nodes is None else event_nodes
    duration_s = sc.duration_s if duration_s is None else duration_s
    step_s = loaded.step_s
    steps = max(1, int(math.ceil(duration_s / step_s - 1e-9)))
    entries = pipeline(loaded, policy)
    # No OPC UA server runs in a simulation: the forecast must not read a recorded history.
    run_cfg = cfg.model_copy(update={"programs": entries,
                                     "opcua": cfg.opcua.model_copy(update={"enabled": False})})
    n = len(fleet)
    progs = build_programs(run_cfg, n)
    spec = image_spec(run_cfg, fleet, progs, [(0, n, "sim")])
    classes = sorted(set(classes_of(loaded)))
    drop_k = main_limit_drop_step(events, cfg.plant.main_limit_w, step_s, steps)
    rec = Recorder(n, max(classes) + 1, steps, points, drop_k)
    img = ProcessImage.create(spec)
    try:
        nd = img.node
        nd["priority"][:] = fleet.values["priority"]
        img.agg["main_limit_w"][0] = cfg.plant.main_limit_w
        img.ctl[Ctl.MODE] = Mode.RUN
        clock = FakeClock(START_NS, record=False)
        eng = ScanEngine(img, progs, run_cfg, clock)
        eng.wall_offset_s = sc.start_unix_s + t0_s - START_NS * 1e-9
        _seed(sc.seed)
        sim = SimFleet(fleet, 0, n, seed=sc.seed)
        if capacity_scale != 1.0:
            sim.capacity_wh *= capacity_scale
        if t0_s:
            sim.step(t0_s, 0.0, np.zeros(n))  # demand of the shifted start; dt 0 moves nothing
        fault = np.zeros(n, np.uint32)
        plant = Plant(eng, img, sim, fault, sim.capacity_wh.copy())
        sched = Schedule(events, event_nodes, step_s, steps)
        staging = {f: nd[f] for f in _INPUTS}
        cmd, served, shed = np.zeros(n), np.zeros(n), np.zeros(n)
        step_ns = int(round(step_s * 1e9))
        dt_h = step_s / 3600.0
        runtime = _runtime_array(img, progs)
        rec.has_runtime = runtime is not None
        bucket = rec.bucket
        main_w, main_limit = img.agg["main_w"], img.agg["main_limit_w"]
        prio, dem, bat, soc, cap = nd["priority"], nd["demand_w"], nd["battery_w"], nd["soc"], nd["capacity_wh"]
        args_tail = (rec.step_c, rec.acc_c, rec.first_c, drop_k, rec.fl, rec.last_sign)
        next_event = sched.next_step()
        soc_min = _soc_min(entries)
        targets = {c: float(cfg.plant.ride_through_s.get(c, 0.0)) for c in classes}
        target_arr = np.zeros(max(classes) + 1)
        for c, t in targets.items():
            target_arr[c] = t
        has_energy = "energy.state" in img.mem
        e_state = img.mem["energy.state"] if has_energy else np.zeros(ST_N)
        margin = np.full(2, math.inf)
        hindsight = HindsightReserve(target_arr, step_s)
        usable_at_drop, demand_at_drop, alarms = None, {}, []
        wall0 = time.perf_counter()
        for k in range(steps):
            now = START_NS + k * step_ns
            clock.t = now
            if k:
                sim.step(t0_s + k * step_s, step_s, cmd)
            if k == next_event:
                sched.apply_due(k, plant)
                next_event = sched.next_step()
            sim.fill(staging, now)
            staging["fault"][:] = fault
            eng.cycle(now)
            eng.last_release_ns = now
            settle(fault, sim.demand_w, sim.avail_dis, bat, nd["served_w"], nd["shed_w"], cmd, served, shed)
            j = k // bucket
            observe(k, dt_h, soc_min, prio, dem, served, shed,
                    cmd, soc, cap, main_w[0], main_limit[0], *args_tail, j, rec.rec_c, rec.rec_f, rec.rec_n)
            _margins(rec.step_c, e_state[ST_E_WH], e_state[ST_R_WH], has_energy, main_limit[0] > 0.0, margin,
                     hindsight)
            if k == drop_k:
                usable_at_drop = float(rec.step_c[CS.USABLE_WH].sum())
                demand_at_drop = {c: float(rec.step_c[CS.DEMAND_W, c]) for c in classes}
                alarms = unreachable_texts(img.mem) if has_energy else []
            if runtime is not None and (k % bucket == bucket - 1 or k == steps - 1):
                _sample_runtime(rec, j, runtime, img, prio, classes)
        margin[1] = hindsight.finish()
        wall = time.perf_counter() - wall0
        final = {f: nd[f].copy() for f in _FINAL}
        final.update({f"agg.{k}": float(v[0]) for k, v in img.agg.items()})
    finally:
        img.close()
    rec.finish()
    return RunResult(policy=policy, rec=rec, classes=classes, n_nodes=n, steps=steps, step_s=step_s,
                     duration_s=steps * step_s, drop_k=drop_k, soc_min=_soc_min(entries), wall_s=wall, t0_s=t0_s,
                     capacity_wh=float(sim.capacity_wh.sum()), pipeline=[e.id for e in entries],
                     final=final, targets_s=targets, usable_at_drop_wh=usable_at_drop,
                     demand_at_drop_w=demand_at_drop, energy_alarms=alarms,
                     margin=np.where(has_energy, margin, [math.nan, margin[1]]))


def _runtime_array(img, programs) -> str | None:
    """Where the runtime remaining (if the main supply failed now) is: "energy" (the energy layer's,
    per class), "node" (the node field `runtime_s`, which a program declares it writes: per node, the
    class's value is the least of its nodes'), or None."""
    if "energy.runtime_s" in img.mem and "energy.priority" in img.mem:
        return "energy"
    if any("runtime_s" in p.writes for p in programs):
        return "node"
    return None


def _sample_runtime(rec: Recorder, j: int, where: str, img, prio: np.ndarray, classes: list[int]) -> None:
    if where == "energy":
        mem = img.mem
        by_prio = {int(pr): float(rt) for pr, rt in zip(mem["energy.priority"], mem["energy.runtime_s"]) if pr >= 0}
        for c in classes:
            rec.rec_c[j, CS.RUNTIME_S, c] = by_prio.get(c, math.nan)
        return
    r = img.node["runtime_s"]
    for c in classes:
        sel = r[prio == c]
        rec.rec_c[j, CS.RUNTIME_S, c] = float(sel.min()) if sel.size else math.nan
