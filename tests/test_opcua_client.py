"""The OPC UA client driver against a real, plain asyncua server in its own process.

The server is `examples/opcua_demo_server.py` (a stand-in third-party device,
not vbatt's server), steered through its stdin. The driver runs on a real
shared-memory image, once directly through an `IoContext`, once inside
`vbatt run`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, wait_until

from vbatt.config.plant import load_config
from vbatt.drivers.base import IoContext
from vbatt.drivers.faults import Fault
from vbatt.drivers.opcua.driver import OpcuaClientDriver
from vbatt.kernel.image import ImageSpec, ProcessImage
from vbatt.kernel.ports import free_port

pytestmark = pytest.mark.timeout(90)

DEMO = REPO / "examples" / "opcua_demo_server.py"
WAIT_S = 10.0  # generous bound for anything that should take well under a second


class DemoServer:
    """The demo device in a subprocess; `set`/`status`/`get` go through its stdin."""

    def __init__(self, port: int, *args: str, env: dict | None = None):
        self.port, self.args, self.env = port, args, env
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(DEMO), "--port", str(self.port), *self.args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env={**os.environ, **(self.env or {})})
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        first = self._line()
        assert first.startswith("READY"), first

    @staticmethod
    def _pump(stream, lines) -> None:
        for line in stream:
            lines.put(line)

    def _line(self) -> str:
        try:
            return self.lines.get(timeout=WAIT_S * 2)
        except queue.Empty:
            raise AssertionError("demo server did not answer") from None

    def _cmd(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self._line())
        assert "error" not in reply, reply
        return reply

    def set(self, name: str, value, type: str | None = None) -> None:
        self._cmd(set=name, value=value, **({"type": type} if type else {}))

    def status(self, name: str, code: str) -> None:
        self._cmd(status=name, code=code)

    def get(self, name: str):
        return self._cmd(get=name)["value"]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()  # a device that vanishes, not one that says goodbye
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def server():
    """A device of the test's own, for tests that stop it."""
    srv = DemoServer(free_port())
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def device():
    """One device shared by the module (starting one takes seconds); each test takes racks of its own."""
    srv = DemoServer(free_port(), "--racks", "32")
    yield srv
    srv.stop()


_RACKS = itertools.count(1)


@pytest.fixture
def rack(device) -> str:
    return f"rack-{next(_RACKS)}"


@pytest.fixture
def rack2(device) -> str:
    return f"rack-{next(_RACKS)}"


def node_yaml(nid: str, port: int, rack: str = "rack-1", security: str = "none", extra: str = "") -> str:
    ns = "nsu=urn:vbatt:demo-device;s="  # by namespace URI: the index is the server's business
    return f"""
  - id: {nid}
    driver: opcua
    endpoint: opc.tcp://127.0.0.1:{port}/demo
    security: {security}
    priority: 1
{extra}    inputs:
      soc: {{node_id: "{ns}{rack}.SoC", scale: 0.01}}
      voltage_v: "ns=2;s={rack}.Voltage"
      current_a: "ns=2;s={rack}.Current"
      temperature_c: "ns=2;s={rack}.Temperature"
      demand_w: "ns=2;s={rack}.Load"
      max_discharge_w: {{node_id: "ns=2;s={rack}.MaxDischargeKW", scale: 1000}}
      max_charge_w: {{node_id: "ns=2;s={rack}.MaxChargeKW", scale: 1000}}
      capacity_wh: "ns=2;s={rack}.CapacityWh"
    constants:
      link_max_w: 1200
    outputs:
      battery_w: "ns=2;s={rack}.BatterySetpointW"
      served_w: "ns=2;s={rack}.ServedW"
      shed_w: "ns=2;s={rack}.ShedW"
"""


def plant_yaml(*nodes: str, drivers: str = "") -> str:
    return (f"plant: {{stale_ms: 600, main_limit_w: 0}}\ncycle: {{cycle_ms: 10}}\n"
            f"drivers:\n  opcua: {{publishing_interval_ms: 50, reconnect_min_ms: 100, reconnect_max_ms: 400, "
            f"connect_timeout_ms: 3000, request_timeout_ms: 1000{drivers}}}\n"
            f"nodes:{''.join(nodes)}")


