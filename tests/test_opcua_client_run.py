"""The OPC UA client driver inside `vbatt run` and `vbatt check`, as a user meets it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import pytest
from asyncua import ua
from conftest import REPO, VBATT, read_json, run_vbatt
from test_opcua_client import DemoServer, free_port, node_yaml, plant_yaml, wait_until

from vbatt.cli.main import main as cli_main
from vbatt.drivers.faults import Fault
from vbatt.drivers.opcua.driver import UntrustedServer, fault_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server():
    srv = DemoServer(free_port(), "--racks", "2")
    yield srv
    srv.stop()


def test_vbatt_run_reads_the_server_and_writes_the_instruction(server, tmp_path):
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(plant_yaml(node_yaml("rack-1", server.port), node_yaml("rack-2", server.port, rack="rack-2")))
    server.set("rack-2.SoC", 64.0)
    server.set("rack-2.Load", 250.0)
    out = tmp_path / "out.json"
    r = run_vbatt("run", str(cfg), "--duration", "2", "--snapshot", str(out), "-q")
    assert r.returncode == 0, r.stderr
    snap = read_json(out)
    a, b = snap["nodes"]
    assert (a["id"], b["id"]) == ("rack-1", "rack-2")
    assert a["online"] == 1 and b["online"] == 1 and a["fault"] == 0
    assert a["soc"] == pytest.approx(0.80) and b["soc"] == pytest.approx(0.64)
    assert a["voltage_v"] == pytest.approx(51.2) and a["temperature_c"] == pytest.approx(27.0)
    assert a["max_discharge_w"] == pytest.approx(1500.0) and a["link_max_w"] == 1200.0
    assert a["demand_w"] == 400.0 and b["demand_w"] == 250.0
    assert snap["aggregate"]["nodes_online"] == 2
    # each node runs on its own battery (no main supply), and the device was told so
    assert a["battery_w"] == pytest.approx(400.0) and b["battery_w"] == pytest.approx(250.0)
    assert server.get("rack-1.BatterySetpointW") == pytest.approx(a["battery_w"])
    assert server.get("rack-2.BatterySetpointW") == pytest.approx(b["battery_w"])
    assert server.get("rack-1.ServedW") == pytest.approx(a["served_w"])


def test_vbatt_run_marks_a_lost_server_offline(server, tmp_path):
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(plant_yaml(node_yaml("rack-1", server.port)))
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*VBATT, "run", str(cfg), "--duration", "4", "--snapshot", str(out), "-q"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: server.get("rack-1.BatterySetpointW") == 400.0, "the run to command the rack", 30)
        server.stop()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    node = read_json(out)["nodes"][0]
    assert node["online"] == 0 and node["fault"] == Fault.CONNECTION
    assert node["io_errors"] > 0


def test_the_example_config_is_valid():
    r = run_vbatt("check", "examples/opcua_client.yaml")
    assert r.returncode == 0, r.stderr
    assert "2 nodes" in r.stdout


# -- configuration errors --------------------------------------------------------------
GOOD_NODE = """  - id: r1
    driver: opcua
    endpoint: opc.tcp://127.0.0.1:4841
    security: none
    inputs:
      soc: {node_id: "ns=2;s=r1.SoC", scale: 0.01}
    outputs:
      battery_w: "ns=2;s=r1.Setpoint"
