"""OPC UA server throughput and latency (run with `make bench` or
`pytest benchmarks/bench_opcua.py --benchmark-enable -s`).

* deepcopy per monitored item: asyncua's stock `set_current_datavalue` against
  vbatt's fast path (`opcua_models/fastpath.py`), per call.
* value updates per second into the address space, and latency from the scan
  publishing a value to a subscribed client receiving it: a simulated scan
  changes every variable of every node and publishes at 2 Hz (the target rate);
  the server runs in this process at its default publish rate; 0, 1 or 3 client
  processes (asyncua, SignAndEncrypt) each subscribe to every node variable.
  Latency = client receive time - SourceTimestamp (the scan's publish time,
  same host clock). Figures go to extra_info and are printed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from asyncua import ua
from asyncua.server.monitored_item_service import MonitoredItemValues

from vbatt.opcua_models import fastpath

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_opcua_support import OPERATOR, fill, make_image, make_state, server_config  # noqa: E402

DURATION_S = 8.0
# A client subscribed to all 240,000 variables of 10,000 nodes does not finish subscribing while the
# server is saturated; at 10,000 nodes each client watches the first 1,000 (a SCADA screen's worth).
WATCH_MAX_NODES = 1000
PUBLISH_HZ = 2.0

CLIENT = r"""
import asyncio, json, sys, time, logging
logging.basicConfig(level=logging.WARNING, format="CLIENT %(name)s %(levelname)s %(message)s")
from datetime import datetime, timezone
from asyncua import Client, ua
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256
endpoint, cert, key, user, pw, n, duration, fields = sys.argv[1:9]
n, duration, fields = int(n), float(duration), fields.split(",")
lat, count = [], 0
class H:
    def datachange_notification(self, node, val, data):
        global count
        count += 1
        st = data.monitored_item.Value.SourceTimestamp
        if st is not None:
            lat.append((datetime.now(timezone.utc) - st).total_seconds() * 1e3)
async def main():
    c = Client(endpoint, timeout=60); c.application_uri = "urn:vbatt:test:client"
    await c.set_security(SecurityPolicyBasic256Sha256, cert, key, mode=ua.MessageSecurityMode.SignAndEncrypt)
    c.set_user(user); c.set_password(pw)
    async with c:
        ns = await c.get_namespace_index("http://vbatt.org/UA/VirtualBattery/")
        sub = await c.create_subscription(100, H())
        nodes = [c.get_node(ua.NodeId(f"rack-{i}.{f}", ns)) for i in range(n) for f in fields]
        for k in range(0, len(nodes), 400):
            await sub.subscribe_data_change(nodes[k:k + 400], queuesize=4)  # requests <= 64 KiB
        print("READY", flush=True)
        await asyncio.sleep(1.0)
        lat.clear(); global count; count = 0
        await asyncio.sleep(duration)
        lat.sort()
        q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None
        print(json.dumps({"items": len(nodes), "received": count, "lat_p50_ms": q(0.5), "lat_p99_ms": q(0.99),
                          "lat_max_ms": lat[-1] if lat else None}), flush=True)
asyncio.run(main())
"""


NODE_CLIENT = r"""
const { OPCUAClient, MessageSecurityMode, SecurityPolicy, AttributeIds, UserTokenType, TimestampsToReturn,
        ClientMonitoredItemGroup } = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