class Harness:
    """The driver on a real image, in a thread of this process; the test plays the scan."""

    def __init__(self, path: Path):
        cfg, fleet = load_config(path)
        n = len(fleet)
        self.ids = list(fleet.ids)
        self.img = ProcessImage.create(ImageSpec(n_nodes=n, partitions=((0, n),), node_ids=tuple(fleet.ids)))
        self.io = IoContext(self.img, 0)
        self.driver = OpcuaClientDriver(cfg, fleet, 0, n)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()
        self.thread.start()

    def _run(self) -> None:
        try:
            self.driver.run(self.io)
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            self.error = exc

    def inputs(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.img.inputs[0].seq == 0:
            return out
        self.img.inputs[0].read(lambda arrays: out.update({k: v.copy() for k, v in arrays.items()}))
        return out

    def wait(self, pred, what: str, timeout: float = WAIT_S) -> dict[str, np.ndarray]:
        deadline = time.monotonic() + timeout
        inp: dict = {}
        while time.monotonic() < deadline:
            assert self.error is None, self.error
            inp = self.inputs()
            if inp and pred(inp):
                return inp
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; last inputs: "
                             f"{ {k: v.tolist() for k, v in inp.items()} }")

    def command(self, cycle: int, **outputs: float) -> None:
        """Publish an instruction as the scan would."""
        for name, value in outputs.items():
            self.img.node[name][:] = value
        self.img.cycle[0] = cycle
        self.img.publish()

    def stop(self) -> float:
        t = time.monotonic()
        self.io.request_stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "driver did not return after stop"
        self.img.close()
        assert self.error is None, self.error
        return time.monotonic() - t


@pytest.fixture
def harness(tmp_path):
    made: list[Harness] = []

    def make(text: str) -> Harness:
        p = tmp_path / "plant.yaml"
        p.write_text(text)
        h = Harness(p)
        made.append(h)
        return h

    yield make
    for h in made:
        if h.thread.is_alive():
            h.stop()




# -- inputs -------------------------------------------------------------------------
def test_inputs_arrive_scaled_and_stay_fresh_without_changes(device, rack, rack2, harness):
    h = harness(plant_yaml(node_yaml("r1", device.port, rack=rack)))
    inp = h.wait(lambda d: d["fault"][0] == 0 and d["updated_ns"][0] > 0, "node r1 healthy")
    assert inp["soc"][0] == pytest.approx(0.80)  # 80 % on the server
    assert inp["voltage_v"][0] == pytest.approx(51.2)
    assert inp["temperature_c"][0] == pytest.approx(27.0)  # a Float variable
    assert inp["capacity_wh"][0] == 2000.0  # a UInt32 variable
    assert inp["max_discharge_w"][0] == pytest.approx(1500.0)  # kW on the server
    assert inp["max_charge_w"][0] == pytest.approx(800.0)
    assert inp["demand_w"][0] == pytest.approx(400.0)
    assert inp["link_max_w"][0] == 1200.0  # a constant
    assert inp["io_requests"][0] > 0 and inp["io_errors"][0] == 0
    # nothing changes on the server, yet keep-alives keep the data fresh (3 per stale_ms)
    first = int(inp["updated_ns"][0])
    later = h.wait(lambda d: d["updated_ns"][0] > first + 300_000_000, "a keep-alive restamp")
    assert later["fault"][0] == 0


def test_a_change_on_the_server_arrives(device, rack, rack2, harness):
    h = harness(plant_yaml(node_yaml("r1", device.port, rack=rack)))
    h.wait(lambda d: d["fault"][0] == 0, "node r1 healthy")
    device.set(f"{rack}.SoC", 55.5)
    device.set(f"{rack}.Load", 1234.0)
    inp = h.wait(lambda d: abs(d["soc"][0] - 0.555) < 1e-9, "soc 55.5 %")
    inp = h.wait(lambda d: d["demand_w"][0] == 1234.0, "demand 1234 W")
    assert inp["fault"][0] == 0


