"""Configuration: every bad config names file, line, key path and what is expected; exit 2."""

from __future__ import annotations

import pytest

from vbatt.config.plant import ConfigError, load_config_text
from conftest import run_vbatt

GOOD = """\
cycle:
  cycle_ms: 5
plant:
  main_limit_w: 100
nodes:
  - id: A
    priority: 0
    demand_w: 200
    max_discharge_w: 100
    max_charge_w: 50
    capacity_wh: 1000
    soc: 0.8
    temperature_c: 30
    link_max_w: 500
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config_text(text, "plant.yaml")
    return exc.value.problems


def test_good_config_gives_typed_objects():
    cfg, fleet = load_config_text(GOOD, "plant.yaml")
    assert cfg.cycle.cycle_ms == 5.0
    assert cfg.plant.main_limit_w == 100.0
    assert fleet.ids == ["A"]
    assert fleet.values["soc"].tolist() == [0.8]
    assert fleet.values["priority"].dtype.kind == "i"
    assert [p.id for p in cfg.programs] == ["safe_allocation"]


@pytest.mark.parametrize(
    "text, expected",
    [
        # unknown keys (typos) at three depths, each with its own line
        (GOOD.replace("  cycle_ms: 5", "  cylce_ms: 5"), "plant.yaml:2: cycle.cylce_ms: unknown key"),
        (GOOD.replace("    soc: 0.8", "    sco: 0.8"), "plant.yaml:12: nodes[0].sco: unknown key"),
        (GOOD + "extra: 1\n", "plant.yaml:15: extra: unknown key"),
        # values out of range
        (GOOD.replace("    soc: 0.8", "    soc: 1.5"), "plant.yaml:12: nodes[0].soc: Input should be less than or equal to 1 (got 1.5)"),
        (GOOD.replace("    soc: 0.8", "    soc: -0.1"), "plant.yaml:12: nodes[0].soc: Input should be greater than or equal to 0"),
        (GOOD.replace("capacity_wh: 1000", "capacity_wh: -5"), "plant.yaml:11: nodes[0].capacity_wh: Input should be greater than or equal to 0 (got -5)"),
        (GOOD.replace("  cycle_ms: 5", "  cycle_ms: 0"), "plant.yaml:2: cycle.cycle_ms: Input should be greater than 0"),
        (GOOD.replace("demand_w: 200", "demand_w: .nan"), "plant.yaml:8: nodes[0].demand_w:"),
        (GOOD.replace("demand_w: 200", "demand_w: lots"), "plant.yaml:8: nodes[0].demand_w: Input should be a valid number"),
        # structure
        ("cycle: {cycle_ms: 5}\nnodes: []\n", "plant.yaml:2: nodes: List should have at least 1 item"),
        ("cycle: {cycle_ms: 5}\n", "plant.yaml:1: nodes: required key is missing"),
        (GOOD + "  - {id: A}\n", "plant.yaml:15: nodes[1]: duplicate node id 'A' (first defined at plant.yaml:6)"),
        (GOOD.replace("    priority: 0\n", "    priority: 0\n    priority: 1\n"),
         "plant.yaml:8: nodes[0].priority: duplicate key (first given on line 7)"),
        (GOOD + "programs: [nope]\n", "plant.yaml:15: programs[0]: unknown program 'nope' (expected one of:"),
        (GOOD + "programs:\n  - safe_allocation: {x: 1}\n", "plant.yaml:16: programs[0].safe_allocation.x: unknown key"),
        (GOOD + "  - {id: B, driver: can}\n", "plant.yaml:15: nodes[1]: unknown driver (expected sim, modbus, opcua or mqtt"),
        ("nodes:\n  - id: A\n   soc: 1\n", "plant.yaml:3: not valid YAML"),
        ("", "plant.yaml:1: the file is empty"),
        ("nodes:\n  - {id: A}\n  -\n", "plant.yaml:3: nodes[1]: expected a node (a mapping with an 'id') or a 'template', got None"),
        ("nodes: [1]\n", "plant.yaml:1: nodes[0]: expected a node"),
        ("nodes:\n  - template: {count: 2, id: 'n{i[0]}'}\n", "plant.yaml:2: nodes[0].template.id: Value error, must be a format string"),
        ("nodes:\n  - template: {count: 2, id: 'n{i.real.x}'}\n", "plant.yaml:2: nodes[0].template.id: Value error, must be a format string"),
        ("nodes:\n  - template: {count: 2, id: 'a b/{i}'}\n", "plant.yaml:2: nodes[0].template.id: Value error, gives ids like 'a b/0'"),
        ("nodes:\n  - {id: A, demand_profile: {kind: csv, path: '" + "a" * 300 + "'}}\n", "plant.yaml:2: nodes[0].demand_profile.path: Value error, no such file"),
        ("source: x\nnodes: [{id: A}]\n", "plant.yaml:1: source: unknown key"),
        ("- 1\n- 2\n", "plant.yaml:1: expected a mapping with a 'nodes' list"),
    ],
)
def test_bad_config_names_line_path_and_expectation(text, expected):
    got = problems(text)
    assert any(p.startswith(expected) for p in got), got


def test_template_keeps_a_large_fleet_a_few_lines():
    cfg, fleet = load_config_text(
        "nodes:\n"
        "  - template: {count: 10000, id: 'rack-{i:05d}', priority: [0, 3], soc: [0.2, 0.9],\n"
        "               capacity_wh: 500, demand_w: [100, 300], seed: 7}\n", "big.yaml")
    assert len(fleet) == 10000
    assert fleet.ids[0] == "rack-00000" and fleet.ids[-1] == "rack-09999"
    soc, prio = fleet.values["soc"], fleet.values["priority"]
    assert 0.2 <= soc.min() and soc.max() <= 0.9 and soc.std() > 0.1
    assert set(prio.tolist()) == {0, 1, 2, 3}
    assert (fleet.values["capacity_wh"] == 500).all()
    # seeded: the same config gives the same fleet
    again = load_config_text(
        "nodes:\n"
        "  - template: {count: 10000, id: 'rack-{i:05d}', priority: [0, 3], soc: [0.2, 0.9],\n"
        "               capacity_wh: 500, demand_w: [100, 300], seed: 7}\n", "big.yaml")[1]
    assert (again.values["soc"] == soc).all()


@pytest.mark.parametrize(
    "body, expected",
    [
        ("{count: 3, id: 'x', soc: 0.5}", "nodes[0].template.id: Value error, must contain {i}"),
        ("{count: 3, id: 'x{i}', soc: [0.2, 1.3]}", "nodes[0].template.soc: Input should be less than or equal to 1 (got 1.3)"),
        ("{count: 3, id: 'x{i}', soc: [0.9, 0.2]}", "soc: range [0.9, 0.2] has low > high"),
        ("{count: 0, id: 'x{i}'}", "nodes[0].template.count: Input should be greater than or equal to 1"),
        ("{count: 3, id: 'x{i}', colour: red}", "nodes[0].template.colour: unknown key"),
    ],
)
def test_bad_template(body, expected):
    got = problems(f"nodes:\n  - template: {body}\n")
    assert any(expected in p and p.startswith("plant.yaml:2:") for p in got), got


def test_duplicate_ids_across_templates():
    got = problems("nodes:\n  - template: {count: 3, id: 'n{i}'}\n  - {id: n2}\n")
    assert got == ["plant.yaml:3: nodes[1]: duplicate node id 'n2' (first defined at plant.yaml:2)"]


def test_check_command_exit_codes(write_config):
    ok = run_vbatt("check", str(write_config(GOOD)))
    assert ok.returncode == 0, ok.stderr
    assert "1 nodes" in ok.stdout
    bad_path = write_config(GOOD.replace("    soc: 0.8", "    soc: 7"))
    bad = run_vbatt("check", str(bad_path))
    assert bad.returncode == 2
    assert f"{bad_path}:12: nodes[0].soc: Input should be less than or equal to 1 (got 7)" in bad.stderr
    missing = run_vbatt("check", "/nonexistent/plant.yaml")
    assert missing.returncode == 2 and "/nonexistent/plant.yaml: cannot read" in missing.stderr


def test_run_with_bad_config_exits_2_and_starts_nothing(write_config):
    bad = run_vbatt("run", str(write_config("nodes: []\n")), "--cycles", "1")
    assert bad.returncode == 2
    assert "nodes: List should have at least 1 item" in bad.stderr


@pytest.mark.parametrize("args", [("--help",), ("run", "--help"), ("check", "--help")])
def test_help_everywhere(args):
    r = run_vbatt(*args)
    assert r.returncode == 0 and "usage:" in r.stdout


@pytest.mark.parametrize("args", [(), ("frobnicate",), ("run", "--cycles", "0"), ("run", "--cycles", "1", "--duration", "2")])
def test_usage_errors_exit_2(args):
    r = run_vbatt(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
