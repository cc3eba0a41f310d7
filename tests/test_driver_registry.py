"""Config schemas come from the driver registry: a driver installed by entry point is named in YAML.

The third-party driver here is a real distribution on sys.path (a package and its
.dist-info with an entry_points.txt, as pip would leave it), seen by a real
`vbatt check` process through importlib.metadata, as any installed plugin is.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, run_vbatt

from vbatt.drivers.registry import BUILTIN, DriverSpec, driver_spec, known_drivers

PLUGIN = '''
"""A third-party CAN bus driver: only its spec, config models and a Driver class."""
from typing import Annotated, Literal

from pydantic import Field

from vbatt.config.base import NodeId, Strict
from vbatt.drivers.base import Driver
from vbatt.drivers.registry import DriverSpec


class CanSettings(Strict):
    channel: str = "can0"
    bitrate: Annotated[int, Field(gt=0, le=1_000_000)] = 500_000


class CanNode(Strict):
    id: NodeId
    driver: Literal["can"]
    node_address: Annotated[int, Field(ge=0, le=127)]


def check(cfg, fleet):
    seen = {}
    for entry in cfg.nodes:
        if getattr(entry, "driver", None) == "can":
            if entry.node_address in seen:
                raise ValueError(f"node {entry.id}: CAN address {entry.node_address} is also node "
                                 f"{seen[entry.node_address]}'s")
            seen[entry.node_address] = entry.id


class CanDriver(Driver):
    kind = "can"

    def run(self, io):
        io.publish()


SPEC = DriverSpec(driver="vbatt_can_demo:CanDriver", config=CanSettings, node=CanNode, check=check)
'''


@pytest.fixture
def plugin_env(tmp_path, monkeypatch):
    """A site directory holding the plugin as an installed distribution, on the PYTHONPATH of `vbatt`."""
    site = tmp_path / "site"
    (site / "vbatt_can_demo").mkdir(parents=True)
    (site / "vbatt_can_demo" / "__init__.py").write_text(PLUGIN)
    info = site / "vbatt_can_demo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vbatt-can-demo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vbatt.drivers]\ncan = vbatt_can_demo:SPEC\n")
    (info / "RECORD").write_text("")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))


PLANT = """\
drivers:
  can: {{bitrate: {bitrate}}}
nodes:
  - {{id: A, soc: 0.5}}
  - {{id: C1, driver: can, node_address: 5}}
  - {{id: C2, driver: can, node_address: {second}}}
"""


def test_a_driver_registered_by_entry_point_is_named_in_yaml(tmp_path, plugin_env):
    p = tmp_path / "plant.yaml"
    p.write_text(PLANT.format(bitrate=250000, second=6))
    r = run_vbatt("check", str(p))
    assert r.returncode == 0, r.stderr
    assert "ok: 3 nodes" in r.stdout


@pytest.mark.parametrize("plant, expected", [
    (PLANT.format(bitrate=250000, second=6).replace("bitrate", "bitrat", 1),
     "plant.yaml:2: drivers.can.bitrat: unknown key"),
    (PLANT.format(bitrate=2_000_000, second=6), "plant.yaml:2: drivers.can.bitrate: Input should be less than "
                                                "or equal to 1000000 (got 2000000)"),
    (PLANT.format(bitrate=250000, second=6).replace("node_address: 6", "node_adress: 6"),
     "plant.yaml:6: nodes[2].node_adress: unknown key"),
    (PLANT.format(bitrate=250000, second=5), "plant.yaml:2: drivers.can: node C2: CAN address 5 is also node C1's"),
], ids=["unknown-key", "out-of-range", "node-key", "cross-check"])
def test_the_plugin_section_and_nodes_are_validated(tmp_path, plugin_env, plant, expected):
    p = tmp_path / "plant.yaml"
    p.write_text(plant)
    r = run_vbatt("check", str(p))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expected in " ".join(r.stderr.split()), r.stderr


def test_a_broken_plugin_is_left_out_with_a_warning(tmp_path, plugin_env):
    site = Path(os.environ["PYTHONPATH"].split(os.pathsep)[0])
    (site / "vbatt_can_demo" / "__init__.py").write_text("import no_such_module_here\n")
    p = tmp_path / "plant.yaml"
    p.write_text("nodes:\n  - {id: A, soc: 0.5}\n")
    r = run_vbatt("check", str(p))
    assert r.returncode == 0, r.stderr  # the other drivers still work
    text = " ".join(r.stderr.split())
    assert "driver 'can' (entry point vbatt_can_demo:SPEC of group vbatt.drivers) cannot be loaded" in text
    assert "No module named 'no_such_module_here'" in text
    p.write_text(PLANT.format(bitrate=250000, second=6))
    r = run_vbatt("check", str(p))
    assert r.returncode == 2 and "nodes[1]: unknown driver (expected sim, modbus, opcua or mqtt" in " ".join(r.stderr.split())


def test_without_the_plugin_its_name_is_unknown(tmp_path):
    p = tmp_path / "plant.yaml"
    p.write_text(PLANT.format(bitrate=250000, second=6))
    r = run_vbatt("check", str(p))
    assert r.returncode == 2
    text = " ".join(r.stderr.split())
    assert "nodes[1]: unknown driver (expected sim, modbus, opcua or mqtt, or a 'template')" in text
    assert "drivers.can: unknown key" in text


def test_builtin_specs_are_light():
    """Naming the drivers (building the config schema) imports no transport library."""
    code = textwrap.dedent("""
        import sys
        import vbatt.config.plant
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('pymodbus', 'asyncua', 'paho', 'google'))
        print(heavy)
    """)
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert known_drivers()[:len(BUILTIN)] == list(BUILTIN)
    for name in BUILTIN:
        spec = driver_spec(name)
        assert isinstance(spec, DriverSpec) and spec.node is not None
        assert spec.node.model_fields["driver"].annotation.__args__ == (name,)