def test_scale_and_offset_apply_both_ways(device, rack, harness):
    text = (node_yaml("r1", device.port, rack=rack)
            .replace(f'"ns=2;s={rack}.Temperature"', f'{{node_id: "ns=2;s={rack}.Temperature", offset: -273.15}}')
            .replace(f'"ns=2;s={rack}.BatterySetpointW"',
                     f'{{node_id: "ns=2;s={rack}.BatterySetpointW", scale: 1000, offset: 10}}'))
    device.set(f"{rack}.Temperature", 300.0)  # the device reports kelvin
    h = harness(plant_yaml(text))
    inp = h.wait(lambda d: d["fault"][0] == 0, "node r1 healthy")
    assert inp["temperature_c"][0] == pytest.approx(26.85, abs=1e-4)  # a Float variable
    h.command(1, battery_w=2510.0)  # (2510 W - 10) / 1000 = 2.5 kW on the device
    wait_until(lambda: device.get(f"{rack}.BatterySetpointW") == pytest.approx(2.5), "kW written")


# -- outputs ------------------------------------------------------------------------
def test_outputs_are_written_back_in_the_server_types(device, rack, rack2, harness):
    h = harness(plant_yaml(node_yaml("r1", device.port, rack=rack)))
    h.wait(lambda d: d["fault"][0] == 0, "node r1 healthy")
    h.command(1, battery_w=-321.5, served_w=100.25, shed_w=42.4)
    wait_until(lambda: device.get(f"{rack}.BatterySetpointW") == -321.5, "battery_w written")
    assert device.get(f"{rack}.ServedW") == pytest.approx(100.25)  # Float
    assert device.get(f"{rack}.ShedW") == 42  # Int32: rounded
    h.command(2, battery_w=250.0, served_w=100.25, shed_w=42.4)
    wait_until(lambda: device.get(f"{rack}.BatterySetpointW") == 250.0, "the next instruction")
    inp = h.inputs()
    assert inp["fault"][0] == 0 and inp["io_latency_ms"][0] > 0


def test_outputs_wait_for_a_new_cycle(device, rack, rack2, harness):
    h = harness(plant_yaml(node_yaml("r1", device.port, rack=rack)))
    h.wait(lambda d: d["fault"][0] == 0, "node r1 healthy")
    h.command(5, battery_w=10.0)
    wait_until(lambda: device.get(f"{rack}.BatterySetpointW") == 10.0, "cycle 5 written")
    device.set(f"{rack}.BatterySetpointW", 777.0)  # someone else writes; our cycle is unchanged
    h.command(5, battery_w=11.0)  # same cycle number: not a new instruction
    time.sleep(0.5)
    assert device.get(f"{rack}.BatterySetpointW") == 777.0
    h.command(6, battery_w=11.0)
    wait_until(lambda: device.get(f"{rack}.BatterySetpointW") == 11.0, "cycle 6 written")


def test_an_output_that_is_not_a_number_faults_the_node_and_the_rest_is_written(device, rack, harness):
    text = node_yaml("r1", device.port, rack=rack).replace(f"{rack}.BatterySetpointW", f"{rack}.Model")
    h = harness(plant_yaml(text))
    h.wait(lambda d: d["fault"][0] == Fault.BAD_VALUE, "BAD_VALUE for the String output")
    h.command(1, battery_w=5.0, served_w=66.0)
    wait_until(lambda: device.get(f"{rack}.ServedW") == 66.0, "served_w written")
    assert device.get(f"{rack}.Model") == "DemoRack 48V"
    assert h.inputs()["fault"][0] == Fault.BAD_VALUE and h.thread.is_alive()


def test_a_refused_write_is_an_exception_reply(device, rack, harness):
    text = node_yaml("r1", device.port, rack=rack).replace(f"{rack}.BatterySetpointW", f"{rack}.LinkMaxW")
    h = harness(plant_yaml(text))  # LinkMaxW is read-only on the device
    h.wait(lambda d: d["fault"][0] == 0, "node r1 healthy")
    h.command(1, battery_w=5.0)
    inp = h.wait(lambda d: d["fault"][0] == Fault.EXCEPTION_REPLY, "EXCEPTION_REPLY")
    assert inp["io_errors"][0] > 0
    assert device.get(f"{rack}.LinkMaxW") == 1500.0


def test_the_last_instruction_is_sent_on_stop(device, rack, rack2, harness):
    h = harness(plant_yaml(node_yaml("r1", device.port, rack=rack)))
    h.wait(lambda d: d["fault"][0] == 0, "node r1 healthy")
    h.command(1, battery_w=300.0)
    wait_until(lambda: device.get(f"{rack}.BatterySetpointW") == 300.0, "cycle 1 written")
    h.command(2, battery_w=0.0)  # the safe state, published right before the stop
    h.io.request_stop()
    h.thread.join(15)
    assert not h.thread.is_alive()
    assert device.get(f"{rack}.BatterySetpointW") == 0.0