"""


@pytest.mark.parametrize("old, new, line, path, words", [
    ('      soc: {', '      sox: {', 6, "nodes[0].inputs.sox", "unknown key"),
    ('      battery_w:', '      battery_kw:', 8, "nodes[0].outputs.battery_kw", "unknown key"),
    ('"ns=2;s=r1.SoC"', '"ns=2;r1.SoC"', 6, "nodes[0].inputs.soc.node_id", "not an OPC UA NodeId"),
    ('scale: 0.01', 'scale: 0', 6, "nodes[0].inputs.soc.scale", "must not be 0"),
    ('    security: none\n', '', 1, "nodes[0].security", "required key is missing"),
    ('    security: none\n', '    security: {policy: Basic128Rsa15, certificate: a, private_key: b, '
     'server_certificate: c}\n', 4, "nodes[0].security.policy", "Basic256Sha256"),
    ('    security: none\n', '    security: {policy: Basic256Sha256, certificate: /no/such.der, '
     'private_key: /no/key.pem, server_certificate: /no/server.der}\n', 4, "nodes[0].security.certificate",
     "no such file"),
    ('opc.tcp://127.0.0.1:4841', 'http://127.0.0.1:4841', 3, "nodes[0].endpoint", "opc"),
    ('    inputs:\n', '    username: op\n    password_env: HOME\n    inputs:\n', 5, "nodes[0].username",
     "must not travel over security: none"),
])
def test_config_errors_name_file_line_and_key(write_config, capsys, old, new, line, path, words):
    assert old in GOOD_NODE
    p = write_config("nodes:\n" + GOOD_NODE.replace(old, new))
    assert cli_main(["check", str(p)]) == 2  # in-process: the exit code `vbatt check` returns
    err = capsys.readouterr().err
    assert f"{p}:{line + 1}: {path}" in err, err
    assert words in err


def test_vbatt_check_process_exits_2_with_the_location(write_config):
    p = write_config("nodes:\n" + GOOD_NODE.replace("      soc: {", "      sox: {"))
    r = run_vbatt("check", str(p))
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{p}:7: nodes[0].inputs.sox: unknown key" in r.stderr, r.stderr


def test_driver_section_errors(write_config, capsys):
    p = write_config("drivers:\n  opcua:\n    publishing_intervall_ms: 10\nnodes:\n" + GOOD_NODE)
    assert cli_main(["check", str(p)]) == 2
    assert f"{p}:3: drivers.opcua.publishing_intervall_ms: unknown key" in capsys.readouterr().err
    p = write_config("drivers:\n  opcua:\n    reconnect_min_ms: 5000\n    reconnect_max_ms: 100\nnodes:\n"
                     + GOOD_NODE)
    assert cli_main(["check", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}:2: drivers.opcua: Value error, reconnect_min_ms (5000) must be <= reconnect_max_ms (100)" \
        in err, err


# -- exception -> fault code -------------------------------------------------------------------
@pytest.mark.parametrize("exc, fault", [
    (asyncio.TimeoutError(), Fault.TIMEOUT),
    (TimeoutError(), Fault.TIMEOUT),
    (ConnectionRefusedError(111, "refused"), Fault.CONNECTION),
    (ConnectionResetError(), Fault.CONNECTION),
    (OSError(113, "no route"), Fault.CONNECTION),
    (EOFError(), Fault.CONNECTION),
    (UntrustedServer("another key"), Fault.TLS),
    (ua.UaStatusCodeError(ua.StatusCodes.BadCertificateUntrusted), Fault.TLS),
    (ua.UaStatusCodeError(ua.StatusCodes.BadSecurityChecksFailed), Fault.TLS),
    (ua.UaStatusCodeError(ua.StatusCodes.BadUserAccessDenied), Fault.TLS),
    (ua.UaStatusCodeError(ua.StatusCodes.BadIdentityTokenRejected), Fault.TLS),
    (ua.UaStatusCodeError(ua.StatusCodes.BadTimeout), Fault.TIMEOUT),
    (ua.UaStatusCodeError(ua.StatusCodes.BadNodeIdUnknown), Fault.BAD_VALUE),
    (ua.UaStatusCodeError(ua.StatusCodes.BadTooManySessions), Fault.CONNECTION),
    (ua.UaStatusCodeError(ua.StatusCodes.BadServerHalted), Fault.CONNECTION),
    (ua.UaError("garbage header"), Fault.GARBLED),
    (RuntimeError("anything else"), Fault.CONNECTION),
])
def test_every_failure_maps_to_the_most_specific_fault(exc, fault):
    assert fault_of(exc) == fault


def test_vbatt_run_with_no_server_still_runs_and_reports(tmp_path):
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(plant_yaml(node_yaml("rack-1", free_port())))
    out = tmp_path / "out.json"
    t = time.monotonic()
    r = run_vbatt("run", str(cfg), "--duration", "1", "--snapshot", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t < 60
    node = read_json(out)["nodes"][0]
    assert node["online"] == 0 and node["fault"] == Fault.CONNECTION
