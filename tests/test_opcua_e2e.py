"""End to end: `vbatt run` with the OPC UA server, real clients over SignAndEncrypt.

One client is asyncua; the other is node-opcua (an independent implementation,
installed with npm into .pytest_cache on first use; skipped with the reason when
node/npm or the registry is unavailable).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asyncua import ua

from vbatt.opcua_models.security import TrustList, cert_paths

from test_opcua_support import Pki, connected, free_port, nid, wait_for
from vbatt.opcua_models.security import make_certificate

REPO = Path(__file__).resolve().parents[1]
NODE_OPCUA = "node-opcua-client@2.186.4"
NODE_DIR = REPO / ".pytest_cache" / "vbatt-node-opcua"

CONFIG = """
cycle: {{cycle_ms: 20, realtime: false, watchdog_overruns: 1000000}}  # RUN on a loaded machine too: OPC UA is under test
plant: {{main_limit_w: 500}}
nodes:
  - {{id: a, demand_w: 300, capacity_wh: 1000, max_discharge_w: 400, max_charge_w: 200, soc: 0.8, link_max_w: 400,
      demand_profile: {{kind: sine, amplitude_w: 50, period_s: 4}}}}
  - {{id: b, demand_w: 100, capacity_wh: 500, max_discharge_w: 200, max_charge_w: 100, soc: 0.4, link_max_w: 200}}
opcua:
  enabled: true
  port: {port}
  state_dir: {state}
  history: {{sample_ms: 100, flush_s: 0.5}}
"""

NODE_SCRIPT = r"""
const { OPCUAClient, MessageSecurityMode, SecurityPolicy, AttributeIds, DataType, UserTokenType,
        TimestampsToReturn } = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
