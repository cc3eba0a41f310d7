"""`vbatt soak`: run the whole stack for real, inject faults at random, report what the controller saw.

The stack (all on 127.0.0.1, free ports, in a work dir):

  node agents (`vbatt fleet`, one process per group of nodes)
      <- one NodeProxy per node (runtime/soak/proxy.py, in this process) <- the controller
  `vbatt run CONFIG` (modbus nodes through the proxies, protection, retain on, OPC UA server on)
      <- UaMonitor (runtime/soak/ua.py, in this process): subscribed to every node and the scan

Faults (a seeded RNG picks kind, node, start and length; kinds are drawn from a shuffled bag so
that every kind comes up early): `agent_kill` (SIGKILL an agent process, restart it later),
`silent`, `garble`, `slow` (proxy modes), `opcua_vanish` (a client process that is SIGKILLed, or
that resets its own socket, without closing its session), and `controller_kill9` preceded by an
`overtemp_trip` (the proxy makes a node read over the trip temperature until it trips; the trip
must be latched when the temperature is normal again, still latched after the kill -9 and warm
restart, and cleared by an operator `ResetTrip` through OPC UA).

Figures that must be 0 are defined in docs/soak.md; the short version:

* instruction lost: a check window of one lease length during which the node was healthy (no
  fault injected on it or its agent, none ended within `settle_s`, controller up for more than
  `settle_s`) at whose end the agent's acknowledged `AckSeq`, read by this process straight from
  the agent (not through the proxy), is the same as at its start;
* latched trip lost: a trip seen latched before a controller kill -9 that is not latched after
  the restart (or one that vanished on its own before any reset);
* unhandled exceptions: "Traceback" in the log of any process the soak started, and in its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.node.fleet import demo_nodes_yaml
from vbatt.programs.codes import Trip

from vbatt.kernel.shm import PREFIX, SHM_DIR
from vbatt.soak.proxy import NodeProxy
from vbatt.soak.stack import Proc, cli, free_port, group_pids, group_rss_kib, run_cli, tracebacks_in
from vbatt.soak.ua import UaLogin, UaMonitor, server_has_connection

__all__ = ["SoakOptions", "Soak", "run_soak", "KINDS", "MUST_BE_ZERO"]

log = logging.getLogger("vbatt.soak.harness")

NODE_KINDS = ("agent_kill", "silent", "garble", "slow")
# faults that cut the instruction path; under "slow" and "overtemp_trip" instructions must still arrive
LINK_KINDS = ("agent_kill", "silent", "garble")
KINDS = NODE_KINDS + ("opcua_vanish", "overtemp_trip", "controller_kill9")
MUST_BE_ZERO = ("instructions_lost", "latched_trips_lost", "warm_restarts_failed", "unhandled_exceptions",
                "operator_resets_failed",
                "faults_not_recovered", "leftover_processes", "leftover_shm_segments")
_ACK = ss.NODE_MAP.at(ss.VENDOR_ID, "AckSeq").addr
_EXPIRIES = ss.NODE_MAP.at(ss.VENDOR_ID, "Expiries").addr
OT = int(Trip.OVER_TEMPERATURE)


@dataclass
class SoakOptions:
    duration_s: float = 60.0
    nodes: int = 20
    seed: int | None = None
    workdir: str | None = None  # default: a fresh temporary dir, removed afterwards unless keep
    keep: bool = False
    group_size: int = 5  # nodes per agent process (an agent_kill takes the whole group down)
    cycle_ms: float = 10.0
    poll_ms: float = 100.0
    timeout_ms: float = 300.0
    lease_ms: float = 1000.0
    stale_ms: float = 1000.0
    fault_gap_s: tuple[float, float] = (0.8, 2.5)
    fault_len_s: tuple[float, float] = (2.0, 4.0)
    kill_every_s: float = 150.0  # controller kill -9 (with a latched trip) this often; the first at 35 %
    settle_s: float = 3.0
    detect_timeout_s: float = 10.0
    recover_timeout_s: float = 15.0
    start_timeout_s: float = 120.0
    # Go on past duration_s (up to twice it) until every kind was injected at least once: a short run on a
    # loaded machine (slow restarts) otherwise ends before the draw reaches every kind.
    every_kind: bool = False


@dataclass
class FaultRecord:
    id: int
    kind: str
    targets: list[str]
    t0: float
    variant: str = ""
    t_end: float | None = None
    detected: dict[str, float] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    recovered: dict[str, float] = field(default_factory=dict)
    note: str = ""
    ok: bool = True  # kind-specific verdict (controller_kill9: the new incarnation logged its restart)

    @property
    def is_detected(self) -> bool:
        return all(t in self.detected for t in self.targets)

    @property
    def detect_s(self) -> float | None:
        return max(self.detected[t] for t in self.targets) - self.t0 if self.is_detected else None

    @property
    def recover_s(self) -> float | None:
        if self.t_end is None or not all(t in self.recovered for t in self.targets):
            return None
        return max(0.0, max(self.recovered[t] for t in self.targets) - self.t_end)


# expected driver fault code per kind (drivers.faults.Fault); detection itself is "offline or faulted"
EXPECTED_CODE = {"agent_kill": 3, "silent": 2, "garble": 5}


class Soak:
    def __init__(self, opts: SoakOptions):
        self.o = opts
        self.seed = opts.seed if opts.seed is not None else secrets.randbelow(2**31)
        self.rng = random.Random(self.seed)
        self.tmp = opts.workdir is None
        self.work = Path(opts.workdir or tempfile.mkdtemp(prefix="vbatt-soak-")).resolve()
        self.logs = self.work / "logs"
        self.ids = [f"soak-{i:03d}" for i in range(opts.nodes)]
        g = max(1, opts.group_size)
        self.groups = [self.ids[k:k + g] for k in range(0, len(self.ids), g)]
        self.group_of = {n: k for k, grp in enumerate(self.groups) for n in grp}
        self.agents: list[Proc] = []
        self.agent_ports: dict[str, int] = {}
        self.proxies: dict[str, NodeProxy] = {}
        self.controller: Proc | None = None
        self.clients: list[Proc] = []
        self.monitor: UaMonitor | None = None
        self.faults: list[FaultRecord] = []
        self.active: dict[str, FaultRecord] = {}  # node -> the fault on it now
        self.quiet_since: dict[str, float] = {}  # node -> healthy since (None: not healthy)
        self.ctl_quiet_since: float | None = None
        self.incarnation = 0
        self.scan_seen: dict[int, dict[str, float]] = {}
        self.instructions_lost: list[dict] = []
        self.windows_checked = 0
        self.lease_expiries_healthy = 0
        self.latched_trips_lost: list[str] = []
        self.resets_failed: list[str] = []
        self.warm_failed: list[str] = []
        self.soak_errors: list[str] = []
        self.rss_start_kib = 0
        self.rss_end_kib = 0
        self.final_stats: dict = {}
        self.controller_pids: list[int] = []
        self.ua_port = 0
        self.login: UaLogin | None = None
        self.t_start = 0.0
        self.injected_s = 0.0  # seconds of fault injection the run took
        self._bag: list[str] = []
        self._tasks: set[asyncio.Task] = set()
        self._stop = asyncio.Event()

    # -- set-up -----------------------------------------------------------------------------------
    def _group_config(self, k: int) -> Path:
        grp = self.groups[k]
        start = self.ids.index(grp[0])
        text = """drivers:
  modbus:
    plaintext: true
    embedded_fleet: {tick_ms: 100}
