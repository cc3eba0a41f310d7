"""Interop: pysparkplug, an independent Sparkplug B implementation (its own paho-mqtt 1.x, its own compiled
sparkplug_b_pb2), decodes vbatt's births and data and sends a DCMD that vbatt's edge node accepts.

pysparkplug pins paho-mqtt < 2 while vbatt uses paho-mqtt 2.x, so it cannot live in the same
environment: `interop_path()` installs it with pip into `.venv/interop` (once; said on stderr) and the
test runs it as a separate process with that directory first on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from google.protobuf import descriptor_pb2

from conftest import REPO
from mqtt_support import HOST_PW, HOST_USER, RunningEdge, broker, edge_link, loop, wait_until
from vbatt.drivers.mqtt import sparkplug as sp

__all__ = ["broker", "loop"]
pytestmark = pytest.mark.timeout(240)

PYSPARKPLUG = "pysparkplug>=0.6,<0.7"
TARGET = REPO / ".venv" / "interop"


def interop_path() -> str:
    if not (TARGET / "pysparkplug").is_dir():
        print(f"installing {PYSPARKPLUG} (and its paho-mqtt 1.x) into {TARGET} for the interop test",
              file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(TARGET), PYSPARKPLUG],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.fail(f"cannot install {PYSPARKPLUG}: {r.stderr[-800:]}")
    return str(TARGET)


def _fields(msg: descriptor_pb2.DescriptorProto, prefix: str = "") -> dict:
    out = {}
    for f in msg.field:
        out[f"{prefix}{msg.name}.{f.name}"] = (f.number, f.type, f.label, f.type_name.rsplit(".", 1)[-1],
                                               f.HasField("oneof_index"))
    for n in msg.nested_type:
        out.update(_fields(n, f"{prefix}{msg.name}."))
    return out


def test_pysparkplug_reads_births_and_data_and_commands_a_vbatt_node(broker, loop):
    edge = RunningEdge(loop, edge_link(broker, "edge-A"), "edge-A", tick=False)
    try:
        wait_until(lambda: edge.edge.connected.is_set(), "the edge connected")
        env = {**os.environ, "PYTHONPATH": interop_path()}
        r = subprocess.run([sys.executable, str(REPO / "tests" / "sparkplug_interop.py"), str(broker.port),
                            str(broker.ca), HOST_USER, HOST_PW, "g1", "edge-A", "A"],
                           capture_output=True, text=True, timeout=180, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout.strip().splitlines()[-1])
        assert not got["errors"] and not got["timed_out"], (got["errors"], got["timed_out"], r.stderr[-1000:])
        # the births, decoded by pysparkplug: bdSeq, every metric with its name and datatype
        nb = got["births"]["NBIRTH"]
        assert {m["name"] for m in nb["metrics"]} == {"bdSeq", "Node Control/Rebirth"} and nb["seq"] == 0
        db = got["births"]["DBIRTH"]
        assert [(m["name"], m["datatype"]) for m in db["metrics"]] == [(d.name, d.datatype) for d in sp.DEVICE_METRICS]
        vals = {m["name"]: m["value"] for m in db["metrics"]}
        assert vals["soc"] == pytest.approx(0.8) and vals["capacity_wh"] == 1000.0 and vals["status/mode"] == 0
        # data by alias only: pysparkplug resolves the names from the birth
        acks = [m for d in got["data"] for m in d["metrics"] if m["name"] == "status/ack_seq"]
        assert acks and acks[-1]["value"] == 4242
        # its DCMD was accepted by vbatt's edge node: applied through the node agent's lease logic
        a = edge.edge.agents
        assert int(a.seq[0]) == 4242 and int(a.lease_ms[0]) == 60000 and a.mode[0] == 1
        assert {k: float(a.cmd[k][0]) for k in ("battery_w", "bus_w", "served_w", "shed_w")} == \
            {"battery_w": 33.0, "bus_w": -12.5, "served_w": 180.0, "shed_w": 20.0}
        # our schema, field by field, against the compiled sparkplug_b.proto pysparkplug ships
        theirs = descriptor_pb2.FileDescriptorProto.FromString(bytes.fromhex(got["descriptor"]))
        ours = sp.pb_descriptor()
        assert theirs.package == ours.package == "org.eclipse.tahu.protobuf"
        assert _fields(theirs.message_type[0]) == _fields(ours.message_type[0])
        assert [(v.name, v.number) for v in theirs.enum_type[0].value] == \
            [(v.name, v.number) for v in ours.enum_type[0].value]
    finally:
        edge.stop()
