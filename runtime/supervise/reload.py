"""Online change: apply a new config to a running controller between two cycles.

`vbatt reload CONFIG` validates the file, writes a request next to the run's
shared-memory segment and sends SIGHUP to the supervisor. The supervisor diffs
the new config against the running one:

* the operator settings of the field table (node priorities, `plant.main_limit_w`)
  become the operator commands that set them; so do the ride-through targets
  (`plant.ride_through_s`), an operator setting in the energy program's memory
  (`Op.SET_MEMORY`, applied after the priorities);
* changed program parameters are handed to the scan process, which rebinds the
  programs after a cycle has been published (program memory is kept: same
  arrays, no re-initialisation);
* anything else that differs (the node list, the cycle, the drivers, the program
  list, a program whose memory layout would change) needs a restart: the whole
  request is refused with the list of what differs, and nothing changes.

The answer comes back in a result file the command waits for.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vbatt.config.plant import SETTINGS, Config, Fleet, setting_values
from vbatt.kernel.fields import Scope
from vbatt.kernel.image import Op
from vbatt.kernel.shm import PREFIX, SHM_DIR

__all__ = ["Plan", "diff", "request_path", "result_path", "programs_path", "send", "running_supervisors",
           "RELOAD_PRODUCER"]

RELOAD_PRODUCER = 0  # command ring of the CLI / reload
RIDE_THROUGH_MEMORY = "energy.target_by_priority_s"  # per priority, s (NaN: none): programs/energy


def request_path(pid: int) -> Path:
    return SHM_DIR / f"{PREFIX}{pid}-reload.json"


def result_path(pid: int) -> Path:
    return SHM_DIR / f"{PREFIX}{pid}-reload-result.json"


def programs_path(pid: int, n: int) -> Path:
    return SHM_DIR / f"{PREFIX}{pid}-programs-{n}.pkl"


@dataclass
class Plan:
    refused: list[str] = field(default_factory=list)
    commands: list[tuple[int, int, float]] = field(default_factory=list)  # (op, node, value)
    memory: list[tuple[str, int, float]] = field(default_factory=list)  # Op.SET_MEMORY: (array, element, value)
    programs_changed: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)


def _restart_keys(old: Config, new: Config) -> list[str]:
    out = []
    for section in ("cycle", "drivers", "opcua", "retain"):
        a, b = getattr(old, section).model_dump(), getattr(new, section).model_dump()
        out += [f"{section}.{k}" for k in a if a[k] != b.get(k)]
    if old.plant.stale_ms != new.plant.stale_ms:
        out.append("plant.stale_ms")
    return out


def diff(old: Config, old_fleet: Fleet, new: Config, new_fleet: Fleet, memory_of) -> Plan:
    """What applying `new` to a controller running `old` means. `memory_of(cfg)` gives the
    program memory layout a config would need."""
    plan = Plan()
    if old_fleet.ids != new_fleet.ids or old_fleet.drivers != new_fleet.drivers:
        plan.refused.append("the node list changed (ids, order or drivers): that needs a restart")
    keys = _restart_keys(old, new)
    if keys:
        plan.refused.append(f"needs a restart: {', '.join(keys)} changed")
    if [p.id for p in old.programs] != [p.id for p in new.programs]:
        plan.refused.append("the program list changed: that needs a restart")
    elif memory_of(old) != memory_of(new):
        plan.refused.append("program memory layout would change: that needs a restart")
    if plan.refused:
        return plan
    was, now = setting_values(old, old_fleet), setting_values(new, new_fleet)
    for f in SETTINGS:  # every configured operator setting becomes the command an operator would send
        op = getattr(Op, f.command)
        changed = np.flatnonzero(was[f] != now[f])
        if f.scope is Scope.NODE:
            plan.commands += [(op, int(i), float(now[f][i])) for i in changed]
            if len(changed):
                plan.summary.append(f"{f.name} of {len(changed)} node{'s' * (len(changed) > 1)}")
        elif len(changed):
            plan.commands.append((op, -1, float(now[f][0])))
            plan.summary.append(f"{f.name} {was[f][0]:g} -> {now[f][0]:g} {f.unit}".rstrip())
    a, b = old.plant.ride_through_s, new.plant.ride_through_s
    if a != b:  # the configuration has the energy program when it has targets (validation)
        changed = sorted(p for p in set(a) | set(b) if a.get(p) != b.get(p))
        plan.memory += [(RIDE_THROUGH_MEMORY, p, float(b.get(p, np.nan))) for p in changed]  # NaN: none
        shown = [f"{p}: {a[p]:g} -> {b[p]:g} s" if p in a and p in b else f"{p}: {b[p]:g} s" if p in b
                 else f"{p}: none" for p in changed]
        plan.summary.append(f"ride_through_s {{{', '.join(shown)}}}")
    plan.programs_changed = [b.id for a, b in zip(old.programs, new.programs) if a.params != b.params]
    if plan.programs_changed:
        plan.summary.append(f"parameters of {', '.join(plan.programs_changed)}")
    return plan


def write_programs(pid: int, n: int, cfg: Config) -> Path:
    """The validated program entries for the scan process (same user, private file)."""
    path = programs_path(pid, n)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        pickle.dump(list(cfg.programs), fh)
    return path


def running_supervisors() -> list[int]:
    pids = set()
    for p in SHM_DIR.glob(PREFIX + "*"):
        try:
            pid = int(p.name[len(PREFIX):].split("-")[0])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError, PermissionError):
            continue
        if not p.name.endswith(".json") and not p.name.endswith(".pkl"):
            pids.add(pid)
    return sorted(pids)


def send(pid: int, config_path: str, timeout_s: float = 15.0) -> dict:
    """Ask supervisor `pid` to apply `config_path`; returns its answer."""
    result_path(pid).unlink(missing_ok=True)
    req = request_path(pid)
    tmp = req.with_name(req.name + ".tmp")
    tmp.write_text(json.dumps({"config": str(Path(config_path).resolve()), "time": time.time()}))
    os.replace(tmp, req)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    res = result_path(pid)
    while time.monotonic() < deadline:
        if res.exists():
            data = json.loads(res.read_text())
            res.unlink(missing_ok=True)
            return data
        time.sleep(0.05)
    return {"ok": False, "message": f"no answer from the controller (pid {pid}) within {timeout_s:g} s"}