""" + demo_nodes_yaml(len(grp), "soak-{i:03d}", soc=(0.5, 1.0), start=start, seed=self.seed + k)
        p = self.work / "agents" / f"group-{k}.yaml"
        p.write_text(text)
        return p

    def _controller_config(self) -> Path:
        o = self.o
        nodes = "\n".join(f"  - {{id: {n}, driver: modbus, host: 127.0.0.1, port: {self.proxies[n].port}, "
                          f"unit_id: 1, priority: {1 + i % 3}}}" for i, n in enumerate(self.ids))
        text = f"""cycle:
  cycle_ms: {o.cycle_ms}
  watchdog_overruns: 5
plant:
  main_limit_w: {100.0 * len(self.ids)}
  stale_ms: {o.stale_ms}
drivers:
  modbus:
    poll_ms: {o.poll_ms}
    timeout_ms: {o.timeout_ms}
    lease_ms: {o.lease_ms}
    reconnect_min_ms: 100
    reconnect_max_ms: 1000
    plaintext: true
retain: {{enabled: true, dir: {self.work / 'retain'}}}
opcua:
  enabled: true
  host: 127.0.0.1
  port: {self.ua_port}
  state_dir: {self.work / 'opcua'}
  create_operator: false
  history: {{enabled: false}}
