"""Minimal reproducers of bugs the fault-injection soak (vbatt soak) found in other components."""

from __future__ import annotations

import asyncio
import socket
import threading

import numpy as np

from vbatt.config.plant import default_config_path, load_config
from vbatt.kernel.image import ProcessImage
from vbatt.config.plan import build_programs, image_spec, partition
from vbatt.programs.codes import Trip
from vbatt.retain.retainer import RetainConfig, Retainer


def test_warm_restart_keeps_a_latched_trip_with_the_allocation_program_configured(tmp_path):
    """allocation.init fills its `state` memory with NaN ("not set yet"); the retain validator
    rejected any NaN in program memory, so every restart of the default config was cold and a
    latched trip was lost after kill -9 (soak seed 1: 'allocation.state holds NaN or infinity')."""
    cfg, fleet = load_config(default_config_path())
    programs = build_programs(cfg, len(fleet))
    spec = image_spec(cfg, fleet, programs, partition(cfg, fleet))
    img = ProcessImage.create(spec)
    img2 = ProcessImage.create(spec)
    try:
        for p in programs:
            p.init(img)
        assert np.isnan(img.mem["allocation.state"]).any()  # the program's own convention
        img.node["trip"][3] = int(Trip.OVER_TEMPERATURE)
        img.publish()
        Retainer(RetainConfig(enabled=True, dir=str(tmp_path)), img).save_now()
        r = Retainer(RetainConfig(enabled=True, dir=str(tmp_path)), img2)
        line = r.restore()
        assert r.kind == "warm", line
        assert img2.node["trip"][3] == int(Trip.OVER_TEMPERATURE)
    finally:
        img.close()
        img2.close()


def _closing_server() -> tuple[socket.socket, threading.Thread]:
    """Accepts every connection, reads the request and closes without a reply (the agent behind a proxy
    or gateway was SIGKILLed while the request was in flight)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            c.settimeout(2.0)
            try:
                c.recv(1024)
            except OSError:
                pass
            c.close()

    t = threading.Thread(target=loop, daemon=True)
    t.stop = stop  # type: ignore[attr-defined]
    t.start()
    return srv, t


def test_a_connection_the_device_closes_is_a_connection_fault_not_a_timeout():
    """docs/modbus.md: CONNECTION = refused, reset, unreachable; TIMEOUT = accepted, no reply. A peer that
    closes the connection was reported as TIMEOUT (soak: every agent SIGKILL showed up as TIMEOUT)."""
    from vbatt.drivers.faults import Fault
    from vbatt.drivers.modbus.driver import DeviceError, DeviceLink
    from vbatt.drivers.modbus.config import Endpoint

    srv, t = _closing_server()
    port = srv.getsockname()[1]

    async def main() -> Fault:
        link = DeviceLink(Endpoint("n", "127.0.0.1", port, 1, None, True), 0.3, None)
        try:
            await link.connect()
            await link.call("read_holding_registers", address=40000, count=2)
        except DeviceError as exc:
            return exc.fault
        finally:
            link.close()
        raise AssertionError("no error from a closed connection")

    try:
        assert asyncio.run(main()) == Fault.CONNECTION
    finally:
        t.stop.set()  # type: ignore[attr-defined]
        srv.close()