const [endpoint, certFile, keyFile, user, password, nsUri, pkiDir] = process.argv.slice(2);
(async () => {
  const mgr = new OPCUACertificateManager({ rootFolder: pkiDir, automaticallyAcceptUnknownCertificate: false });
  await mgr.initialize();
  const client = OPCUAClient.create({
    applicationName: "vbatt-node-opcua-test", applicationUri: "urn:vbatt:test:client",
    securityMode: MessageSecurityMode.SignAndEncrypt, securityPolicy: SecurityPolicy.Basic256Sha256,
    certificateFile: certFile, privateKeyFile: keyFile, clientCertificateManager: mgr,
    endpointMustExist: false, connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
  });
  await client.connect(endpoint);
  const session = await client.createSession({ type: UserTokenType.UserName, userName: user, password });
  const ns = (await session.readNamespaceArray()).indexOf(nsUri);
  const id = (s) => `ns=${ns};s=${s}`;
  const soc = (await session.read({ nodeId: id("VirtualBattery.soc"), attributeId: AttributeIds.Value })).value.value;
  const browsed = (await session.browse(id("VirtualBattery.Nodes"))).references.map(r => r.browseName.name);
  const call = async (v) => (await session.call({ objectId: id("VirtualBattery"),
      methodId: id("VirtualBattery.SetMainSupplyLimit"),
      inputArguments: [{ dataType: DataType.Double, value: v }] })).statusCode.name;
  const okCall = await call(4321.0);
  const nanCall = await call(NaN);
  const badWrite = (await session.write({ nodeId: id("VirtualBattery.main_limit_w"), attributeId: AttributeIds.Value,
      value: { value: { dataType: DataType.Double, value: -1.0 } } })).name;
  const sub = await session.createSubscription2({ requestedPublishingInterval: 100, requestedMaxKeepAliveCount: 10,
      requestedLifetimeCount: 100, publishingEnabled: true });
  const item = await sub.monitor({ nodeId: id("VirtualBattery.Scan.cycles"), attributeId: AttributeIds.Value },
      { samplingInterval: 100, queueSize: 10 }, TimestampsToReturn.Both);
  let changes = 0;
  item.on("changed", () => { changes++; });
  await new Promise(r => setTimeout(r, 1500));
  const limit = (await session.read({ nodeId: id("VirtualBattery.main_limit_w"), attributeId: AttributeIds.Value })).value.value;
  console.log(JSON.stringify({ soc, browsed, okCall, nanCall, badWrite, changes, limit }));
  await sub.terminate();
  await session.close();
  await client.disconnect();
  process.exit(0);
})().catch((e) => { console.log(JSON.stringify({ error: String(e) })); process.exit(1); });
"""


@pytest.fixture(scope="session")
def node_opcua() -> Path:
    """node-opcua-client in a cache dir under the repo (ignored by git); skip with the reason when impossible."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node/npm not installed: the independent node-opcua client test needs them")
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    # one install at a time: the parallel workers (make test) share this directory
    with open(NODE_DIR / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (NODE_DIR / "node_modules" / "node-opcua-client").is_dir():
            (NODE_DIR / "package.json").write_text('{"name": "vbatt-opcua-interop", "private": true}\n')
            try:
                r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error", NODE_OPCUA],
                                   cwd=NODE_DIR, capture_output=True, text=True, timeout=240)
            except subprocess.TimeoutExpired:
                pytest.skip("npm install node-opcua-client took longer than 240 s")
            if r.returncode != 0:
                pytest.skip(f"npm install {NODE_OPCUA} failed (offline?): {r.stderr.strip()[-300:]}")
    return NODE_DIR


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if proc.poll() is not None:
            raise AssertionError(f"vbatt run exited early ({proc.returncode})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"OPC UA server not listening on {port} after {timeout} s")


@pytest.mark.slow
def test_vbatt_run_serves_opcua_to_asyncua_and_node_opcua(tmp_path, node_opcua):
    port = free_port()
    state = tmp_path / "state"
    der, pem = make_certificate("e2e client", "urn:vbatt:test:client", server=False)
    (tmp_path / "client.der").write_bytes(der)
    (tmp_path / "client.pem").write_bytes(pem)
    TrustList(state).add(der, "e2e-client")
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(CONFIG.format(port=port, state=state))
    err = open(tmp_path / "stderr.txt", "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vbatt.cli", "run", str(cfg), "-q"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    try:
        _wait_port(port, proc, 40)
        text = (tmp_path / "stderr.txt").read_text()
        m = re.search(r"created user 'operator' \(role operator\) with password: (\S+)", text)
        assert m, text
        password = m.group(1)
        assert password not in (state / "users.json").read_text()  # shown once, stored as a hash only
        assert cert_paths(state)[0].exists()
        pki = Pki(state, tmp_path / "client.der", tmp_path / "client.pem", tmp_path / "client.der",
                  tmp_path / "client.pem")

        async def asyncua_client():
            async with connected(f"opc.tcp://127.0.0.1:{port}/", pki, ("operator", password)) as c:
                cycles = c.get_node(nid(c, "VirtualBattery.Scan.cycles"))
                c0 = await cycles.read_value()
                assert await wait_for(lambda: True, 0.5)
                await asyncio.sleep(0.5)
                assert await cycles.read_value() > c0  # the scan runs and the server follows it
                assert await c.get_node(nid(c, "VirtualBattery.Scan.mode")).read_value() == "RUN"
                assert await c.get_node(nid(c, "a.demand_w")).read_value() > 0
                vb = c.get_node(nid(c, "VirtualBattery"))
                await vb.call_method(nid(c, "VirtualBattery.SetMainSupplyLimit"), ua.Variant(1234.0, ua.VariantType.Double))
                limit = c.get_node(nid(c, "VirtualBattery.main_limit_w"))
                t = time.monotonic() + 5
                while await limit.read_value() != 1234.0 and time.monotonic() < t:
                    await asyncio.sleep(0.1)
                assert await limit.read_value() == 1234.0  # applied by the real scan, published, served

                # online change through OPC UA: the same protocol as `vbatt reload`
                changed = tmp_path / "changed.yaml"
                changed.write_text(cfg.read_text().replace("main_limit_w: 500", "main_limit_w: 777"))
                await vb.call_method(nid(c, "VirtualBattery.Reload"), ua.Variant(str(changed), ua.VariantType.String))
                t = time.monotonic() + 5
                while await limit.read_value() != 777.0 and time.monotonic() < t:
                    await asyncio.sleep(0.1)
                assert await limit.read_value() == 777.0
                grown = tmp_path / "grown.yaml"
                grown.write_text(cfg.read_text().replace("opcua:", "  - {id: c, demand_w: 5}\nopcua:"))
                with pytest.raises(ua.UaStatusCodeError) as refused:
                    await vb.call_method(nid(c, "VirtualBattery.Reload"), ua.Variant(str(grown), ua.VariantType.String))
                assert refused.value.code == ua.StatusCodes.BadInvalidState
                broken = tmp_path / "broken.yaml"
                broken.write_text(cfg.read_text().replace("soc: 0.4", "soc: 4"))
                with pytest.raises(ua.UaStatusCodeError) as invalid:
                    await vb.call_method(nid(c, "VirtualBattery.Reload"), ua.Variant(str(broken), ua.VariantType.String))
                assert invalid.value.code == ua.StatusCodes.BadConfigurationError
                assert await limit.read_value() == 777.0  # the refused changes changed nothing

        asyncio.run(asyncio.wait_for(asyncua_client(), 30))

        script = node_opcua / "vbatt_interop.js"
        script.write_text(NODE_SCRIPT)
        pkidir = tmp_path / "node-pki"
        (pkidir / "trusted" / "certs").mkdir(parents=True)
        shutil.copy(cert_paths(state)[0], pkidir / "trusted" / "certs" / "vbatt-server.der")
        r = subprocess.run(["node", str(script), f"opc.tcp://127.0.0.1:{port}/", str(tmp_path / "client.der"),
                            str(tmp_path / "client.pem"), "operator", password,
                            "http://vbatt.org/UA/VirtualBattery/", str(pkidir)],
                           cwd=node_opcua, capture_output=True, text=True, timeout=60)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        assert lines, (r.stdout[-2000:], r.stderr[-2000:])
        out = json.loads(lines[-1])
        assert "error" not in out, out
        assert out["browsed"] == ["a", "b"]
        assert 0.0 < out["soc"] <= 100.0
        assert out["okCall"] == "Good"
        assert out["nanCall"] == "BadOutOfRange"
        assert out["badWrite"] == "BadOutOfRange"
        assert out["changes"] >= 3
        assert out["limit"] == 4321.0
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        err.close()
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert (state / "history.sqlite").exists()