# -- bad values -----------------------------------------------------------------------
@pytest.mark.parametrize("name, action", [
    ("Voltage", lambda s, r: s.status(f"{r}.Voltage", "BadSensorFailure")),
    ("Voltage", lambda s, r: s.set(f"{r}.Voltage", "nan")),
    ("Voltage", lambda s, r: s.set(f"{r}.Voltage", "inf")),
    ("SoC", lambda s, r: s.set(f"{r}.SoC", 180.0)),  # 1.8 after scaling: outside 0..1
], ids=["bad-status", "nan", "inf", "out-of-range"])
def test_a_bad_value_faults_only_its_node_and_heals(device, rack, rack2, harness, name, action):
    h = harness(plant_yaml(node_yaml("r1", device.port, rack=rack), node_yaml("r2", device.port, rack=rack2)))
    h.wait(lambda d: (d["fault"] == 0).all(), "both nodes healthy")
    voltage = h.inputs()["voltage_v"][0]
    action(device, rack)
    inp = h.wait(lambda d: d["fault"][0] == Fault.BAD_VALUE, "BAD_VALUE on r1")
    assert inp["voltage_v"][0] == voltage  # the refused value never reaches the image
    assert math.isfinite(inp["soc"][0]) and inp["soc"][0] <= 1.0
    assert inp["fault"][1] == 0 and inp["io_errors"][0] > 0
    stamped = int(inp["updated_ns"][0])
    time.sleep(0.4)  # a faulted node is not stamped fresh
    assert int(h.inputs()["updated_ns"][0]) == stamped
    device.set(f"{rack}.{name}", 50.0)
    h.wait(lambda d: d["fault"][0] == 0, "r1 healthy again")
    assert h.thread.is_alive()


def test_a_value_of_the_wrong_type_is_bad_value(device, rack, rack2, harness):
    wrong = node_yaml("r2", device.port, rack=rack2).replace(f"{rack2}.Voltage", f"{rack2}.Model")  # a String
    h = harness(plant_yaml(node_yaml("r1", device.port, rack=rack), wrong))
    inp = h.wait(lambda d: d["fault"][0] == 0 and d["fault"][1] == Fault.BAD_VALUE, "r1 ok, r2 BAD_VALUE")
    assert inp["voltage_v"][1] == 0.0 and inp["updated_ns"][1] == 0


def test_an_unknown_node_id_faults_that_node_only(device, rack, rack2, harness):
    bad = node_yaml("r2", device.port, rack=rack2).replace(f"{rack2}.Voltage", f"{rack2}.NoSuchVariable")
    h = harness(plant_yaml(node_yaml("r1", device.port, rack=rack), bad))
    inp = h.wait(lambda d: d["fault"][0] == 0 and d["fault"][1] == Fault.BAD_VALUE, "r1 ok, r2 BAD_VALUE")
    assert inp["soc"][1] == pytest.approx(0.8)  # its other variables still arrive


# -- connection loss ------------------------------------------------------------------
def test_server_down_faults_connection_and_reconnects(server, harness):
    h = harness(plant_yaml(node_yaml("r1", server.port)))
    h.wait(lambda d: d["fault"][0] == 0, "node r1 healthy")
    server.stop()
    inp = h.wait(lambda d: d["fault"][0] in (Fault.CONNECTION, Fault.TIMEOUT), "fault after server loss")
    h.wait(lambda d: d["fault"][0] == Fault.CONNECTION, "CONNECTION while the port is closed")
    stamped = int(inp["updated_ns"][0])
    server.start()  # same port, fresh process: values back at their defaults
    server.set("rack-1.SoC", 42.0)
    inp = h.wait(lambda d: d["fault"][0] == 0 and abs(d["soc"][0] - 0.42) < 1e-9, "reconnected")
    assert inp["updated_ns"][0] > stamped
    # a new session gets the instruction again
    h.command(3, battery_w=123.0)
    wait_until(lambda: server.get("rack-1.BatterySetpointW") == 123.0, "write after reconnect")