const [endpoint, cert, key, user, pw, n, duration, fields, pki] = process.argv.slice(2);
(async () => {
  const mgr = new OPCUACertificateManager({ rootFolder: pki, automaticallyAcceptUnknownCertificate: true });
  await mgr.initialize();
  const client = OPCUAClient.create({ applicationUri: "urn:vbatt:test:client", applicationName: "vbatt-bench",
    securityMode: MessageSecurityMode.SignAndEncrypt, securityPolicy: SecurityPolicy.Basic256Sha256,
    certificateFile: cert, privateKeyFile: key, clientCertificateManager: mgr, endpointMustExist: false,
    connectionStrategy: { maxRetry: 0 } });
  await client.connect(endpoint);
  const s = await client.createSession({ type: UserTokenType.UserName, userName: user, password: pw });
  const ns = (await s.readNamespaceArray()).indexOf("http://vbatt.org/UA/VirtualBattery/");
  const sub = await s.createSubscription2({ requestedPublishingInterval: 100, requestedMaxKeepAliveCount: 20,
    requestedLifetimeCount: 1000, maxNotificationsPerPublish: 0, publishingEnabled: true });
  let lat = [], count = 0, measuring = false;
  const items = [];
  for (let i = 0; i < +n; i++) for (const f of fields.split(",")) items.push({ nodeId: `ns=${ns};s=rack-${i}.${f}`,
    attributeId: AttributeIds.Value });
  for (let k = 0; k < items.length; k += 400) {
    const g = ClientMonitoredItemGroup.create(sub, items.slice(k, k + 400), { samplingInterval: 100, queueSize: 4 },
      TimestampsToReturn.Both);
    g.on("changed", (item, dv) => { if (!measuring) return; count++;
      if (dv.sourceTimestamp) lat.push(Date.now() - dv.sourceTimestamp.getTime()); });
    await new Promise((r) => g.on("initialized", r));
  }
  console.log("READY");
  await new Promise((r) => setTimeout(r, 1000));
  measuring = true;
  await new Promise((r) => setTimeout(r, +duration * 1000));
  measuring = false;
  lat.sort((a, b) => a - b);
  const q = (p) => lat.length ? lat[Math.min(lat.length - 1, Math.floor(p * lat.length))] : null;
  console.log(JSON.stringify({ items: items.length, received: count, lat_p50_ms: q(0.5), lat_p99_ms: q(0.99),
    lat_max_ms: lat.length ? lat[lat.length - 1] : null, client: "node-opcua" }));
  await s.close(); await client.disconnect(); process.exit(0);
})().catch((e) => { console.log(JSON.stringify({ error: String(e) })); process.exit(1); });
"""
NODE_DIR = Path(__file__).resolve().parents[1] / ".pytest_cache" / "vbatt-node-opcua"


def _dv() -> ua.DataValue:
    return ua.DataValue(ua.Variant(123.456, ua.VariantType.Double), SourceTimestamp=None)


@pytest.mark.parametrize("path", ["stock_deepcopy", "vbatt_fastpath"])
def test_set_current_datavalue_per_monitored_item(benchmark, path):
    was = fastpath.installed()
    (fastpath.install if path == "vbatt_fastpath" else fastpath.uninstall)()
    try:
        mv = MonitoredItemValues()
        dv = _dv()
        benchmark(mv.set_current_datavalue, dv)
        assert mv.get_current_datavalue() == dv
    finally:
        (fastpath.install if was else fastpath.uninstall)()


def test_deepcopy_cost_ratio(benchmark):
    dv = _dv()
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        copy.deepcopy(dv)
    per_copy = (time.perf_counter() - t) / n
    benchmark.extra_info["deepcopy_us_per_item"] = round(per_copy * 1e6, 2)
    print(f"\nasyncua deepcopy of one Double DataValue: {per_copy * 1e6:.1f} µs per monitored item per change")
    benchmark(lambda: None)


async def _scenario(n_nodes: int, n_clients: int, tmp: Path) -> dict:
    from vbatt.opcua_models.model import node_vars
    from vbatt.opcua_models.server import VbattOpcuaServer

    pki = make_state(tmp)
    img, ids = make_image(n_nodes)
    fill(img)
    srv = VbattOpcuaServer(server_config(pki), img, ids, cycle_ms=10)
    t0 = time.perf_counter()
    await srv.start()
    start_s = time.perf_counter() - t0
    fields = [v.name for v in node_vars()]
    # node-opcua decodes notifications several times faster than asyncua: with asyncua clients the
    # clients, not the server, saturate first (see docs/opcua.md)
    use_node = (NODE_DIR / "node_modules" / "node-opcua-client").is_dir()
    if use_node:
        (NODE_DIR / "bench_client.js").write_text(NODE_CLIENT)
    cmd = (["node", str(NODE_DIR / "bench_client.js")] if use_node else [sys.executable, "-c", CLIENT])
    watched = min(n_nodes, WATCH_MAX_NODES)
    procs = [subprocess.Popen([*cmd, srv.endpoint, str(pki.cert), str(pki.key), *OPERATOR,
                               str(watched), str(DURATION_S), ",".join(fields), str(tmp / f"pki{k}")],
                              stdout=subprocess.PIPE, stderr=open(tmp / "client.err", "a"), text=True)
             for k in range(n_clients)]
    stop = False
    busy = [0.0, 0]  # seconds inside update(), values written

    async def scan():
        k = 1.0
        while not stop:
            k += 1.0
            for name, arr in img.node.items():  # every variable changes every publish
                if name in ("online", "trip", "alarm"):  # bits: an alarm storm is not a value update
                    continue
                arr += 1 if arr.dtype.kind != "f" else 0.5
            img.node["soc"][:] = (k % 10) / 10.0
            img.time_ns[0] = time.monotonic_ns()
            img.publish()
            await asyncio.sleep(1.0 / PUBLISH_HZ)

    async def serve():
        period = srv.cfg.publish_ms / 1e3
        while not stop:
            t = time.perf_counter()
            w = await srv.update()
            busy[0] += time.perf_counter() - t
            busy[1] += w
            await asyncio.sleep(max(0.0, period - (time.perf_counter() - t)))

    tasks = [asyncio.create_task(scan()), asyncio.create_task(serve())]
    loop = asyncio.get_running_loop()
    async def next_line(p) -> str:  # node-opcua logs warnings on stdout: skip them
        while True:
            line = await loop.run_in_executor(None, p.stdout.readline)
            if not line or line.startswith(("READY", "{")):
                return line

    for p in procs:  # wait until every client has subscribed
        line = await next_line(p)
        assert line.startswith("READY"), line + (tmp / "client.err").read_text()[-3000:]
    busy[:] = [0.0, 0]
    t_run = time.perf_counter()
    outs = [json.loads(await next_line(p)) for p in procs]
    if not procs:
        await asyncio.sleep(DURATION_S)
    wall = time.perf_counter() - t_run
    stop = True
    await asyncio.gather(*tasks)
    for p in procs:
        p.wait(30)
    await srv.stop()
    img.close()
    variables = n_nodes * len(fields)
    res = {"nodes": n_nodes, "clients": n_clients, "variables": variables, "watched_nodes": watched,
           "start_s": round(start_s, 2),
           "offered_updates_per_s": variables * PUBLISH_HZ,
           "written_updates_per_s": round(busy[1] / wall),
           "capacity_updates_per_s": round(busy[1] / busy[0]) if busy[0] else None,
           "server_busy_fraction": round(busy[0] / wall, 3), "clients_out": outs}
    if outs:
        res["lat_p50_ms"] = max(o["lat_p50_ms"] or 0 for o in outs)
        res["lat_p99_ms"] = max(o["lat_p99_ms"] or 0 for o in outs)
        res["received_per_client_per_s"] = round(min(o["received"] for o in outs) / DURATION_S)
    return res


@pytest.mark.parametrize("n_nodes,n_clients", [(1000, 0), (1000, 1), (1000, 3), (10000, 0), (10000, 1)])
def test_updates_and_latency(benchmark, n_nodes, n_clients):
    with tempfile.TemporaryDirectory() as d:
        res = benchmark.pedantic(lambda: asyncio.run(_scenario(n_nodes, n_clients, Path(d))), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in res.items() if k != "clients_out"})
    print("\n" + json.dumps(res))


SCAN_CONFIG = """
cycle: {{cycle_ms: 10}}
plant: {{main_limit_w: 100000}}
nodes:
  - template:
      count: 1000
      id: "rack-{{i:04d}}"
      demand_w: [200, 400]
      demand_profile: {{kind: sine, amplitude_w: 50, period_s: 10, noise_w: 5}}
      max_discharge_w: 500
      max_charge_w: 300
      capacity_wh: 1000
      link_max_w: 500
