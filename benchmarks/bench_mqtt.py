"""Controller-side MQTT Sparkplug B throughput: N nodes publishing at 1 Hz through one Mosquitto on 127.0.0.1.

Publishers: `vbatt fleet CONFIG --edge K` processes, one Sparkplug edge node each (NODES_PER_EDGE
devices, tick 1 s: every device sends a DDATA per second, its state of charge changes every tick).
Controller: the `mqtt` driver's host application (drivers/mqtt/driver.py `Host`) in a process of
its own, staging for the scan every 20 ms and taking a new instruction every 100 ms (a new sequence
number, as a scan would make), which the host sends as DCMDs by its rules (drivers/mqtt/driver.py
`send_due`: a move beyond the deadband at once, a renewal at half the lease); `--change F` moves the
instruction of a share F of the devices per second beyond the deadband (default 0: renewals only),
and the DCMDs are counted by why. Measured over WINDOW_S after every
node is online: the controller's CPU (user + system of its process), the DDATA it decoded per second,
the age of the data when staged for the scan (stage time − the payload's timestamp, both wall
clocks of this machine; p50/p99 over every fresh value staged), the instruction round trip (DCMD
sent → its sequence number acknowledged in a DDATA; p50/p99 over the nodes' last round trip), and
the CPU of the broker and of the publishers (from /proc), with the load average.

    python -m benchmarks.bench_mqtt --nodes 10000          # figures on stdout and in benchmarks/mqtt_results.json
    make bench ARGS="-k mqtt"                              # 1,000 nodes under pytest-benchmark
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NODES_PER_EDGE = 2500
WINDOW_S = float(os.environ.get("VBATT_BENCH_WINDOW_S", "20"))
SETTLE_S = 90.0  # longest wait for every node to be online before measuring anyway
PW = "bench-secret"


def _cpu_s(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _sent(tmp: Path, k: int) -> dict:
    """The replay publishers' counters, summed (their --stats files; t: the newest write)."""
    tot = {"t": 0.0, "ddata": 0, "acks": 0, "skipped_ticks": 0}
    for j in range(k):
        try:
            d = json.loads((tmp / f"replay-{j}.json").read_text())
        except (OSError, ValueError):
            continue
        for key in ("ddata", "acks", "skipped_ticks"):
            tot[key] += d[key]
        tot["t"] = max(tot["t"], d["t"])
    return tot


