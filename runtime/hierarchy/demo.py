"""A tree of `vbatt run` processes on loopback and a flat controller over the same nodes
(docs/hierarchy.md "The three-level demonstration").

    python examples/hierarchy/run.py --out var/hierarchy          # 3 rows x 3 racks x 20 nodes
    python examples/hierarchy/run.py --rows 2 --racks 2 --nodes 3  # small

`write_configs` writes one YAML per controller (racks: the simulated nodes, an uplink, programs
[allocation, tree]; rows: their racks as Modbus nodes, an uplink; top: its rows as Modbus nodes) and
`flat.yaml` (every node in one controller, the top's main_limit_w). `Tree` starts them bottom-up,
waits until every level is controlled, stops them all at once (SIGTERM: each writes the snapshot of
its last cycle) and `compare` sets the class totals of the leaves against the flat controller's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vbatt.kernel.ports import free_ports

__all__ = ["Layout", "write_configs", "Tree", "compare", "main"]


@dataclass
class Layout:
    rows: int = 3
    racks: int = 3
    nodes: int = 20
    seed: int = 1
    rest: bool = True  # capacities so large that the weights do not drift over a run ("at rest")
    cycle_ms: float = 100.0
    poll_ms: float = 200.0  # every level's link and Modbus driver
    lease_ms: int = 1000
    share: float = 0.35  # the top's main_limit_w as a share of the whole demand (a shortage)
    agents: bool = False  # racks poll their nodes over Modbus from a separate process (faults: kill a rack)
    retain: bool = False  # racks keep their state across restarts (warm rejoin)
    step_at_s: float | None = None  # a demand step at node n-00-00 this long after its rack starts
    step_to_w: float = 0.0
    # ride-through targets per class: racks and the flat controller run the energy program (its defaults:
    # the top forecasts the tree's summed class demand as the flat controller its own), and compare()
    # sets the top's classes (from the whole tree) against the flat controller's
    ride_through_s: dict | None = None
    # feeder limits of racks and rows ({name: W}, `hierarchy.uplink.feeder_w`); the flat controller has none,
    # so compare() is then not the reference (tests/test_hierarchy_feeder.py compares with HiGHS)
    feeder_w: dict | None = None
    # the energy where the power is not (links unbounded): every fifth node 3,000 Wh behind a 50 W discharge
    # limit, the others 100 Wh behind 1,000 W, so that the power runtime binds (docs/energy.md)
    power_bound: bool = False

    def names(self) -> dict[str, list[str]]:
        racks = [f"rack-{r}{k}" for r in range(self.rows) for k in range(self.racks)]
        return {"top": ["top"], "rows": [f"row-{r}" for r in range(self.rows)], "racks": racks}


def _nodes(lay: Layout) -> list[dict]:
    rng = np.random.default_rng(lay.seed)
    out = []
    for r in range(lay.rows):
        for k in range(lay.racks):
            for j in range(lay.nodes):
                cap = float(rng.uniform(300, 900)) * (1e6 if lay.rest else 1.0)
                out.append({"id": f"n-{r}{k}-{j:02d}", "priority": int(rng.integers(0, 4)),
                            "demand_w": round(float(rng.uniform(200, 450)), 3),
                            "max_discharge_w": round(float(rng.uniform(50, 300)), 3),
                            "max_charge_w": round(float(rng.uniform(100, 300)), 3),
                            "capacity_wh": round(cap, 3), "soc": round(float(rng.uniform(0.3, 0.95)), 4),
                            "link_max_w": round(float(rng.choice([300.0, 800.0, 1500.0])), 3),
                            "rack": (r, k)})
    if lay.power_bound:
        for i, n in enumerate(out):
            big = i % 5 == 0
            n.update(capacity_wh=3000.0 if big else 100.0, max_discharge_w=50.0 if big else 1000.0, link_max_w=1e6)
    return out


def _yaml(d) -> str:
    return json.dumps(d, indent=1)  # JSON is YAML


def write_configs(out: Path, lay: Layout, ports: list[int] | None = None) -> dict:
    """The configs of every controller and of the flat one; returns {name: {config, port, status}}."""
    out.mkdir(parents=True, exist_ok=True)
    names = lay.names()
    nodes = _nodes(lay)
    ports = ports or free_ports(len(names["rows"]) + len(names["racks"]) + (len(nodes) if lay.agents else 0))
    main_limit = round(lay.share * sum(n["demand_w"] for n in nodes), 3)
    if lay.agents:  # float32 on the wire: values it carries exactly
        for n in nodes:
            for k in ("demand_w", "max_discharge_w", "max_charge_w", "link_max_w"):
                n[k] = round(n[k] * 64) / 64
    if lay.step_at_s is not None:  # the same step in the tree and in the flat controller
        nodes[0]["demand_profile"] = {"kind": "step", "at_s": lay.step_at_s, "to_w": lay.step_to_w}
    base = {"cycle": {"cycle_ms": lay.cycle_ms, "realtime": False}, "retain": {"enabled": False}}
    energy = ["energy"] if lay.ride_through_s else []  # its defaults: the class demand forecast on
    targets = {"ride_through_s": {int(k): float(v) for k, v in lay.ride_through_s.items()}} \
        if lay.ride_through_s else {}
    plan: dict[str, dict] = {}
    lay.lease_ms = max(lay.lease_ms, int(4 * lay.poll_ms))  # a lease spans a few polls of the level above
    clean = lambda n: {k: v for k, v in n.items() if k != "rack"}  # noqa: E731
    feeder = lambda name: {"feeder_w": lay.feeder_w[name]} if name in (lay.feeder_w or {}) else {}  # noqa: E731
    it = iter(ports)
    for r in range(lay.rows):
        for k in range(lay.racks):
            name = f"rack-{r}{k}"
            plan[name] = {"port": next(it)}
            mine = [clean(n) for n in nodes if n["rack"] == (r, k)]
            extra = {}
            if lay.agents:  # the nodes in a process of their own, polled over Modbus
                nports = [next(it) for _ in mine]
                (out / f"{name}.nodes.yaml").write_text(_yaml({"nodes": mine}))
                plan[f"nodes-{name}"] = {"nodes": str(out / f"{name}.nodes.yaml"), "ports": nports}
                mine = [{"id": n["id"], "driver": "modbus", "host": "127.0.0.1", "port": p,
                         "priority": n["priority"]} for n, p in zip(mine, nports)]
                extra["drivers"] = {"modbus": {"poll_ms": lay.poll_ms, "plaintext": True}}
            if lay.retain:
                extra["retain"] = {"enabled": True, "dir": str(out / f"{name}.retain"), "period_s": 0.2}
            here = {n["priority"] for n in nodes if n["rack"] == (r, k)}  # a config names present classes only
            mine_t = {"ride_through_s": {p: t for p, t in targets["ride_through_s"].items() if p in here}} \
                if targets else {}
            cfg = {**base, **extra, "plant": {"main_limit_w": round(main_limit / lay.rows / lay.racks, 3), **mine_t},
                   "hierarchy": {"uplink": {"port": plan[name]["port"], "plaintext": True, **feeder(name)},
                                 "poll_ms": lay.poll_ms, "lease_ms": lay.lease_ms,
                                 "status_file": str(out / f"{name}.status.json"),
                                 "trace_file": str(out / f"{name}.trace.jsonl")},
                   "nodes": mine, "programs": [*energy, "allocation", "tree"]}
            (out / f"{name}.yaml").write_text(_yaml(cfg))
    modbus = {"modbus": {"poll_ms": lay.poll_ms, "plaintext": True, "lease_ms": lay.lease_ms}}
    for r in range(lay.rows):
        name = f"row-{r}"
        plan[name] = {"port": next(it)}
        kids = [f"rack-{r}{k}" for k in range(lay.racks)]
        # its own limit (used when the top is gone): its rows' share of the top's
        cfg = {**base, "plant": {"main_limit_w": round(main_limit / lay.rows, 3)}, "drivers": modbus,
               "hierarchy": {"uplink": {"port": plan[name]["port"], "plaintext": True, **feeder(name)},
                             "children": kids,
                             "poll_ms": lay.poll_ms, "lease_ms": lay.lease_ms,
                             "status_file": str(out / f"{name}.status.json"),
                             "trace_file": str(out / f"{name}.trace.jsonl")},
               "nodes": [{"id": c, "driver": "modbus", "host": "127.0.0.1", "port": plan[c]["port"]} for c in kids],
               "programs": ["allocation"]}
        (out / f"{name}.yaml").write_text(_yaml(cfg))
    rows = names["rows"]
    top = {**base, "plant": {"main_limit_w": main_limit}, "drivers": modbus,
           "hierarchy": {"children": rows, "poll_ms": lay.poll_ms, "lease_ms": lay.lease_ms,
                         "status_file": str(out / "top.status.json"), "trace_file": str(out / "top.trace.jsonl")},
           "nodes": [{"id": c, "driver": "modbus", "host": "127.0.0.1", "port": plan[c]["port"]} for c in rows],
           "programs": ["allocation"]}
    (out / "top.yaml").write_text(_yaml(top))
    plan["top"] = {}
    flat = {**base, "plant": {"main_limit_w": main_limit, **targets}, "nodes": [clean(n) for n in nodes],
            "programs": [*energy, "allocation"]}
    (out / "flat.yaml").write_text(_yaml(flat))
    plan["flat"] = {}
    for name in plan:
        if name.startswith("nodes-"):
            continue
        plan[name]["config"] = str(out / f"{name}.yaml")
        plan[name]["status"] = str(out / f"{name}.status.json")
        plan[name]["snapshot"] = str(out / f"{name}.snapshot.json")
    (out / "plan.json").write_text(json.dumps({"layout": lay.__dict__, "main_limit_w": main_limit,
                                               "controllers": plan}, indent=1))
    return plan


class Tree:
    """The processes of a written plan: start, wait, kill, stop; every one a `vbatt run`."""

    def __init__(self, plan: dict, out: Path, vbatt: str | None = None):
        self.plan, self.out = plan, out
        self.vbatt = vbatt or str(Path(sys.executable).with_name("vbatt"))
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *args: str) -> None:
        p = self.plan[name]
        log = open(self.out / f"{name}.log", "ab")
        if name.startswith("nodes-"):
            cmd = [sys.executable, "-m", "vbatt.hierarchy.demo", "agents", p["nodes"], ",".join(map(str, p["ports"]))]
        else:
            for f in (p["snapshot"], p["status"]):
                Path(f).unlink(missing_ok=True)
            cmd = [self.vbatt, "run", p["config"], "-q", "--snapshot", p["snapshot"], *args]
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)

    def start_all(self, flat: bool = True) -> None:
        order = [n for n in self.plan if n.startswith("nodes-")] + [n for n in self.plan if n.startswith("rack")] + [n for n in self.plan if n.startswith("row")]
        for n in order + ["top"] + (["flat"] if flat else []):
            self.start(n)

    def status(self, name: str) -> dict | None:
        try:
            return json.loads(Path(self.plan[name]["status"]).read_text())
        except (OSError, ValueError):
            return None

    def wait(self, cond, timeout_s: float, what: str) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for n, p in self.procs.items():
                if p.poll() is not None and p.returncode not in (0, -9, -15):
                    raise RuntimeError(f"{n} exited with {p.returncode}: see {self.out / (n + '.log')}")
            if cond():
                return
            time.sleep(0.1)
        raise TimeoutError(f"not within {timeout_s} s: {what}")

    def controlled(self, names) -> bool:
        return all((s := self.status(n)) is not None and s["levels_from"] == "parent" and s["cycle"] > 10
                   and all(c["online"] for c in s["children"].values()) for n in names)

    @staticmethod
    def _decisions(top: dict | None) -> tuple[int, int, tuple]:
        """From one status of the top: the rounds in a row it ran the energy rules on the whole tree at its
        decisions (0: none yet), the rounds in which the whole tree answered its power runtime's question,
        and the class shares of its last round (empty: none yet)."""
        d = (top or {}).get("decisions") or {}
        shares = tuple(float(r.get("frac", math.nan)) for r in (top or {}).get("classes") or [])
        return int(d.get("clean_rounds", 0)), int(d.get("answers", 0)), shares

    def decided(self) -> int:
        return self._decisions(self.status("top"))[0]

    def settle(self, names, cycles: int, timeout_s: float, decided_rounds: int = 0, answers: int = 0,
               still_rounds: int = 0) -> None:
        """Every one of `names` controlled from above, then `cycles` more cycles at each with no fallback
        in between (a lease that ran out on a loaded machine starts the count again), and with the energy
        program the top's class rules run `decided_rounds` rounds in a row on the whole tree at its
        decisions (every rack present and its sums swept at them; a fallback or a rack missing starts
        that count again), the tree answered its power runtime's questions `answers` times (its Newton
        steps) and the top's class shares moved in none of its last `still_rounds` such rounds (a
        peak-shaved class's share comes back at a calm ramp, restore_s, from when each controller began
        to decide: mid-ramp the tree and the flat controller differ by when they started): the state a
        comparison with the flat controller needs at the stop."""
        self.wait(lambda: self.controlled(names), timeout_s, "every rack and row controlled from above")
        end = time.monotonic() + timeout_s
        start = {}
        moved = (None, 0)  # the top's shares and its clean round when they last moved
        while time.monotonic() < end:
            st = {n: self.status(n) for n in names}
            # one read of the top's status: its rounds, answers and shares from the same round
            rounds, answered, shares = self._decisions(self.status("top"))
            if shares != moved[0] or rounds < moved[1]:
                moved = (shares, rounds)
            if any(s is None for s in st.values()) or not self.controlled(names):
                start = {}
            elif start and any(st[n]["fallbacks"] != start[n]["fallbacks"] for n in names):
                start = {}
            elif not start:
                start = st
            elif all(st[n]["cycle"] > start[n]["cycle"] + cycles for n in names) and \
                    rounds >= decided_rounds and answered >= answers and rounds - moved[1] >= still_rounds:
                return
            self.wait(lambda: True, 1, "")  # (only its check that every process still runs)
            time.sleep(0.1)
        raise TimeoutError(f"timed out after {timeout_s} s waiting for {cycles} cycles without a fallback"
                           f", {decided_rounds} rounds of the top's class rules on the whole tree, {answers}"
                           f" answers to its power runtime's questions and its class shares still for"
                           f" {still_rounds} rounds (last: {self._decisions(self.status('top'))[2]})")

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        p = self.procs.pop(name)
        os.killpg(p.pid, sig)  # the whole run: supervisor, scan, drivers, link (kill -9 leaves nothing)
        p.wait(10)

    def stop_all(self, timeout_s: float = 30.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        end = time.monotonic() + timeout_s
        for n, p in list(self.procs.items()):
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self.procs.clear()


def _trace(out: Path, name: str) -> list[dict]:
    p = out / f"{name}.trace.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def _step_seen(out: Path, at_s: float) -> float | None:
    """When rack-00's link first saw its curves change near `at_s` after its first data: its simulated time
    starts a few seconds before the first published cycle, and the tree is at rest (no change of
    curves) from a few seconds after the start until the step (at_s >= 20 s)."""
    tr = [e for e in _trace(out, "rack-00") if e["event"] == "curves" and e["served_w"] > 0]
    if not tr:
        return None
    begin = tr[0]["wall_s"]
    return next((e["wall_s"] for e in tr if e["wall_s"] > begin + at_s - 10.0), None)


def latency(plan: dict, out: Path, at_s: float) -> dict:
    """From the links' traces: the step is seen when rack-00's curves first change after `at_s` from its
    start (the run is at rest otherwise); each rack's new levels are its first and its last change of
    levels after that (the shed levels come on the first trip, the battery level on the second)."""
    t0 = _step_seen(out, at_s)
    res: dict = {"step_seen_wall_s": t0, "racks": {}}
    def value(e):  # the levels as numbers ("inf" strings back to floats)
        return [float(e["lam"] if e["lam"] is not None else "nan")] + [float(v) for v in (e["shed"] or {}).values()]

    def moved(a, b):  # beyond the drift of the weights (a level moves ~1e-9 a second while batteries drain)
        return len(a) != len(b) or any(not (x == y or abs(x - y) <= 1e-6 * max(abs(x), abs(y))) for x, y in zip(a, b))

    for name in plan:
        if not name.startswith("rack"):
            continue
        tr = [e for e in _trace(out, name) if e["event"] == "levels"]
        ev, last = [], None
        for e in tr:
            v = value(e)
            if e["wall_s"] > t0 and last is not None and moved(v, last):
                ev.append(e["wall_s"] - t0)
            last = v
        res["racks"][name] = {"first_s": ev[0] if ev else None, "settled_s": ev[-1] if ev else None}
    firsts = [r["first_s"] for r in res["racks"].values() if r["first_s"] is not None]
    lasts = [r["settled_s"] for r in res["racks"].values() if r["settled_s"] is not None]
    res["first_new_levels_at_every_rack_s"] = max(firsts) if len(firsts) == len(res["racks"]) else None
    res["settled_at_every_rack_s"] = max(lasts) if len(lasts) == len(res["racks"]) else None
    return res


def _snap(path: str) -> dict:
    return json.loads(Path(path).read_text())


def compare(plan: dict) -> dict:
    """Per class: served and battery power of the leaves against the flat controller's, and per node."""
    flat = {n["id"]: n for n in _snap(plan["flat"]["snapshot"])["nodes"]}
    tree = {}
    for name in plan:
        if name.startswith("rack"):
            tree.update({n["id"]: n for n in _snap(plan[name]["snapshot"])["nodes"]})
    out: dict = {"classes": {}, "max_node_diff_w": 0.0}
    for k in ("served_w", "battery_w", "bus_w", "shed_w"):
        d = max(abs(tree[i][k] - flat[i][k]) for i in flat)
        out["max_node_diff_w"] = max(out["max_node_diff_w"], d)
    for p in sorted({n["priority"] for n in flat.values()}):
        ids = [i for i in flat if flat[i]["priority"] == p]
        row = {}
        for k in ("served_w", "battery_w", "shed_w"):
            h, f = sum(tree[i][k] for i in ids), sum(flat[i][k] for i in ids)
            row[k] = {"tree": h, "flat": f, "diff": h - f}
        out["classes"][str(p)] = row
    out["max_class_diff_w"] = max(abs(r[k]["diff"]) for r in out["classes"].values() for k in r)
    # the energy rows: the top's (from the whole tree, through the links) against the flat controller's
    top = {r["priority"]: r for r in _snap(plan["top"]["snapshot"]).get("classes", [])}
    fl = {r["priority"]: r for r in _snap(plan["flat"]["snapshot"]).get("classes", [])}
    if fl:
        out["energy"] = {str(p): {k: {"tree": top.get(p, {}).get(k), "flat": fl[p][k]}
                                  for k in ("demand_w", "reserve_wh", "runtime_s", "reachable")} for p in sorted(fl)}
    return out