opcua:
  enabled: {enabled}
  port: {port}
  state_dir: {state}
"""


def _run_scan(tmp: Path, enabled: bool, pki) -> dict:
    from test_opcua_support import free_port

    port = free_port()
    cfg = tmp / f"plant-{enabled}.yaml"
    cfg.write_text(SCAN_CONFIG.format(enabled=str(enabled).lower(), port=port, state=pki.state))
    stats = tmp / f"stats-{enabled}.json"
    proc = subprocess.Popen([sys.executable, "-m", "vbatt.cli", "run", str(cfg), "--duration", "20", "-q",
                             "--stats-json", str(stats)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = None
    if enabled:  # a client subscribed to every node variable keeps the server busy meanwhile
        from vbatt.opcua_models.model import node_vars

        time.sleep(12)
        use_node = (NODE_DIR / "node_modules" / "node-opcua-client").is_dir()
        if use_node:
            (NODE_DIR / "bench_client.js").write_text(NODE_CLIENT.replace("rack-${i}", "rack-${String(i).padStart(4, '0')}"))
        cmd = ["node", str(NODE_DIR / "bench_client.js")] if use_node else [sys.executable, "-c", CLIENT]
        client = subprocess.Popen([*cmd, f"opc.tcp://127.0.0.1:{port}/", str(pki.cert), str(pki.key), *OPERATOR,
                                   "1000", "5", ",".join(v.name for v in node_vars()), str(tmp / "pki")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.wait(120)
    if client:
        client.kill()
        client.wait()
    return json.loads(stats.read_text())


def test_scan_wake_latency_with_and_without_the_opcua_server(benchmark):
    """Same 1,000-node run, OPC UA off vs on with a client subscribed to every variable."""
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pki = make_state(tmp)
        res = {}

        def both():
            for enabled in (False, True):
                s = _run_scan(tmp, enabled, pki)
                res["opcua_on" if enabled else "opcua_off"] = {
                    "wake_p50_us": s["wake_us"]["run"]["p50"], "wake_p99_us": s["wake_us"]["run"]["p99"],
                    "wake_max_us": s["wake_us"]["run"]["max"], "overruns": s["overruns"], "cycles": s["cycles"]}
        benchmark.pedantic(both, rounds=1, iterations=1)
    benchmark.extra_info.update(res)
    print("\n" + json.dumps(res))