nodes:
{nodes}
programs:
  - forecast: {{horizon_s: 1.0, level_tau_s: 0.5, trend_tau_s: 20}}
  - protection: {{soc_min: 0.1, soc_max: 1.0, oc_pickup_a: 40, oc_curve: very_inverse, oc_tms: 0.1,
                 oc_instantaneous_a: 120, derate_start_c: 45, derate_zero_c: 55, trip_temperature_c: 60,
                 over_voltage_v: 58, under_voltage_v: 40, voltage_delay_s: 1.0}}
  - allocation: {{soc_min: 0.1, soc_max: 1.0, ramp_w_per_s: 2000, restore_hold_s: 10, restore_margin: 0.05}}
  - health: {{voltage_high_v: 56, voltage_low_v: 43, current_high_a: 35, temperature_high_c: 45,
             soc_low: 0.15, temperature_rise_c_per_s: 0.05}}
"""
        p = self.work / "plant.yaml"
        p.write_text(text)
        return p

    async def _read_ports(self, path: Path, n: int, timeout_s: float, proc: Proc) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                ports = [int(x) for x in path.read_text().split()]
                if len(ports) == n:
                    return ports
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}) before serving; see {proc.log_path}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{proc.name}: no ports in {path} within {timeout_s:g} s; see {proc.log_path}")

    async def _start_agent(self, k: int) -> None:
        proc = self.agents[k]
        ready = self.work / "agents" / f"group-{k}.ports"
        ready.unlink(missing_ok=True)
        await asyncio.to_thread(proc.start)
        ports = await self._read_ports(ready, len(self.groups[k]), 60.0, proc)
        for n, port in zip(self.groups[k], ports):
            self.agent_ports[n] = port
            if n in self.proxies:
                self.proxies[n].upstream_port = port

    async def _setup(self) -> None:
        for d in ("logs", "agents", "retain", "opcua", "pki"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        for k in range(len(self.groups)):
            cfgp = self._group_config(k)
            ready = self.work / "agents" / f"group-{k}.ports"
            self.agents.append(Proc(f"agents-{k}", cli("fleet", str(cfgp), "--ready-file", str(ready)),
                                    self.logs / f"agents-{k}.log", self.work))
        await asyncio.gather(*(self._start_agent(k) for k in range(len(self.groups))))
        for i, n in enumerate(self.ids):
            p = NodeProxy(n, self.agent_ports[n], seed=self.seed * 1000 + i)
            await p.start()
            self.proxies[n] = p
        # OPC UA: a client certificate and an operator account, made with the CLI an operator would use
        state = str(self.work / "opcua")
        password = secrets.token_urlsafe(16)
        await asyncio.to_thread(run_cli, ["opcua-cert", "--state-dir", state, "--client", "soak",
                                          "--out", str(self.work / "pki")])
        await asyncio.to_thread(run_cli, ["opcua-user", "add", "soak", "--role", "operator", "--password-stdin",
                                          "--state-dir", state], stdin=password + "\n")
        self.ua_port = free_port()
        self.login = UaLogin(f"opc.tcp://127.0.0.1:{self.ua_port}/", str(self.work / "pki" / "soak.der"),
                             str(self.work / "pki" / "soak.key.pem"), "soak", password, "urn:vbatt:client:soak")
        cfgp = self._controller_config()
        self.controller = Proc("controller", cli("run", str(cfgp), "-q", "--stats-json",
                                                 str(self.work / "stats.json")),
                               self.logs / "controller.log", self.work)
        self.monitor = UaMonitor(self.login, self.ids, self._on_change)
        await self._start_controller()
        self._spawn(self.monitor.run(self._stop))
        await self._wait_running(self.o.start_timeout_s, all_online=True)

    async def _start_controller(self) -> None:
        self.incarnation += 1
        self.scan_seen[self.incarnation] = {"cycles": 0, "overruns": 0, "wake_max_us": 0.0}
        await asyncio.to_thread(self.controller.start)
        self.controller_pids.append(self.controller.pid)

    async def _wait_running(self, timeout_s: float, all_online: bool) -> float:
        """Until the OPC UA client sees this incarnation running (and every healthy node online)."""
        m = self.monitor
        deadline = time.monotonic() + timeout_s
        inc = self.incarnation
        while time.monotonic() < deadline:
            seen = self.scan_seen[inc]
            if m.up and m.values.get(("scan", "state")) == "RUNNING" and seen["cycles"] > 0:
                if not all_online or all(m.values.get((n, "online")) for n in self.ids if n not in self.active):
                    return time.monotonic()
            if not self.controller.alive():
                raise RuntimeError(f"the controller exited ({self.controller.popen.returncode}); "
                                   f"see {self.controller.log_path}")
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the controller was not running with every node online within {timeout_s:g} s "
                           f"(OPC UA up: {m.up}, errors: {m.errors[-3:]}); see {self.controller.log_path}")

    # -- what the controller shows ---------------------------------------------------------------
    def _on_change(self, who: str, var: str, val, t: float) -> None:
        if who == "scan":
            seen = self.scan_seen[self.incarnation]
            if var in ("cycles", "overruns") and isinstance(val, int):
                seen[var] = max(seen[var], val)
            elif var == "wake_max_us" and isinstance(val, float):
                seen[var] = max(seen[var], val)
            return
        f = self.active.get(who)
        if f is None or who in f.detected:
            return
        if f.kind in EXPECTED_CODE:
            if (var == "fault" and val) or (var == "online" and val is False):
                f.detected[who] = t
            if var == "fault" and val and who not in f.codes:
                f.codes[who] = int(val)
        elif f.kind == "slow" and var == "io_latency_ms":
            if isinstance(val, float) and val >= 0.8 * f.slow_ms:  # type: ignore[attr-defined]
                f.detected[who] = t
        elif f.kind == "overtemp_trip" and var == "trip" and int(val) & OT:
            f.detected[who] = t

    def _healthy(self, n: str) -> bool:
        m = self.monitor
        return (n not in self.active and m.values.get((n, "online")) is True and m.values.get((n, "fault")) == 0
                and not m.values.get((n, "trip")) and self.quiet_since.get(n, 0.0) is not None
                and float(m.values.get((n, "io_latency_ms")) or 0.0) < 0.25 * self.o.timeout_ms
                and self.quiet_since.get(n, 0.0) <= time.monotonic())

    def _begin(self, kind: str, targets: list[str], variant: str = "") -> FaultRecord:
        f = FaultRecord(len(self.faults) + 1, kind, targets, time.monotonic(), variant)
        self.faults.append(f)
        for n in targets:
            if kind in NODE_KINDS or kind == "overtemp_trip":
                self.active[n] = f
            if kind in LINK_KINDS:
                self.quiet_since[n] = None  # type: ignore[assignment]
        log.info("fault %d %s %s %s", f.id, kind, variant, ",".join(targets))
        return f

    def _end(self, f: FaultRecord) -> None:
        f.t_end = time.monotonic()
        for n in f.targets:
            if self.active.get(n) is f:
                del self.active[n]
            if f.kind in LINK_KINDS:
                self.quiet_since[n] = f.t_end + self.o.settle_s

    async def _await_detect(self, f: FaultRecord, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not f.is_detected and time.monotonic() < deadline and not self._stop.is_set():
            await asyncio.sleep(0.02)

    async def _await_recovery(self, f: FaultRecord) -> None:
        m = self.monitor
        deadline = time.monotonic() + self.o.recover_timeout_s
        while time.monotonic() < deadline:
            for n in f.targets:
                if n not in f.recovered and m.values.get((n, "online")) is True and m.values.get((n, "fault")) == 0:
                    f.recovered[n] = time.monotonic()
            if all(n in f.recovered for n in f.targets):
                return
            await asyncio.sleep(0.05)
        f.note += f" not online again within {self.o.recover_timeout_s:g} s: " + \
                  ",".join(n for n in f.targets if n not in f.recovered)

    # -- node faults --------------------------------------------------------------------------------
    def _pick_node(self) -> str | None:
        ok = [n for n in self.ids if self._healthy(n)]
        return self.rng.choice(ok) if ok else None

    async def _proxy_fault(self, kind: str) -> None:
        n = self._pick_node()
        if n is None:
            return
        dur = self.rng.uniform(*self.o.fault_len_s)
        p = self.proxies[n]
        if kind == "slow":
            slow_s = self.rng.uniform(0.3, 0.6) * self.o.timeout_ms / 1e3
            f = self._begin(kind, [n], f"{slow_s * 1e3:.0f} ms")
            f.slow_ms = slow_s * 1e3  # type: ignore[attr-defined]
            p.set_mode("slow", slow_s)
        else:
            f = self._begin(kind, [n])
            p.set_mode(kind)
        await self._await_detect(f, max(dur, self.o.detect_timeout_s))
        rest = dur - (time.monotonic() - f.t0)
        if rest > 0:
            await asyncio.sleep(rest)
        p.set_mode("pass")
        self._end(f)
        await self._await_recovery(f)

    async def _agent_kill(self) -> None:
        ok = [k for k, grp in enumerate(self.groups) if all(self._healthy(n) for n in grp)]
        if not ok:
            return
        k = self.rng.choice(ok)
        dur = self.rng.uniform(*self.o.fault_len_s)
        f = self._begin("agent_kill", list(self.groups[k]), f"agents-{k}")
        await asyncio.to_thread(self.agents[k].kill9, True)
        await self._await_detect(f, max(dur, self.o.detect_timeout_s))
        rest = dur - (time.monotonic() - f.t0)
        if rest > 0:
            await asyncio.sleep(rest)
        await self._start_agent(k)
        self._end(f)
        await self._await_recovery(f)

    async def _opcua_vanish(self) -> None:
        drop = self.rng.random() < 0.5
        proc = Proc(f"ua-client-{len(self.clients)}", cli() [:2] + ["vbatt.soak.ua", "vanish",
                    "--endpoint", self.login.endpoint, "--cert", self.login.cert, "--key", self.login.key,
                    "--user", self.login.user, "--app-uri", self.login.app_uri, "--nodes", ",".join(self.ids[:5])]
                    + (["--drop"] if drop else []), self.logs / f"ua-client-{len(self.clients)}.log", self.work)
        self.clients.append(proc)
        await asyncio.to_thread(self._start_with_stdin, proc, self.login.password + "\n")
        port = None
        deadline = time.monotonic() + 30.0
        while port is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                for line in proc.log_path.read_text().splitlines():
                    if line.startswith("ready "):
                        port = int(line.split()[1])
            if port is None:
                if not proc.alive() and not drop:
                    break
                await asyncio.sleep(0.05)
        if port is None:
            await asyncio.to_thread(proc.kill9, True)
            self.soak_errors.append(f"{proc.name} never connected; see {proc.log_path}")
            return
        if not drop:
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        f = self._begin("opcua_vanish", [f"client:{port}"], "reset socket" if drop else "SIGKILL")
        if not drop:
            await asyncio.to_thread(proc.kill9, True)
        deadline = time.monotonic() + self.o.detect_timeout_s
        while time.monotonic() < deadline:
            if not server_has_connection(self.ua_port, port):
                f.detected[f.targets[0]] = time.monotonic()
                break
            await asyncio.sleep(0.02)
        self._end(f)
        f.recovered[f.targets[0]] = f.t_end
        await asyncio.to_thread(proc.kill_leftovers)

    @staticmethod
    def _start_with_stdin(proc: Proc, text: str) -> None:
        import os
        import subprocess

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(proc.log_path, "ab") as logf:
            proc.popen = subprocess.Popen(proc.argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                                          cwd=proc.cwd, env=env, start_new_session=True)
        proc.pgids.append(proc.popen.pid)
        proc.starts += 1
        proc.popen.stdin.write(text.encode())
        proc.popen.stdin.close()

    # -- latched trip + controller kill -9 ---------------------------------------------------------
    async def _trip_and_kill(self) -> None:
        m = self.monitor
        n = self._pick_node()
        trip = None
        if n is not None:
            trip = self._begin("overtemp_trip", [n], "TmpC 75 degC via the proxy")
            self.proxies[n].set_mode("hot")
            await self._await_detect(trip, self.o.detect_timeout_s)
            self.proxies[n].set_mode("pass")
            # the temperature is normal again: the trip must stay latched (and be saved by the retainer)
            await asyncio.sleep(1.5)
            if trip.is_detected and not int(m.values.get((n, "trip"), 0)) & OT:
                self.latched_trips_lost.append(f"{n}: trip cleared by itself before any reset")
        variant = self.rng.choice(["leader", "group"])
        kill = self._begin("controller_kill9", ["controller"], "kill -9 supervisor" if variant == "leader"
                           else "kill -9 every controller process")
        self.ctl_quiet_since = None
        seen = self.scan_seen[self.incarnation]
        await asyncio.to_thread(self.controller.kill9, variant == "group")
        left = await asyncio.to_thread(self.controller.wait_group_gone, 10.0)
        if left:
            kill.note += f"{len(left)} controller process(es) still alive 10 s after the kill -9 of the supervisor; "
            await asyncio.to_thread(self.controller.kill_leftovers)
        await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        log_before = self.controller.log_path.stat().st_size
        await self._start_controller()
        t_back = await self._wait_running(90.0, all_online=False)
        kill.detected["controller"] = t_back
        self.ctl_quiet_since = t_back + self.o.settle_s
        text = self.controller.log_path.read_text(errors="replace")[log_before:]
        line = next((ln.strip() for ln in text.splitlines() if ln.startswith("vbatt: ") and
                     ("restart" in ln or "cold start" in ln)), "")
        kill.ok = bool(line)  # the new incarnation ran and said how it restarted
        if not line.startswith("vbatt: warm restart"):
            self.warm_failed.append(f"after {kill.variant}: {line or 'no restart line in the log'}")
        kill.note += line or "no restart line"
        kill.note += f" (cycles before the kill: {int(seen['cycles'])})"
        self._end(kill)
        kill.recovered["controller"] = t_back
        if trip is None:
            return
        # still latched after the restart? (the subscription delivers current values on connect)
        deadline = time.monotonic() + 5.0
        while (n, "trip") not in m.values and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        if trip.is_detected and not int(m.values.get((n, "trip"), 0)) & OT:
            self.latched_trips_lost.append(f"{n}: not latched after the controller's kill -9 and restart")
        try:
            await m.reset_trip(n)
        except Exception as exc:  # noqa: BLE001 (reported, not raised)
            self.resets_failed.append(f"{n}: ResetTrip failed: {type(exc).__name__}: {exc}")
        deadline = time.monotonic() + 5.0
        while int(m.values.get((n, "trip"), 1)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if int(m.values.get((n, "trip"), 1)):
            self.resets_failed.append(f"{n}: trip still set 5 s after ResetTrip")
        self._end(trip)
        await self._await_recovery(trip)

    # -- instructions: read the agents directly, once per lease ---------------------------------------
    async def _instruction_checker(self) -> None:
        from pymodbus.client import AsyncModbusTcpClient

        clients: dict[str, tuple[int, AsyncModbusTcpClient]] = {}
        prev: dict[str, tuple[float, int, int]] = {}
        period = self.o.lease_ms / 1e3
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

        async def read(n: str) -> tuple[float, int, int] | None:
            port = self.agent_ports.get(n)
            c = clients.get(n)
            if c is None or c[0] != port or not c[1].connected:
                if c is not None:
                    c[1].close()
                cl = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.5, retries=0, reconnect_delay=0)
                clients[n] = (port, cl)
                try:
                    if not await asyncio.wait_for(cl.connect(), 1.0):
                        return None
                except (OSError, asyncio.TimeoutError):
                    return None
            cl = clients[n][1]
            try:
                r = await asyncio.wait_for(cl.read_holding_registers(_ACK, count=_EXPIRIES + 2 - _ACK, device_id=1), 1.0)
            except Exception:  # noqa: BLE001 (agent down: no sample)
                return None
            if r.isError():
                return None
            regs = r.registers
            return time.monotonic(), (regs[0] << 16) | regs[1], (regs[-2] << 16) | regs[-1]

        try:
            while not self._stop.is_set():
                t_next = time.monotonic() + period
                got = await asyncio.gather(*(read(n) for n in self.ids))
                for n, s in zip(self.ids, got):
                    if s is None:
                        prev.pop(n, None)
                        continue
                    p = prev.get(n)
                    prev[n] = s
                    if p is None:
                        continue
                    qn, qc = self.quiet_since.get(n, 0.0), self.ctl_quiet_since
                    healthy = qn is not None and qn <= p[0] and qc is not None and qc <= p[0]
                    if not healthy:
                        continue
                    self.windows_checked += 1
                    if s[1] == p[1]:
                        self.instructions_lost.append({"node": n, "t": round(s[0] - self.t_start, 3),
                                                       "window_s": round(s[0] - p[0], 3), "ack_seq": s[1]})
                    if s[2] > p[2]:
                        self.lease_expiries_healthy += s[2] - p[2]
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(0.0, t_next - time.monotonic()))
        finally:
            for _port, c in clients.values():
                c.close()

    # -- the run ------------------------------------------------------------------------------------
    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            exc = t.exception()
            self.soak_errors.append(f"{type(exc).__name__}: {exc}")
            log.error("soak task failed", exc_info=exc)

    def _next_kind(self) -> str:
        if not self._bag:
            self._bag = list(NODE_KINDS + ("opcua_vanish",))
            self.rng.shuffle(self._bag)
        return self._bag.pop()

    def _every_kind_injected(self) -> bool:
        return set(KINDS) <= {f.kind for f in self.faults}

    def _can_inject(self, kind: str) -> bool:
        if kind == "opcua_vanish":
            return True
        if kind == "agent_kill":
            return any(all(self._healthy(n) for n in grp) for grp in self.groups)
        return any(self._healthy(n) for n in self.ids)

    async def _quiesce(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(not t.done() for t in self._faulting) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def run(self) -> dict:
        o = self.o
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _l, ctx: self.soak_errors.append(str(ctx.get("message"))
                                                                            + f" {ctx.get('exception')!r}"))
        self._faulting: set[asyncio.Task] = set()
        try:
            await self._setup()
            self.t_start = time.monotonic()
            self.ctl_quiet_since = self.t_start + o.settle_s
            for n in self.ids:
                self.quiet_since[n] = self.t_start + o.settle_s
            self._spawn(self._instruction_checker())
            await asyncio.sleep(min(3.0, o.duration_s / 10))
            self.rss_start_kib = group_rss_kib(self.controller.pid)
            t_stop = self.t_start + o.duration_s
            next_kill = self.t_start + min(0.35 * o.duration_s, 60.0)
            next_fault = time.monotonic()
            while time.monotonic() < t_stop or (o.every_kind and time.monotonic() < t_stop + o.duration_s
                                                and not self._every_kind_injected()):
                now = time.monotonic()
                if next_kill is not None and now >= next_kill:
                    if t_stop - now > 20.0 or not any(f.kind == "controller_kill9" for f in self.faults):
                        await self._quiesce(30.0)
                        await self._trip_and_kill()
                    next_kill += o.kill_every_s
                    next_fault = time.monotonic() + 1.0
                elif now >= next_fault and (next_kill is None or now < next_kill - 6.0):
                    kind = self._next_kind()
                    if not self._can_inject(kind):  # no healthy target now: keep the kind, try again soon
                        self._bag.append(kind)
                        next_fault = now + 0.3
                        await asyncio.sleep(0.05)
                        continue
                    coro = {"agent_kill": self._agent_kill, "opcua_vanish": self._opcua_vanish}.get(kind)
                    t = self._spawn(coro() if coro else self._proxy_fault(kind))
                    self._faulting.add(t)
                    t.add_done_callback(self._faulting.discard)
                    next_fault = now + self.rng.uniform(*o.fault_gap_s)
                await asyncio.sleep(0.05)
            self.injected_s = time.monotonic() - self.t_start
            await self._quiesce(o.recover_timeout_s + 10.0)
            self.rss_end_kib = group_rss_kib(self.controller.pid)
        finally:
            await self._teardown()
        return self.report()

    async def _teardown(self) -> None:
        self._stop.set()
        for t in list(self._tasks):
            if not t.done():
                with contextlib.suppress(asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(t), 5.0)
        for t in list(self._tasks):
            t.cancel()
        if self.controller is not None:
            code = await asyncio.to_thread(self.controller.stop, 30.0)
            self.controller_exit = code
            with contextlib.suppress(OSError, ValueError):
                self.final_stats = json.loads((self.work / "stats.json").read_text())
        for a in self.agents:
            await asyncio.to_thread(a.stop, 10.0)
        for c in self.clients:
            await asyncio.to_thread(c.kill_leftovers)
        for p in self.proxies.values():
            await p.close()
        await asyncio.sleep(0.2)
        self.leftover = [pid for proc in [self.controller, *self.agents, *self.clients] if proc
                         for g in proc.pgids for pid in group_pids(g)]
        self.leftover_shm = sorted(p.name for p in SHM_DIR.glob(PREFIX + "*")
                                   if any(p.name.startswith(f"{PREFIX}{pid}-") for pid in self.controller_pids))
        for name in self.leftover_shm:  # report them, then do not leave them behind ourselves
            (SHM_DIR / name).unlink(missing_ok=True)

    # -- the report ---------------------------------------------------------------------------------
    def report(self) -> dict:
        logs = sorted(self.logs.glob("*.log"))
        tb = {p.name: tracebacks_in(p) for p in logs}
        tb = {k: v for k, v in tb.items() if v}
        unhandled = sum(tb.values()) + len(self.soak_errors)
        per_kind = {}
        for kind in KINDS:
            fs = [f for f in self.faults if f.kind == kind]
            det = [f.detect_s for f in fs if f.is_detected]
            rec = [f.recover_s for f in fs if f.recover_s is not None]
            mis = [f for f in fs if f.kind in EXPECTED_CODE and f.codes and
                   any(c != EXPECTED_CODE[kind] for c in f.codes.values())]
            per_kind[kind] = {
                "injected": len(fs), "detected": sum(f.is_detected and f.ok for f in fs),
                "detect_p50_s": _r(statistics.median(det)) if det else None, "detect_max_s": _r(max(det)) if det else None,
                "recover_p50_s": _r(statistics.median(rec)) if rec else None,
                "recover_max_s": _r(max(rec)) if rec else None,
                "not_recovered": sum(1 for f in fs if f.t_end is not None and f.recover_s is None),
                "other_fault_code": len(mis),
            }
        seen = dict(self.scan_seen)
        fs = self.final_stats
        last = self.incarnation
        cycles = sum(int(v["cycles"]) for k, v in seen.items() if k != last) + int(fs.get("cycles", seen.get(last, {}).get("cycles", 0)))
        overruns = sum(int(v["overruns"]) for k, v in seen.items() if k != last) + int(fs.get("overruns", seen.get(last, {}).get("overruns", 0)))
        wake = max([v["wake_max_us"] for v in seen.values()] + [fs.get("wake_us", {}).get("run", {}).get("max", 0.0)])
        injected = sum(v["injected"] for v in per_kind.values())
        detected = sum(v["detected"] for v in per_kind.values())
        figures = {
            "instructions_lost": len(self.instructions_lost),
            "latched_trips_lost": len(self.latched_trips_lost),
            "warm_restarts_failed": len(self.warm_failed),
            "unhandled_exceptions": unhandled,
            "operator_resets_failed": len(self.resets_failed),
            "faults_not_recovered": sum(v["not_recovered"] for v in per_kind.values()),
            "leftover_processes": len(self.leftover),
            "leftover_shm_segments": len(self.leftover_shm),
        }
        ok = all(v == 0 for v in figures.values()) and injected == detected and injected > 0
        return {
            "ok": ok,
            "seed": self.seed,
            "duration_s": self.o.duration_s,
            "injected_s": round(self.injected_s, 1),  # longer than duration_s with every_kind
            "nodes": len(self.ids),
            "agent_processes": len(self.groups),
            "workdir": str(self.work),
            "cycles": cycles,
            "overruns": overruns,
            "worst_wake_latency_us": _r(wake, 1),
            "wake_p99_us_last_run": _r(fs.get("wake_us", {}).get("run", {}).get("p99"), 1),
            "controller_incarnations": self.incarnation,
            "controller_exit_code": getattr(self, "controller_exit", None),
            "faults_injected": injected,
            "faults_detected": detected,
            "per_kind": per_kind,
            **figures,
            "instruction_windows_checked": self.windows_checked,
            "lease_expiries_while_healthy": self.lease_expiries_healthy,
            "memory_rss_mib": {"start": _r(self.rss_start_kib / 1024, 1), "end": _r(self.rss_end_kib / 1024, 1)},
            "tracebacks": tb,
            "soak_errors": self.soak_errors[:20],
            "incarnations": [{"n": k, **{x: _r(v[x], 1) for x in v}} for k, v in sorted(seen.items())],
            "details": {"instructions_lost": self.instructions_lost[:50], "latched_trips_lost": self.latched_trips_lost,
                        "warm_restarts_failed": self.warm_failed,
                        "resets_failed": self.resets_failed, "leftover_pids": self.leftover,
                        "leftover_shm": self.leftover_shm},
            "faults": [{"id": f.id, "kind": f.kind, "targets": f.targets, "variant": f.variant,
                        "t_s": _r(f.t0 - self.t_start), "detect_s": _r(f.detect_s), "recover_s": _r(f.recover_s),
                        "codes": f.codes, "ok": f.ok, "note": f.note.strip()} for f in self.faults],
        }

    def cleanup(self) -> None:
        if self.tmp and not self.o.keep:
            shutil.rmtree(self.work, ignore_errors=True)


def _r(x, nd: int = 3):
    return None if x is None else round(float(x), nd)


def run_soak(opts: SoakOptions) -> dict:
    """Run a whole soak (blocking); returns the report dict. Every started process is gone afterwards."""
    soak = Soak(opts)

    async def main() -> dict:
        return await asyncio.wait_for(soak.run(), opts.duration_s * (2 if opts.every_kind else 1) + opts.start_timeout_s + 300.0)

    try:
        return asyncio.run(main())
    finally:
        for proc in [soak.controller, *soak.agents, *soak.clients]:  # Ctrl-C or a failure in set-up
            if proc is not None:
                proc.kill_leftovers()
        for pid in soak.controller_pids:  # a controller SIGKILLed here leaves its image segment
            for seg in SHM_DIR.glob(f"{PREFIX}{pid}-*"):
                if not group_pids(pid):
                    seg.unlink(missing_ok=True)
        soak.cleanup()
