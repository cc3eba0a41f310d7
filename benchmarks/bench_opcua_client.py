"""OPC UA client driver: how fast a change on an external server reaches the input image.

The device is `examples/opcua_demo_server.py` (plain asyncua) in its own process;
the driver runs on a real shared-memory image in a thread of this process and the
benchmark polls the published input block like the scan's latch would.

* change -> image latency: one variable changed on the server until its value is
  in the published input block (publishing interval 20 ms: the server's publish
  timer dominates, so compare against it);
* fan-in: one variable changed on every rack at once, until all N values are in;
* connect: from driver start until all N nodes are healthy (connect, secure
  channel, session, subscription, 9 monitored items per node, first values).
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vbatt.config.plant import load_config_text
from vbatt.drivers.base import IoContext
from vbatt.drivers.opcua.driver import OpcuaClientDriver
from vbatt.kernel.image import ImageSpec, ProcessImage
from vbatt.kernel.ports import free_port

DEMO = Path(__file__).resolve().parents[1] / "examples" / "opcua_demo_server.py"
PUBLISH_MS = 20


class _Device:
    def __init__(self, racks: int):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(DEMO), "--port", str(self.port), "--racks", str(racks)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x) for x in self.proc.stdout], daemon=True).start()
        assert self.lines.get(timeout=120).startswith("READY")

    def cmd(self, **c) -> None:
        self.proc.stdin.write(json.dumps(c) + "\n")
        self.proc.stdin.flush()
        assert "error" not in self.lines.get(timeout=30)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _config(port: int, racks: int) -> str:
    nodes = []
    for r in range(1, racks + 1):
        k = f"rack-{r}"
        nodes.append(f"""
  - id: {k}
    driver: opcua
    endpoint: opc.tcp://127.0.0.1:{port}/demo
    security: none
    inputs:
      soc: {{node_id: "ns=2;s={k}.SoC", scale: 0.01}}
      voltage_v: "ns=2;s={k}.Voltage"
      current_a: "ns=2;s={k}.Current"
      temperature_c: "ns=2;s={k}.Temperature"
      demand_w: "ns=2;s={k}.Load"
      max_discharge_w: {{node_id: "ns=2;s={k}.MaxDischargeKW", scale: 1000}}
      max_charge_w: {{node_id: "ns=2;s={k}.MaxChargeKW", scale: 1000}}
      capacity_wh: "ns=2;s={k}.CapacityWh"
      link_max_w: "ns=2;s={k}.LinkMaxW"
    outputs:
      battery_w: "ns=2;s={k}.BatterySetpointW\"""")
    return (f"plant: {{stale_ms: 1000}}\ndrivers:\n  opcua: {{publishing_interval_ms: {PUBLISH_MS}}}\n"
            f"nodes:{''.join(nodes)}\n")


class _Driver:
    def __init__(self, port: int, racks: int):
        cfg, fleet = load_config_text(_config(port, racks))
        n = len(fleet)
        self.img = ProcessImage.create(ImageSpec(n_nodes=n, partitions=((0, n),), node_ids=tuple(fleet.ids)))
        self.io = IoContext(self.img, 0)
        self.thread = threading.Thread(target=OpcuaClientDriver(cfg, fleet, 0, n).run, args=(self.io,), daemon=True)
        self.thread.start()
        self._buf: dict[str, np.ndarray] = {}

    def column(self, name: str) -> np.ndarray:
        self.img.inputs[0].read(lambda a: self._buf.__setitem__(name, a[name].copy()))
        return self._buf[name]

    def wait(self, pred, timeout: float = 60.0) -> None:
        deadline = time.perf_counter() + timeout
        while not pred():
            if time.perf_counter() > deadline:
                raise AssertionError("timed out")
            time.sleep(0.0005)

    def close(self) -> None:
        self.io.request_stop()
        self.thread.join(15)
        self.img.close()


@pytest.fixture(scope="module", params=[10, 200], ids=lambda n: f"n={n}")
def rig(request):
    dev = _Device(request.param)
    drv = _Driver(dev.port, request.param)
    drv.wait(lambda: (drv.column("fault") == 0).all() and drv.column("soc").min() > 0)
    yield request.param, dev, drv
    drv.close()
    dev.close()


def test_change_to_image_latency(benchmark, rig):
    n, dev, drv = rig
    samples: list[float] = []
    value = iter(range(10, 10**6))

    def one() -> None:
        v = float(next(value) % 90 + 5)
        t = time.perf_counter()
        dev.cmd(set="rack-1.SoC", value=v)
        drv.wait(lambda: abs(drv.column("soc")[0] - v / 100) < 1e-12)
        samples.append((time.perf_counter() - t) * 1e6)

    benchmark.group = "opcua client: server change -> input image (publishing 20 ms)"
    benchmark.extra_info["n"] = n
    benchmark.pedantic(one, rounds=40, warmup_rounds=2)
    benchmark.extra_info["change_to_image_us"] = samples


def test_fan_in_all_nodes(benchmark, rig):
    n, dev, drv = rig
    value = iter(range(10, 10**6))

    def one() -> None:
        v = float(next(value) % 90 + 5)
        dev.cmd(set_all="SoC", value=v)
        drv.wait(lambda: np.all(np.abs(drv.column("soc") - v / 100) < 1e-12))

    benchmark.group = "opcua client: one variable of every node changes -> all in the image"
    benchmark.extra_info["n"] = n
    benchmark.pedantic(one, rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("n", [10, 200], ids=lambda n: f"n={n}")
def test_connect_until_all_healthy(benchmark, n):
    dev = _Device(n)
    try:
        def one() -> None:
            drv = _Driver(dev.port, n)
            try:
                drv.wait(lambda: (drv.column("fault") == 0).all() if drv.img.inputs[0].seq else False)
            finally:
                drv.close()

        benchmark.group = "opcua client: start until every node is healthy"
        benchmark.extra_info["n"] = n
        benchmark.pedantic(one, rounds=3, warmup_rounds=0)
    finally:
        dev.close()
