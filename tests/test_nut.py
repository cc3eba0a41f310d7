"""The NUT backend against a real `upsd` with the dummy-ups driver (Debian's nut-server).

The fixture installs nut-server once where it can (root with apt-get); otherwise the
tests skip and say why. upsd and dummy-ups run from a private config dir in tmp_path
on a free loopback port.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from test_modbus_support import V, endpoint, free_port, poll_for, poller, serving
from vbatt.drivers.node.backends.nut import NutBackend
from vbatt.drivers.faults import Fault

UPSD = Path("/lib/nut/upsd")
DUMMY = Path("/lib/nut/dummy-ups")


def _ensure_nut() -> str | None:
    """None when upsd and dummy-ups are available, else why not."""
    if UPSD.exists() and DUMMY.exists():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "NUT (upsd, dummy-ups) is not installed and this user cannot install it (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(["apt-get", "install", "-y", "-q", "nut-server"], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=300)
        r = subprocess.run(["apt-get", "install", "-y", "-q", "nut-server"], capture_output=True, text=True,
                           env=env, timeout=300)
    if r.returncode != 0 or not UPSD.exists():
        return f"could not install nut-server: {r.stderr.strip()[-300:]}"
    return None


DEV = """battery.charge: 80
battery.voltage: 26.5
battery.runtime: 1800
battery.temperature: 30.5
ups.load: 25
ups.realpower.nominal: 1000
ups.status: OB
"""


@pytest.fixture(scope="module")
def upsd(tmp_path_factory):
    why = _ensure_nut()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("nut")
    (d / "state").mkdir()
    port = free_port()
    (d / "ups.conf").write_text("[dummy]\n  driver = dummy-ups\n  port = dummy.dev\n  desc = \"vbatt test\"\n")
    (d / "dummy.dev").write_text(DEV)
    (d / "upsd.conf").write_text(f"LISTEN 127.0.0.1 {port}\n")
    (d / "upsd.users").write_text("")
    (d / "nut.conf").write_text("MODE=standalone\n")
    env = {**os.environ, "NUT_CONFPATH": str(d), "NUT_STATEPATH": str(d / "state"),
           "NUT_ALTPIDPATH": str(d / "state")}
    user = ["-u", "root"] if os.geteuid() == 0 else []
    drv = subprocess.Popen([str(DUMMY), "-a", "dummy", "-F", *user], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not any((d / "state").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    srv = subprocess.Popen([str(UPSD), "-F", *user], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    be = NutBackend("127.0.0.1", port, "dummy", nominal_w=None, capacity_wh=None, max_discharge_w=500,
                    max_charge_w=200, link_max_w=0)
    try:
        while time.monotonic() < deadline:
            be.step(0, 0, np.zeros(1))
            if be.ok[0]:
                break
            time.sleep(0.1)
        else:
            pytest.skip(f"upsd did not come up: {be.last_error}")
        yield port, d
    finally:
        be.close()
        for p in (srv, drv):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def test_nut_backend_reads_the_ups(upsd):
    port, _ = upsd
    be = NutBackend("127.0.0.1", port, "dummy", nominal_w=None, capacity_wh=None, max_discharge_w=500,
                    max_charge_w=200, link_max_w=0)
    try:
        be.step(0.0, 0.0, np.zeros(1))
        o = be.offer
        assert be.ok[0], be.last_error
        assert o["soc"][0] == pytest.approx(0.80)
        assert o["voltage_v"][0] == pytest.approx(26.5)
        assert o["demand_w"][0] == pytest.approx(250.0)  # 25 % of 1000 W nominal
        assert o["temperature_c"][0] == pytest.approx(30.5)
        assert o["capacity_wh"][0] == pytest.approx(250.0 * 1800 / 3600 / 0.8)  # runtime x load / soc
        assert o["current_a"][0] == pytest.approx(250.0 / 26.5)  # on battery (OB)
    finally:
        be.close()


def test_nut_node_served_over_modbus_and_a_missing_ups(upsd):
    port, _ = upsd

    async def body():
        good = NutBackend("127.0.0.1", port, "dummy", nominal_w=None, capacity_wh=None, max_discharge_w=500,
                          max_charge_w=200, link_max_w=0)
        missing = NutBackend("127.0.0.1", port, "nosuchups", nominal_w=None, capacity_wh=None, max_discharge_w=500,
                             max_charge_w=200, link_max_w=0)
        for be in (good, missing):
            be.step(0, 0, np.zeros(1))
        assert not missing.ok[0] and "UNKNOWN-UPS" in missing.last_error
        async with serving(backend=good) as a1, serving(backend=missing) as a2:
            a1.tick()
            a2.tick()
            p = poller([endpoint(a1.ports[0], "ups"), endpoint(a2.ports[0], "gone")])
            await poll_for(p, 0.3)
            vals, faults, reasons = p.decode()
            assert faults.tolist() == [0, Fault.BAD_VALUE], reasons
            assert vals["soc"][0] == pytest.approx(0.8) and vals["demand_w"][0] == pytest.approx(250.0)
            await p.close()
        good.close()
        missing.close()

    asyncio.run(body())