def test_publishes_at_once_and_a_dead_server_does_not_delay_a_live_one(device, rack, rack2, harness):
    dead = free_port()  # nobody listens
    hole = socket.socket()  # accepts TCP, never answers: the worst kind of server
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    try:
        h = harness(plant_yaml(node_yaml("gone", dead), node_yaml("mute", hole.getsockname()[1]),
                               node_yaml("r1", device.port, rack=rack)))
        first = h.wait(lambda d: True, "the first publish", timeout=2.0)
        assert set(first["fault"].tolist()) <= {Fault.NO_DATA, Fault.CONNECTION, Fault.NONE}
        inp = h.wait(lambda d: d["fault"][2] == 0, "the live server's node healthy", timeout=3.0)
        assert inp["soc"][2] == pytest.approx(0.8)
        h.wait(lambda d: d["fault"][0] == Fault.CONNECTION, "CONNECTION for the closed port")
        h.wait(lambda d: d["fault"][1] == Fault.TIMEOUT, "TIMEOUT for the mute server")
        assert h.stop() < 8.0
    finally:
        hole.close()


# -- security -------------------------------------------------------------------------
def _make_cert(dirpath: Path, name: str, uri: str, server: bool) -> tuple[Path, Path]:
    """A self-signed application instance certificate (DER) and its key (PEM), made with `cryptography`."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                         data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = dirpath / f"{name}.der", dirpath / f"{name}-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    return {
        "server": _make_cert(d, "device", "urn:vbatt:demo-device:server", server=True),
        "client": _make_cert(d, "vbatt-client", "urn:vbatt:test:client", server=False),
        "stranger": _make_cert(d, "stranger", "urn:vbatt:test:stranger", server=False),
    }


def _secure(pki, who: str = "client") -> str:
    cert, key = pki[who]
    return (f"{{policy: Basic256Sha256, mode: SignAndEncrypt, certificate: '{cert}', private_key: '{key}', "
            f"server_certificate: '{pki['server'][0]}'}}")


@pytest.fixture(scope="module")
def secure_server(pki):
    cert, key = pki["server"]
    srv = DemoServer(free_port(), "--cert", str(cert), "--key", str(key), "--trust", str(pki["client"][0]),
                     "--user", "operator", "--password-env", "DEMO_PW", env={"DEMO_PW": "s3cret-pw"})
    yield srv
    srv.stop()


USER = "    username: operator\n    password_env: VBATT_TEST_PW\n"


def test_basic256sha256_sign_and_encrypt_with_user(secure_server, pki, harness, monkeypatch):
    monkeypatch.setenv("VBATT_TEST_PW", "s3cret-pw")
    h = harness(plant_yaml(node_yaml("r1", secure_server.port, security=_secure(pki), extra=USER)))
    inp = h.wait(lambda d: d["fault"][0] == 0 and d["updated_ns"][0] > 0, "secure node healthy")
    assert inp["soc"][0] == pytest.approx(0.8)
    h.command(1, battery_w=77.0)
    wait_until(lambda: secure_server.get("rack-1.BatterySetpointW") == 77.0, "write over SignAndEncrypt")


@pytest.mark.parametrize("who, password", [("stranger", "s3cret-pw"), ("client", "wrong")],
                         ids=["untrusted-client-certificate", "wrong-password"])
def test_refused_security_is_a_tls_fault(secure_server, pki, harness, monkeypatch, who, password):
    monkeypatch.setenv("VBATT_TEST_PW", password)
    h = harness(plant_yaml(node_yaml("r1", secure_server.port, security=_secure(pki, who), extra=USER)))
    inp = h.wait(lambda d: d["fault"][0] == Fault.TLS, "TLS fault")
    assert inp["updated_ns"][0] == 0 and inp["io_errors"][0] > 0


def test_a_server_with_another_key_is_not_trusted(pki, harness, monkeypatch, tmp_path):
    """The pinned server certificate: a device that presents a different key is refused."""
    other = _make_cert(tmp_path, "impostor", "urn:vbatt:demo-device:server", server=True)
    srv = DemoServer(free_port(), "--cert", str(other[0]), "--key", str(other[1]), "--trust", str(pki["client"][0]))
    try:
        h = harness(plant_yaml(node_yaml("r1", srv.port, security=_secure(pki))))
        h.wait(lambda d: d["fault"][0] == Fault.TLS, "TLS fault")
        time.sleep(1.0)
        assert h.inputs()["updated_ns"][0] == 0  # never a value from the impostor
    finally:
        srv.stop()
