// Two sessions on one secure channel with node-opcua (run by tests/test_opcua_sessions.py).
// One OPCUAClient = one secure channel; createSession() twice opens two sessions on it.
// Prints one JSON line with what each step returned; the test asserts on it.
const { OPCUAClient, MessageSecurityMode, SecurityPolicy, AttributeIds, DataType, UserTokenType,
        TimestampsToReturn } = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");
const [endpoint, certFile, keyFile, viewUser, viewPass, opUser, opPass, nsUri, pkiDir] = process.argv.slice(2);
const WAIT_MS = 30000; // generous: the machine may be loaded

const statusOf = (e) => ((String(e && e.message || e).match(/Bad[A-Za-z]+/) || [String(e)])[0]);
const attempt = async (f) => { try { return await f(); } catch (e) { return statusOf(e); } };

(async () => {
  const mgr = new OPCUACertificateManager({ rootFolder: pkiDir, automaticallyAcceptUnknownCertificate: false });
  await mgr.initialize();
  const client = OPCUAClient.create({
    applicationName: "vbatt-node-opcua-sessions", applicationUri: "urn:vbatt:test:client",
    securityMode: MessageSecurityMode.SignAndEncrypt, securityPolicy: SecurityPolicy.Basic256Sha256,
    certificateFile: certFile, privateKeyFile: keyFile, clientCertificateManager: mgr,
    endpointMustExist: false, requestedSessionTimeout: 120000,
    connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
  });
  let reconnects = 0;
  client.on("start_reconnection", () => { reconnects++; });
  await client.connect(endpoint);
  const channel = client._secureChannel; // one OPCUAClient, one secure channel: both sessions use it
  const login = (userName, password) => client.createSession({ type: UserTokenType.UserName, userName, password });
  let viewer = await login(viewUser, viewPass);
  let operator = await login(opUser, opPass);
  const ns = (await operator.readNamespaceArray()).indexOf(nsUri);
  const id = (s) => `ns=${ns};s=${s}`;
  const read = async (s, name) => (await s.read({ nodeId: id(name), attributeId: AttributeIds.Value }));
  const value = async (s, name) => (await read(s, name)).value.value;
  const readStatus = async (s, name) => attempt(async () => (await read(s, name)).statusCode.name);
  const call = (s, method, args) => attempt(async () => (await s.call({ objectId: id("VirtualBattery"),
      methodId: id(`VirtualBattery.${method}`), inputArguments: args })).statusCode.name);
  const setLimit = (s, w) => call(s, "SetMainSupplyLimit", [{ dataType: DataType.Double, value: w }]);
  const setPriority = (s, node, p) => call(s, "SetPriority",
      [{ dataType: DataType.String, value: node }, { dataType: DataType.Int64, value: p }]);
  const writeLimit = (s, w) => attempt(async () => (await s.write({ nodeId: id("VirtualBattery.main_limit_w"),
      attributeId: AttributeIds.Value, value: { value: { dataType: DataType.Double, value: w } } })).name);
  // the scan applies a command between two cycles and publishes it: poll the served value
  const until = async (s, name, want) => {
    const t = Date.now() + WAIT_MS;
    let v;
    while (Date.now() < t) {
      v = await value(s, name);
      if (Array.isArray(v)) v = v[0] * 2 ** 32 + v[1]; // node-opcua's Int64: [high, low]
      if (Number(v) === want) return true;
      await new Promise(r => setTimeout(r, 50));
    }
    return false;
  };
  const watch = async (s) => {
    const sub = await s.createSubscription2({ requestedPublishingInterval: 100, requestedMaxKeepAliveCount: 10,
        requestedLifetimeCount: 1000, publishingEnabled: true });
    const item = await sub.monitor({ nodeId: id("VirtualBattery.Scan.cycles"), attributeId: AttributeIds.Value },
        { samplingInterval: 100, queueSize: 10 }, TimestampsToReturn.Both);
    return item;
  };
  // resolves true on the next two value changes the subscription delivers, false after WAIT_MS
  const delivers = (item) => new Promise((resolve) => {
    let n = 0;
    const timer = setTimeout(() => { item.removeListener("changed", on); resolve(false); }, WAIT_MS);
    const on = () => { if (++n >= 2) { clearTimeout(timer); item.removeListener("changed", on); resolve(true); } };
    item.on("changed", on);
  });

  const out = { distinctSessions: viewer.sessionId.toString() !== operator.sessionId.toString() };
  out.limit0 = await until(viewer, "VirtualBattery.main_limit_w", 500.0); // the first published image
  out.opCall = await setLimit(operator, 4321.0);
  out.opCallApplied = await until(operator, "VirtualBattery.main_limit_w", 4321.0);
  out.viewerCall = await setLimit(viewer, 2345.0);
  out.viewerWrite = await writeLimit(viewer, 2346.0);
  out.viewerSetPriority = await setPriority(viewer, "a", 9);
  // the command ring is first in, first out: once the operator's later command is applied, anything
  // the viewer's requests had pushed would have been applied before it
  out.opSetPriority = await setPriority(operator, "a", 7);
  out.barrier = await until(operator, "a.priority", 7);
  out.limitAfterViewer = await value(viewer, "VirtualBattery.main_limit_w");
  out.viewerSoc = await readStatus(viewer, "VirtualBattery.soc");

  // closing the viewer session leaves the operator session working
  const opItem = await watch(operator);
  const viewerItem = await watch(viewer);
  out.bothDeliver = (await Promise.all([delivers(opItem), delivers(viewerItem)])).every(Boolean);
  await viewer.close();
  out.opReadAfterViewerClosed = await readStatus(operator, "VirtualBattery.soc");
  out.opCallAfterViewerClosed = await setLimit(operator, 4400.0);
  out.opCallAfterViewerClosedApplied = await until(operator, "VirtualBattery.main_limit_w", 4400.0);
  out.opDeliversAfterViewerClosed = await delivers(opItem);

  // and the other way round
  viewer = await login(viewUser, viewPass);
  const viewerItem2 = await watch(viewer);
  await operator.close();
  out.viewerReadAfterOpClosed = await readStatus(viewer, "VirtualBattery.soc");
  out.viewerDeliversAfterOpClosed = await delivers(viewerItem2);
  out.viewerCallAfterOpClosed = await setLimit(viewer, 2345.0);
  out.limitEnd = await value(viewer, "VirtualBattery.main_limit_w");
  out.oneChannel = client._secureChannel === channel && reconnects === 0;
  out.channelId = channel.channelId;
  console.log(JSON.stringify(out));
  await viewer.close();
  await client.disconnect();
  process.exit(0);
})().catch((e) => { console.log(JSON.stringify({ error: String(e && e.stack || e) })); process.exit(1); });
