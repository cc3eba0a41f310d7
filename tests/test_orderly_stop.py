"""An orderly stop hands every node back; a controller that goes silent still lets their leases lapse.

On an orderly stop (Ctrl-C, SIGTERM, `--duration` reached) each Modbus link, right after its last poll, writes
the instruction block once more with Seq 0: the agent runs on its own at once, shows Mode RELEASED and counts
no expiry, so nothing in the log looks like a fault. A controller that stops renewing without that (frozen,
killed, a broken link) still makes the nodes' leases run out, counted and logged as before. And the processes
that serve or poll the nodes move their startup heap out of the collector's way, so that a full collection
does not stall them for long enough to time out every request at once (the first seconds of a run at load).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import signal
import subprocess
import threading
import time

import numpy as np
from pymodbus.client import AsyncModbusTcpClient, ModbusTcpClient

from conftest import REPO, VBATT, wait_until
from test_modbus_support import V, FakeNs, endpoint, fleet_of, instruction_words, point, poller, serving
from vbatt.config.plant import load_config
from vbatt.drivers.base import IoContext
from vbatt.drivers.faults import Fault
from vbatt.drivers.registry import driver_class
from vbatt.drivers.modbus import sunspec as ss
from vbatt.drivers.node.agent import AgentSet, AgentSpec, serve_agents
from vbatt.drivers.node.backends.sim import SimBackend
from vbatt.kernel.image import ImageSpec, ProcessImage

WAIT_S = 60.0  # generous: every wait below is for a state, never for a time
OUTPUTS = ("battery_w", "bus_w", "served_w", "shed_w")
RELEASED = 3  # the Mode register of a node handed back, as a SunSpec client reads it (docs/modbus.md)
LAPSE_LINE = re.compile(r"(?:(\d+) nodes \([^)]*\)|node \S+): lease (?:of instruction \d+ \(\d+ ms\) )?ran out")


def lapses_logged(text: str) -> int:
    """Nodes whose lease ran out, as the agents warn of them (a line per node, or, for more than three in one
    tick, one line counting them after a line per node at INFO)."""
    return sum(int(m.group(1)) if m.group(1) else 1
               for line in text.splitlines() if " WARNING " in line for m in LAPSE_LINE.finditer(line))


# -- the agent --------------------------------------------------------------------------------------------
def test_a_hand_back_leaves_the_node_on_its_own_and_no_lease_runs_out(caplog):
    clock = FakeNs()

    async def body():
        async with serving(clock_ns=clock) as agents:
            c = AsyncModbusTcpClient("127.0.0.1", port=agents.ports[0], timeout=2, retries=0, reconnect_delay=0)
            assert await c.connect()
            try:
                a, words = instruction_words(seq=7, lease_ms=500, battery_w=-50.0, bus_w=-250.0)
                assert not (await c.write_registers(a, words, device_id=1)).isError()
                agents.tick()
                assert agents.mode[0] == ss.Mode.CONTROLLED and agents.applied_w[0] == -50.0
                # a NaN in the hand-back refuses it whole, as any instruction: still controlled
                a, bad = instruction_words(seq=0, lease_ms=500, battery_w=float("nan"))
                r = await c.write_registers(a, bad, device_id=1)
                assert r.isError() and r.exception_code == 3 and agents.mode[0] == ss.Mode.CONTROLLED
                # the hand-back (Seq 0), acknowledged in the read half of the same request
                a, release = instruction_words(seq=0, lease_ms=500, battery_w=0.0)
                r = await c.readwrite_registers(read_address=40070, read_count=106, write_address=a, values=release,
                                                device_id=1)
                assert not r.isError()
                assert point(r.registers, 40070, V, "Mode", True) == RELEASED
                assert point(r.registers, 40070, V, "AckSeq", True) == 7  # the last instruction it followed
                assert point(r.registers, 40070, V, "LeaseLeftMs", True) == 0
                clock.advance_ms(2000)  # four leases later: nothing ran out, nothing was renewed
                with caplog.at_level(logging.INFO, logger="vbatt.node"):
                    agents.tick()
                vend = (await c.read_holding_registers(40136, count=40, device_id=1)).registers
                assert point(vend, 40136, V, "Mode", True) == RELEASED
                assert point(vend, 40136, V, "Expiries", True) == 0
                assert not point(vend, 40136, V, "Alm", True) & (ss.Alarm.LEASE_EXPIRED | ss.Alarm.BAD_INSTRUCTION)
                # on its own as after a lapse: own battery for own load (200 W demand, 100 W allowed), no export
                assert point(vend, 40136, V, "AppliedW") == 100.0
                assert (await c.read_holding_registers(40072 + 15, count=1, device_id=1)).registers == [0]  # LocRemCtl
                assert "ran out" not in caplog.text
                assert "node A: handed back by the controller (after instruction 7)" in caplog.text
                # a controller that starts again takes it back
                a, words = instruction_words(seq=8, lease_ms=500, battery_w=80.0)
                assert not (await c.write_registers(a, words, device_id=1)).isError()
                agents.tick()
                assert agents.mode[0] == ss.Mode.CONTROLLED and agents.applied_w[0] == 80.0
                assert list(agents.expiries) == [0, 0] and list(agents.releases) == [1, 0]
                assert agents.summary() == ("stopping 2 nodes: 0 handed back by the controller, 0 autonomous after a "
                                            "lapsed lease, 1 still controlled, 1 never instructed")
            finally:
                c.close()

    asyncio.run(body())


# -- the driver's links -----------------------------------------------------------------------------------
def test_the_driver_hands_each_node_back_when_its_links_stop_and_names_the_one_it_cannot(caplog):
    """Two agents answer until the stop; a third is killed while polled: its fault is logged as ever, and at
    the stop it is the one node not handed back (its lease runs out on its own)."""
    async def body():
        async with serving() as two, serving(fleet_of(
                "nodes: [{id: C, demand_w: 10, max_discharge_w: 10, capacity_wh: 100, soc: 0.5}]")) as gone:
            eps = [endpoint(two.ports[0], "A"), endpoint(two.ports[1], "B"), endpoint(gone.ports[0], "C")]
            p = poller(eps, poll_ms=50, timeout_ms=500, lease_ms=3000)
            p.hand_back_on_stop = True
            p.set_instruction(2**32, {k: np.full(3, 20.0 if k == "battery_w" else 0.0) for k in OUTPUTS})
            stop = asyncio.Event()
            with caplog.at_level(logging.INFO):
                tasks = [asyncio.create_task(p.link_task(i, stop)) for i in range(3)]
                for _ in range(int(WAIT_S / 0.05)):  # until all three follow the instruction
                    if all(two.mode == ss.Mode.CONTROLLED) and gone.mode[0] == ss.Mode.CONTROLLED:
                        break
                    await asyncio.sleep(0.05)
                # 32-bit Seq: cycle 2**32 goes out as 1, never as the hand-back's 0
                assert list(two.seq) == [1, 1] and list(two.mode) == [ss.Mode.CONTROLLED] * 2
                await gone.stop()  # the node is killed
                for _ in range(int(WAIT_S / 0.05)):
                    if p.comm_fault[2] == Fault.CONNECTION:
                        break
                    await asyncio.sleep(0.05)
                stop.set()
                await asyncio.gather(*tasks)
                p.hand_back_report()
            await p.close()
            assert list(two.mode) == [RELEASED] * 2 and list(two.releases) == [1, 1]
            assert list(two.expiries) == [0, 0] and list(p.handed_back) == [True, True, False]
            assert gone.mode[0] == ss.Mode.CONTROLLED  # what it held when it was killed
            assert list(p.not_handed_back) == [2]

    asyncio.run(body())
    text = caplog.text
    assert "CONNECTION" in text and "node C (127.0.0.1" in text  # the real fault, as before
    assert "2 nodes handed back to their own control (Mode RELEASED)" in text
    assert re.search(r"node C \(127\.0\.0\.1:\d+ unit 1\): not handed back at the stop \(cannot connect .+\): "
                     r"the lease of its last instruction \(3000 ms\) runs out", text), text


# -- the processes, as at a plant ---------------------------------------------------------------------------
def _modes(ports: list[int]) -> list[tuple[int, int]]:
    """(Mode, Expiries) of every node, read over Modbus as any SunSpec client would."""
    out = []
    for port in ports:
        c = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
        try:
            assert c.connect(), port
            regs = c.read_holding_registers(40136, count=40, device_id=1).registers
        finally:
            c.close()
        out.append((point(regs, 40136, V, "Mode", True), point(regs, 40136, V, "Expiries", True)))
    return out


def test_an_orderly_stop_hands_every_node_back_and_a_frozen_controller_lets_them_lapse(tmp_path):
    """A fleet of agents in a process of its own (the nodes of a plant) and `vbatt run` polling them. Frozen
    (SIGSTOP), the controller renews nothing: every lease runs out, counted and logged by the nodes. Going
    on (SIGCONT), it takes them back; stopped in order (SIGTERM), it hands every one of them back: Mode
    RELEASED, no expiry added, nothing in the log that looks like a fault."""
    n = 6
    ready = tmp_path / "ready"
    agents_cfg = tmp_path / "nodes.yaml"  # the fleet listens on ports the system chooses, told in `ready`
    agents_cfg.write_text("drivers: {modbus: {plaintext: true, embedded_fleet: {}}}\n"
                          f"nodes:\n  - template: {{count: {n}, id: 'node-{{i:05d}}', driver: modbus, demand_w: 300, "
                          "max_discharge_w: 600, capacity_wh: 800, soc: 0.7, link_max_w: 800}\n")
    fleet_err, run_err = tmp_path / "fleet.txt", tmp_path / "run.txt"
    fleet = subprocess.Popen([*VBATT, "fleet", str(agents_cfg), "--ready-file", str(ready), "-v"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=open(fleet_err, "w"))
    run = None
    try:
        wait_until(lambda: ready.exists() or fleet.poll() is not None, "the fleet's ports", WAIT_S)
        assert fleet.poll() is None, fleet_err.read_text()
        ports = [int(x) for x in ready.read_text().split()]
        assert len(ports) == n, ports
        nodes = "".join(f"  - {{id: node-{k:05d}, driver: modbus, host: 127.0.0.1, port: {port}}}\n"
                        for k, port in enumerate(ports))
        plant = tmp_path / "plant.yaml"
        plant.write_text("cycle: {cycle_ms: 10, realtime: false}\n"
                         "plant: {main_limit_w: 0, stale_ms: 1000}\n"
                         # a lease long enough that no stall of a loaded machine lets it lapse while running
                         "drivers: {modbus: {poll_ms: 100, timeout_ms: 500, lease_ms: 2500, plaintext: true}}\n"
                         f"nodes:\n{nodes}programs: [allocation]\n")
        run = subprocess.Popen([*VBATT, "run", str(plant), "-q", "-v", "--duration", "300"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=open(run_err, "w"), start_new_session=True)

        def all_in(mode: int) -> bool:
            assert run.poll() is None, run_err.read_text()
            return all(m == mode for m, _e in _modes(ports))

        wait_until(lambda: all_in(ss.Mode.CONTROLLED), "every node under control", WAIT_S)

        os.killpg(run.pid, signal.SIGSTOP)  # every process of the controller stands still
        try:
            wait_until(lambda: all_in(ss.Mode.AUTONOMOUS), "every lease to run out", WAIT_S)
        finally:
            os.killpg(run.pid, signal.SIGCONT)
        wait_until(lambda: all_in(ss.Mode.CONTROLLED), "every node under control again", WAIT_S)
        before = _modes(ports)
        assert all(e >= 1 for _m, e in before), before

        run.send_signal(signal.SIGTERM)  # an orderly stop, as `kill` or a service manager asks
        assert run.wait(60) == 0, run_err.read_text()
        after = _modes(ports)
        assert after == [(RELEASED, e) for _m, e in before], (before, after)
    finally:
        if run is not None and run.poll() is None:  # the test failed: leave nothing running
            os.killpg(run.pid, signal.SIGCONT)
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
        fleet.send_signal(signal.SIGTERM)
    assert fleet.wait(30) == 0, fleet_err.read_text()
    log, agents_log = run_err.read_text(), fleet_err.read_text()
    assert f"{n} nodes handed back to their own control (Mode RELEASED)" in log, log
    assert "not handed back" not in log and "Traceback" not in log, log
    # the nodes logged every lapse of the freeze once, and none at the stop
    assert lapses_logged(agents_log) == sum(e for _m, e in before), agents_log
    assert f"stopping {n} nodes: {n} handed back by the controller, 0 autonomous after a lapsed lease" in agents_log


# -- no full collection of the startup heap in the processes that talk to the nodes ----------------------------
def test_the_fleet_and_the_driver_freeze_their_startup_heap(tmp_path):
    """The objects built to start (numpy, numba, pymodbus, the config) go to the permanent generation once the
    process serves or polls: a full collection then walks only what was made since. Both run here in the main
    thread, as in their own processes."""
    fleet = fleet_of("nodes: [{id: A, demand_w: 10, max_discharge_w: 10, capacity_wh: 100, soc: 0.5}]")
    agents = AgentSet(SimBackend(fleet, 0, 1), [AgentSpec("A", "127.0.0.1", 0)])
    frozen: dict[str, int] = {}

    async def serve():
        stop = asyncio.Event()
        await serve_agents(agents, stop, on_ready=lambda a: (frozen.update(fleet=gc.get_freeze_count()),
                                                             stop.set()))

    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        asyncio.run(serve())
        gc.unfreeze()
        plant = tmp_path / "plant.yaml"
        plant.write_text("drivers: {modbus: {plaintext: true}}\n"
                         "nodes: [{id: A, driver: modbus, host: 127.0.0.1, port: 9}]\n")
        cfg, nodes = load_config(plant)
        img = ProcessImage.create(ImageSpec(n_nodes=1, partitions=((0, 1),), node_ids=tuple(nodes.ids)))
        io = IoContext(img, 0)

        def stop_once_frozen():  # the driver runs in the main thread, as in its process; this one ends it
            deadline = time.monotonic() + 30
            while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            frozen["driver"] = gc.get_freeze_count()
            io.request_stop()

        watcher = threading.Thread(target=stop_once_frozen)
        watcher.start()
        try:
            driver_class("modbus")(cfg, nodes, 0, 1).run(io)
        finally:
            watcher.join()
            img.close()
    finally:
        gc.unfreeze()
    assert frozen["fleet"] > 1000 and frozen["driver"] > 1000, frozen