def agents_main(nodes_yaml: str, ports: str) -> None:
    """Serve the simulated nodes of a plant config as Modbus agents on the given ports (one process)."""
    import asyncio

    from vbatt.config.plant import load_config
    from vbatt.drivers.node.agent import AgentSet, AgentSpec, serve_until_signalled
    from vbatt.drivers.node.backends.sim import SimBackend

    _cfg, fleet = load_config(nodes_yaml)
    plist = [int(p) for p in ports.split(",")]
    specs = [AgentSpec(i, "127.0.0.1", p) for i, p in zip(fleet.ids, plist)]
    asyncio.run(serve_until_signalled(AgentSet(SimBackend(fleet, 0, len(fleet)), specs, tick_ms=100.0)))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["agents"]:
        agents_main(*argv[1:3])
        return 0
    ap = argparse.ArgumentParser(prog="examples/hierarchy/run.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="var/hierarchy", help="configs, logs, status files and snapshots go here")
    ap.add_argument("--rows", type=int, default=3)
    ap.add_argument("--racks", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--settle-s", type=float, default=5.0, help="run this long once every level is controlled")
    ap.add_argument("--moving", action="store_true", help="realistic capacities (the weights drift)")
    ap.add_argument("--poll-ms", type=float, default=200.0, help="every level's link and Modbus poll period")
    ap.add_argument("--cycle-ms", type=float, default=100.0, help="every controller's scan period")
    ap.add_argument("--step-at-s", type=float, default=None,
                    help="a demand step at node n-00-00 (to 0 W) this long after rack-00 starts: measures the "
                         "decision latency across the levels (latency.json)")
    ap.add_argument("--energy", metavar="C:S,...", default=None,
                    help="ride-through targets per class (e.g. 0:7200,1:1800,2:600,3:0): racks and the flat "
                         "controller run the energy program; compare.json sets the classes of the top against "
                         "the flat's")
    a = ap.parse_args(argv)
    out = Path(a.out)
    for f in out.glob("*.jsonl"):
        f.unlink()
    lay = Layout(a.rows, a.racks, a.nodes, rest=not a.moving, poll_ms=a.poll_ms, cycle_ms=a.cycle_ms,
                 step_at_s=a.step_at_s,
                 ride_through_s=({int(c): float(t) for c, t in (x.split(":") for x in a.energy.split(","))}
                                 if a.energy else None))
    plan = write_configs(out, lay)
    tree = Tree(plan, out)
    t0 = time.monotonic()
    try:
        tree.start_all()
        leaves = [n for n in plan if n.startswith("rack")]
        tree.wait(lambda: tree.controlled(leaves + [n for n in plan if n.startswith("row")]), 180,
                  "every rack and row controlled from above")
        print(f"every level controlled after {time.monotonic() - t0:.1f} s; settling {a.settle_s} s", flush=True)
        if lay.ride_through_s:  # the top's class rules on the whole tree at its decisions, 20 rounds in a row
            tree.wait(lambda: tree.decided() >= 20, 180, "the top's class rules on the whole tree")
            print(f"the top decides on the whole tree after {time.monotonic() - t0:.1f} s", flush=True)
        time.sleep(a.settle_s)
        if a.step_at_s is not None:
            print("waiting for the demand step at n-00-00 and its new levels", flush=True)
            tree.wait(lambda: _step_seen(out, a.step_at_s) is not None, a.step_at_s + 120, "the step seen by rack-00")
            time.sleep(a.settle_s)
    finally:
        tree.stop_all()
    if a.step_at_s is not None:
        lat = latency(plan, out, a.step_at_s)
        (out / "latency.json").write_text(json.dumps(lat, indent=1))
        print(json.dumps(lat, indent=1))
    res = compare(plan)
    (out / "compare.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