def _threads_cpu_s() -> dict[str, float]:
    """CPU seconds of each thread of this process by name (/proc/self/task): paho's network thread vs the loop."""
    import threading

    paho = {th.native_id for th in threading.enumerate() if th.name.startswith("paho")}
    out: dict[str, float] = {}
    for t in Path("/proc/self/task").iterdir():
        try:
            name = (t / "comm").read_text().strip()
            parts = (t / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        key = ("asyncio loop" if t.name == str(os.getpid()) else "paho network thread" if int(t.name) in paho
               else "other threads")
        out[key] = out.get(key, 0.0) + (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    return out


def _plant(n: int, port: int, ca: str | None, per_edge: int, tick_ms: float = 1000, processes: int = 1) -> str:
    sec = f"tls: {{ca: '{ca}'}}" if ca else "plaintext: true"
    return f"""
plant: {{stale_ms: 3000}}
drivers:
  mqtt: {{host: 127.0.0.1, port: {port}, {sec}, username: controller, password: {PW}, host_id: bench,
         group: bench, command_ms: 1000, silence_ms: 5000, publish_ms: 20, processes: {processes},
         fleet: {{edge_node: "fleet-{{e}}", nodes_per_edge: {per_edge}, password: {PW}, tick_ms: {tick_ms:g},
                 period_ms: 30000}}}}
nodes:
  - template: {{count: {n}, id: "n-{{i:05d}}", driver: mqtt, demand_w: [200, 450], max_discharge_w: [400, 800],
               max_charge_w: [200, 400], capacity_wh: [300, 900], soc: [0.4, 1.0], link_max_w: [500, 1000],
               demand_profile: {{kind: sine, amplitude_w: 60, period_s: 120, noise_w: 15}}}}
"""


def controller(cfg_path: str, window_s: float, out_path: str, change: float = 0.0, part: int = 0) -> None:
    """The host application of the config's MQTT I/O process `part` (drivers.mqtt.processes, split by
    runtime/config/plan.py `partition` as `vbatt run` does, the first owning the STATE) alone in this
    process; writes its figures to out_path and the ages it staged to out_path + ".age.npy"."""
    from vbatt.config.plan import partition
    from vbatt.config.plant import load_config
    from vbatt.drivers.faults import Fault
    from vbatt.drivers.mqtt.config import mqtt_nodes
    from vbatt.drivers.mqtt.driver import Host
    from vbatt.drivers.mqtt.edge import Link
    from vbatt.kernel.image import DRIVER_INPUTS

    cfg, fleet = load_config(cfg_path)
    d = cfg.drivers.mqtt
    where = mqtt_nodes(cfg, fleet)
    parts = [(a, b) for a, b, kind in partition(cfg, fleet) if kind == "mqtt"]
    a, b = parts[part]
    nodes = [where[i] for i in range(a, b)]
    ids = [str(x) for x, _y in parts]  # named as the mqtt driver names them: by their first node
    h = Host(nodes, Link.of(d), host_id=d.host_id, lease_ms=d.lease, command_ms=d.command_ms,
             silence_ms=d.silence_ms, backoff_s=(0.25, 2.0), deadband_w=d.deadband_w,
             command_min_ms=d.command_min_ms, member=ids[part] if part else None,
             members=tuple(ids[1:]) if not part else (), per_edge=len(parts) > 1)
    n = len(nodes)
    staging = {f.name: np.zeros(n, f.dtype) for f in DRIVER_INPUTS}
    outputs = {k: np.full(n, 10.0) for k in ("battery_w", "bus_w", "served_w", "shed_w")}
    rng = np.random.default_rng(1)

    async def main() -> dict:
        stop = asyncio.Event()
        task = asyncio.create_task(h.link_task(0, stop))
        loop = asyncio.get_running_loop()
        t_start = time.monotonic()
        seq = 1
        ages: list[np.ndarray] = []
        last_got = np.zeros(n, np.int64)
        online_at = None
        gap_max = 0.0
        t0 = ru0 = m0 = rtt_ok = None
        next_seq = loop.time()
        while True:
            await asyncio.sleep(0.02)
            if loop.time() >= next_seq:
                seq += 1
                if change > 0:
                    # a share of the devices gets an instruction beyond the deadband (`change` of them per
                    # second, a different share each time); the others' instruction stays
                    k = rng.choice(n, int(round(change * n * 0.1)), replace=False)
                    outputs["battery_w"][k] += rng.choice([-1.0, 1.0], len(k)) * 4 * (d.deadband_w + 1)
                h.set_instruction(seq, outputs)
                next_seq += 0.1
            h.fill(staging)
            now_ms = time.time_ns() // 1_000_000
            fresh = h.got_ns != last_got
            last_got = h.got_ns.copy()
            if online_at is None:
                # every node online (or, on a machine too loaded for that, SETTLE_S after the start): settle,
                # then measure; the fraction online is reported
                if (staging["fault"] == 0).all() or time.monotonic() - t_start > SETTLE_S:
                    online_at = time.monotonic()
                    t0, m0 = time.monotonic() + 3.0, None
                continue
            if m0 is None and time.monotonic() >= t0:
                ru0 = resource.getrusage(resource.RUSAGE_SELF)
                th0 = _threads_cpu_s()
                m0, t0 = int(h.messages.sum()), time.monotonic()
                ages.clear()
                rtt_ok = h.rtt_ms.copy()
                dcmd0, supp0 = dict(h.dcmd), h.suppressed
                req0 = int(h.requests.sum())
                continue
            if m0 is not None:
                if h.born.any():  # the longest any online device went without a DCMD (its lease must outlast it)
                    gap_max = max(gap_max, float((loop.time() - h.sent_at[h.born]).max()))
                ok = fresh & (h.sampled_ms > 0)
                ages.append(now_ms - h.sampled_ms[ok])
                if time.monotonic() - t0 >= window_s:
                    break
        t1 = time.monotonic()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        th1 = _threads_cpu_s()
        m1 = int(h.messages.sum())
        stop.set()
        await task
        await h.aclose()
        if m0 is None:
            return {"error": "no measurement window"}
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        age = np.concatenate(ages) if ages else np.zeros(0)
        if not age.size:  # nothing fresh in the window (a dropped session): no age, not a crash
            age = np.full(1, np.nan)
        np.save(out_path + ".age.npy", age)
        rtt = h.rtt_ms[h.rtt_ms != rtt_ok] if rtt_ok is not None else h.rtt_ms
        return {"nodes": n, "part": part, "nodes_range": [a, b], "window_s": t1 - t0, "controller_cpu_cores": cpu / (t1 - t0),
                "controller_threads_cpu_cores": {k: (v - th0.get(k, 0.0)) / (t1 - t0) for k, v in th1.items()},
                "messages_per_s": (m1 - m0) / (t1 - t0), "online_after_s": online_at - t_start,
                "age_at_latch_ms": {"p50": float(np.percentile(age, 50)), "p99": float(np.percentile(age, 99)),
                                    "count": int(age.size)},
                "instruction_rtt_ms": {"p50": float(np.percentile(rtt, 50)) if rtt.size else None,
                                       "p99": float(np.percentile(rtt, 99)) if rtt.size else None,
                                       "nodes": int(rtt.size)},
                "dcmd_per_s": float(h.requests.sum()) / (t1 - t_start),
                "dcmd_in_window_per_s": (int(h.requests.sum()) - req0) / (t1 - t0),
                "dcmd_why_per_s": {k: (v - dcmd0[k]) / (t1 - t0) for k, v in h.dcmd.items()},
                "suppressed_per_s": (h.suppressed - supp0) / (t1 - t0),
                "dcmd_policy": "on change beyond deadband_w, at half the lease, on birth",
                "instruction_changes_per_node_s": change, "deadband_w": d.deadband_w,
                "lease_ms": d.lease, "longest_without_dcmd_ms": gap_max * 1e3,
                "gaps": int(h.gaps),
                "rebirths": int(h.rebirths), "faulty_at_end": int((staging["fault"] != 0).sum()),
                "faults_at_end": {Fault(int(c)).name: int((staging["fault"] == c).sum())
                                  for c in np.unique(staging["fault"])},
                "acked_last_dcmd": int((h.status["status/ack_seq"] == h.sent_seq).sum()),
                "controlled": int((h.status["status/mode"] == 1).sum()),
                "refused_total": int(h.status["status/refused"].sum())}

    Path(out_path).write_text(json.dumps(asyncio.run(main())))


def run(n: int, tls: bool = False, window_s: float = WINDOW_S, per_edge: int = NODES_PER_EDGE, replay: bool = False,
        rate_hz: float = 1.0, change: float = 0.0, processes: int = 1) -> dict:
    """One run; `replay`: the publishers are benchmarks/mqtt_replay.py (pre-encoded payloads), not `vbatt fleet`."""
    from vbatt.drivers.mqtt.broker import Broker, User, sparkplug_acl

    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="vbatt-bench-mqtt-"))
    edges = [f"fleet-{e}" for e in range(-(-n // per_edge))]
    broker = Broker(tmp / "broker", [User("controller", PW, sparkplug_acl("host")),
                                     *(User(e, PW, sparkplug_acl("edge")) for e in edges)],
                    plaintext=not tls, max_queued=1_000_000)
    broker.start()
    cfg = tmp / "plant.yaml"
    cfg.write_text(_plant(n, broker.port if tls else broker.plain_port, str(broker.ca) if tls else None, per_edge,
                          1000.0 / rate_hz, processes))
    procs: list[subprocess.Popen] = []
    ctls: list[subprocess.Popen] = []
    try:
        for k in range(len(edges)):
            # niced: the publishers stand for nodes on other machines; here they share two cores with the controller
            cmd = (["-m", "benchmarks.mqtt_replay", str(cfg), "--edge", str(k), "--rate", str(rate_hz),
                    "--stats", str(tmp / f"replay-{k}.json")] if replay
                   else ["-m", "vbatt.cli", "fleet", str(cfg), "--edge", str(k)])
            procs.append(subprocess.Popen(["nice", "-n", "10", sys.executable, *cmd],
                                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        outs = [tmp / f"controller-{k}.json" for k in range(processes)]
        ctls = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_mqtt", "--controller", str(cfg),
                                  "--window", str(window_s), "--out", str(out), "--change", str(change),
                                  "--part", str(k)], cwd=REPO) for k, out in enumerate(outs)]
        pub0 = bro0 = None
        t0 = time.monotonic()
        while any(c.poll() is None for c in ctls):
            time.sleep(0.5)
            if pub0 is None and time.monotonic() - t0 > 10:  # publishers and broker: over the same stretch
                pub0 = sum(_cpu_s(p.pid) for p in procs), time.monotonic()
                bro0 = _cpu_s(broker.proc.pid)
                sent0 = _sent(tmp, len(procs)) if replay else None
            if pub0 is not None:
                pub1, bro1, t1 = sum(_cpu_s(p.pid) for p in procs), _cpu_s(broker.proc.pid), time.monotonic()
        res = _combined([json.loads(out.read_text()) for out in outs], [str(out) + ".age.npy" for out in outs])
        if pub0 is not None:
            res["publishers_cpu_cores"] = (pub1 - pub0[0]) / (t1 - pub0[1])
            res["broker_cpu_cores"] = (bro1 - bro0) / (t1 - pub0[1])
            if sent0 is not None:  # what the publishers sent (offered), over about the same stretch
                sent1 = _sent(tmp, len(procs))
                dt = sent1["t"] - sent0["t"]
                if dt > 0:
                    res["offered"] = {"ddata_per_s": (sent1["ddata"] - sent0["ddata"]) / dt,
                                      "acks_per_s": (sent1["acks"] - sent0["acks"]) / dt,
                                      "skipped_ticks": sent1["skipped_ticks"] - sent0["skipped_ticks"]}
        res["publisher_processes"] = len(procs)
        res["publishers"] = "replay (benchmarks/mqtt_replay.py)" if replay else "vbatt fleet"
        res["rate_hz"] = rate_hz
        res["loadavg_1m_at_start"] = load0
        res["tls"] = tls
        res["loadavg_1m_at_end"] = os.getloadavg()[0]
        res["cores"] = os.cpu_count()
        return res
    finally:
        for p in procs + [c for c in ctls if c.poll() is None]:
            p.terminate()
        for p in procs + ctls:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.stop()


def test_mqtt_1000_nodes_at_1hz(benchmark):
    """pytest-benchmark: 1,000 nodes (one edge node), figures in extra_info."""
    res = benchmark.pedantic(lambda: run(1000, window_s=8.0, per_edge=1000), rounds=1, iterations=1)
    benchmark.group = "mqtt: 1 Hz publishers"
    benchmark.extra_info.update({"n": 1000, **{k: v for k, v in res.items() if not isinstance(v, dict)}})
    assert "error" not in res, res


def _combined(each: list[dict], age_files: list[str]) -> dict:
    """The host processes' figures as one controller's: CPU and rates summed, ages over all, each kept."""
    if len(each) == 1:
        return each[0]
    res = {"host_processes": len(each), "per_process": each}
    if any("error" in r for r in each):
        res["error"] = [r.get("error") for r in each]
        return res
    for k in ("nodes", "controller_cpu_cores", "messages_per_s", "dcmd_per_s", "dcmd_in_window_per_s",
              "suppressed_per_s", "gaps", "rebirths", "faulty_at_end", "acked_last_dcmd", "controlled",
              "refused_total"):
        res[k] = sum(r[k] for r in each)
    res["window_s"] = min(r["window_s"] for r in each)
    res["online_after_s"] = max(r["online_after_s"] for r in each)
    res["longest_without_dcmd_ms"] = max(r["longest_without_dcmd_ms"] for r in each)
    age = np.concatenate([np.load(f) for f in age_files])
    res["age_at_latch_ms"] = {"p50": float(np.percentile(age, 50)), "p99": float(np.percentile(age, 99)),
                              "count": int(age.size)}
    rtt_p = [r["instruction_rtt_ms"] for r in each]
    res["instruction_rtt_ms"] = {"p50_max": max((x["p50"] or 0) for x in rtt_p),
                                 "p99_max": max((x["p99"] or 0) for x in rtt_p), "nodes": sum(x["nodes"] for x in rtt_p)}
    faults: dict[str, int] = {}
    for r in each:
        for f, c in r["faults_at_end"].items():
            faults[f] = faults.get(f, 0) + c
    res["faults_at_end"] = faults
    for k in ("dcmd_policy", "instruction_changes_per_node_s", "deadband_w", "lease_ms"):
        res[k] = each[0][k]
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, nargs="+", default=[10_000])
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--replay", action="store_true", help="publishers replay pre-encoded payloads (mqtt_replay.py)")
    ap.add_argument("--rate", type=float, default=1.0, help="DDATA per node and second")
    ap.add_argument("--per-edge", type=int, default=NODES_PER_EDGE)
    ap.add_argument("--window", type=float, default=WINDOW_S)
    ap.add_argument("--change", type=float, default=0.0,
                    help="share of the devices whose instruction moves beyond the deadband per second")
    ap.add_argument("--processes", type=int, default=1, help="MQTT host processes (drivers.mqtt.processes)")
    ap.add_argument("--part", type=int, default=0, help="(internal) which host process this controller is")
    ap.add_argument("--controller")
    ap.add_argument("--out")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "mqtt_results.json"))
    a = ap.parse_args()
    if a.controller:
        controller(a.controller, a.window, a.out, a.change, a.part)
        return 0
    results = []
    for n in a.nodes:
        r = run(n, tls=a.tls, window_s=a.window, per_edge=a.per_edge, replay=a.replay, rate_hz=a.rate,
                change=a.change, processes=a.processes)
        r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(json.dumps(r, indent=1), flush=True)
        results.append(r)
    # appended to the runs already recorded (end_to_end: `vbatt fleet` publishers; replay: mqtt_replay.py)
    path = Path(a.json)
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("replay" if a.replay else "end_to_end", []).extend(results)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
