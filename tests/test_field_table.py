"""Every surface of a field is derived from the one field table (runtime/kernel/fields.py): the YAML
schema and its ranges, the SunSpec codec of both sides, retain, the OPC UA writable and historized sets,
health's checked fields, the snapshot and the live view. Each test here holds one surface to the table."""

from __future__ import annotations

import ast
import math

import numpy as np
import pytest
from pydantic import ValidationError

from conftest import REPO, run_vbatt
from vbatt.config.plant import SETTINGS, NodeConfig, PlantConfig, TemplateBody, load_config_text
from vbatt.drivers.modbus.config import ModbusNodeConfig
from vbatt.drivers.modbus import sunspec as ss
from vbatt.kernel.fields import (AGGREGATES, NODE_FIELDS, NODE_MEASUREMENTS, NODE_OUTPUTS, TABLE, Role, Scope,
                                 fields, names, node_field)
from vbatt.kernel.image import ImageSpec, Op, ProcessImage
from vbatt.kernel.stats import stats_specs

TABLE_NAMES = {f.name for f in TABLE}
NON_FIELD = object()


def _table_keys(model) -> dict[str, object]:
    """The keys of a config model that are field names, with their defaults."""
    return {k: v.default for k, v in model.model_fields.items() if k in TABLE_NAMES}


def _bounds(model, key: str) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in model.model_fields[key].metadata:
        lo = getattr(m, "ge", lo)
        hi = getattr(m, "le", hi)
    return lo, hi


# -- the YAML schema ------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, scope, roles", [
    (NodeConfig, Scope.NODE, None),
    (TemplateBody, Scope.NODE, None),
    (PlantConfig, Scope.AGGREGATE, None),
    (ModbusNodeConfig, Scope.NODE, (Role.SETTING,)),
])
def test_yaml_keys_and_defaults_are_the_tables(model, scope, roles):
    want = {f.yaml: f.default for f in fields(scope, roles, configured=True)}
    assert _table_keys(model) == want


def test_node_and_plant_bounds_are_the_tables():
    for model, scope in ((NodeConfig, Scope.NODE), (PlantConfig, Scope.AGGREGATE)):
        for f in fields(scope, configured=True):
            assert _bounds(model, f.yaml) == (f.lo, f.hi), f.name


def test_every_node_side_schema_takes_the_tables_keys():
    from vbatt.drivers.node.agent import NutBackendConfig, SimBackendConfig, SysfsBackendConfig
    from vbatt.drivers.opcua.config import OpcuaConstants, OpcuaInputs, OpcuaNodeConfig

    settings = {f.yaml for f in fields(Scope.NODE, Role.SETTING, configured=True)}
    assert set(_table_keys(OpcuaNodeConfig)) == settings
    assert set(_table_keys(SimBackendConfig)) == {f.yaml for f in fields(Scope.NODE, Role.MEASUREMENT, configured=True)}
    assert set(OpcuaInputs.model_fields) == set(OpcuaConstants.model_fields) == set(names(NODE_MEASUREMENTS))
    for f in fields(Scope.NODE, Role.MEASUREMENT, configured=True):
        assert _bounds(SimBackendConfig, f.yaml) == (f.lo, f.hi), f.name
    for model, base in ((SysfsBackendConfig, {"kind": "sysfs"}), (NutBackendConfig, {"kind": "nut", "ups": "u"})):
        for k in _table_keys(model):  # what a read-only battery cannot measure: configured within the table
            f = node_field(k)
            assert getattr(model.model_validate({**base, k: f.hi}), k) == f.hi
            with pytest.raises(ValidationError):
                model.model_validate({**base, k: _beyond(f, "hi")})
            with pytest.raises(ValidationError):
                model.model_validate({**base, k: _beyond(f, "lo")})


def _beyond(f, side: str) -> float | int:
    step = 1 if f.np_dtype.kind in "iu" else max(1.0, abs(f.hi if side == "hi" else f.lo) * 1e-3)
    return f.hi + step if side == "hi" else f.lo - step


def _yaml(x) -> str:
    return str(x) if isinstance(x, int) else repr(float(x))


@pytest.mark.parametrize("f", fields(configured=True), ids=lambda f: f"{f.scope.value}.{f.name}")
def test_yaml_accepts_the_range_and_refuses_beyond_it_with_line_and_range(f):
    def load(value, template=False):
        v = _yaml(value) if not isinstance(value, tuple) else f"[{_yaml(value[0])}, {_yaml(value[1])}]"
        if f.scope is Scope.AGGREGATE:
            text = f"plant:\n  {f.yaml}: {v}\nnodes:\n  - id: A\n"
            where = f"plant.yaml:2: plant.{f.yaml}: "
        elif template:
            text = f"nodes:\n  - template:\n      count: 2\n      id: 'n{{i}}'\n      {f.yaml}: {v}\n"
            where = f"plant.yaml:5: nodes[0].template.{f.yaml}: "
        else:
            text = f"nodes:\n  - id: A\n    {f.yaml}: {v}\n"
            where = f"plant.yaml:3: nodes[0].{f.yaml}: "
        return text, where

    for template in ((False, True) if f.scope is Scope.NODE else (False,)):
        for ok in (f.lo, f.hi) + (((f.lo, f.hi),) if template else ()):
            cfg, fleet = load_config_text(load(ok, template)[0], "plant.yaml")
            got = fleet.values[f.name] if f.scope is Scope.NODE else getattr(cfg.plant, f.yaml)
            assert np.all((f.lo <= got) & (got <= f.hi)), (f.name, ok, got)
        for side in ("lo", "hi"):
            bad = _beyond(f, side)
            for value in ((bad, (f.lo, bad) if side == "hi" else (bad, f.hi)) if template else (bad,)):
                text, where = load(value, template)
                with pytest.raises(Exception) as exc:
                    load_config_text(text, "plant.yaml")
                problems = exc.value.problems
                unit = f" {f.unit}" if f.unit not in ("", "1") else ""
                assert any(p.startswith(where) and f"range is [{f.lo:g}, {f.hi:g}]{unit}" in p for p in problems), \
                    (value, problems)


def test_check_refuses_a_capacity_beyond_the_table_with_file_line_and_range(write_config):
    path = write_config("nodes:\n  - id: A\n    soc: 0.5\n    capacity_wh: 5e12\n")
    r = run_vbatt("check", str(path))
    assert r.returncode == 2, r.stdout + r.stderr
    out = " ".join((r.stdout + r.stderr).split())  # rich may wrap the line
    assert f"{path}:4: nodes[0].capacity_wh: Input should be less than or equal to 1000000000" in out, out
    assert "the field's range is [0, 1e+09] Wh" in out, out


# -- the SunSpec codec, both sides --------------------------------------------------------------------------
def test_codec_points_are_the_tables_wire_fields():
    carried = {p.point.field for p in ss.NODE_MAP.points.values() if p.point.field}
    assert carried == {f.name for f in TABLE if f.wire}
    assert ss.CODEC.fields == names(NODE_MEASUREMENTS)
    assert sorted(ss.CODEC.outputs) == sorted(names(NODE_OUTPUTS))
    assert set(ss.CODEC.vendor_points) | set(ss.CODEC.battery_points) == set(names(NODE_MEASUREMENTS))


def test_both_sides_and_the_explicit_maps_use_the_tables_lists():
    from vbatt.drivers.modbus import driver
    from vbatt.drivers.modbus.config import MAP_INPUTS, MAP_OUTPUTS
    from vbatt.drivers.node import agent
    from vbatt.drivers.node.backends import OFFER

    assert driver.CODEC is agent.CODEC is ss.CODEC
    assert driver.FIELDS == MAP_INPUTS == names(NODE_MEASUREMENTS)
    assert MAP_OUTPUTS == names(NODE_OUTPUTS)
    assert OFFER == ss.CODEC.offer_keys and set(names(NODE_MEASUREMENTS)) <= set(OFFER)


def test_codec_round_trip_of_the_offer_and_the_instruction():
    c, n = ss.CODEC, 3
    rows = ss.static_rows(n, [{}] * n)
    rng = np.random.default_rng(1)
    offer = {}
    for k in c.offer_keys:
        f = next((f for f in NODE_MEASUREMENTS if f.name == k), None)
        lo, hi = (max(f.lo, -3e3), min(f.hi, 3e3)) if f is not None else (0.0, 3e3)  # int16 at 0.1 A
        offer[k] = rng.uniform(lo, hi, n)
    c.encode_offer(rows, offer)
    vend = c.decode_offer(rows, np.ones(n, bool))
    plain = c.decode_offer(rows, np.zeros(n, bool))
    for f in NODE_MEASUREMENTS:
        p = c.battery_points.get(f.name)
        if p is None:  # plain SunSpec has no point for it: the table's default
            assert (plain[f.name] == f.default).all(), f.name
        else:  # model 802 rounds to its scale factor
            step = 10.0 ** p.point.sf / p.point.scale
            assert np.all(np.abs(plain[f.name] - offer[f.name]) <= step / 2 + 1e-9), f.name
        if f.name in c.vendor_points:  # float32, SI: what the allocator needs at full precision
            assert np.allclose(vend[f.name], offer[f.name], rtol=2**-23, atol=0), f.name
        else:
            assert np.array_equal(vend[f.name], plain[f.name]), f.name
    out = {k: rng.uniform(-1e4, 1e4, n) for k in c.outputs}
    c.encode_instruction(rows, np.arange(n) + 70000, np.full(n, 2000), out)
    for i in range(n):
        words = rows[i, c.instr_first - ss.NODE_MAP.base:c.instr_end - ss.NODE_MAP.base].tolist()
        seq, lease, cmd = c.decode_instruction(words)
        assert (seq, lease) == (70000 + i, 2000)
        assert set(cmd) == set(names(NODE_OUTPUTS))
        for k, v in cmd.items():
            assert math.isclose(v, out[k][i], rel_tol=2**-23), k


# -- retain, settings, OPC UA, health ----------------------------------------------------------------------
@pytest.fixture
def img():
    ids = ("a", "b", "c")
    spec = ImageSpec(n_nodes=3, partitions=((0, 3),), node_ids=ids, memory=tuple(stats_specs(10)))
    image = ProcessImage.create(spec)
    yield image
    image.close()


def test_retained_set_is_the_tables_retained_flag(img):
    from vbatt.retain.retainer import WATCHED
    from vbatt.retain.store import DEFAULT_SETTINGS, retained_views

    want = {f"{f.scope.value}.{f.name}" for f in fields(retained=True)}
    views = retained_views(img)
    assert {k for k in views if k.startswith(("node.", "agg."))} == want
    assert set(WATCHED) == want | {"ctl.mode"}
    assert set(DEFAULT_SETTINGS) == {f"{f.scope.value}.{f.name}" for f in fields(retained=True, operator_settable=True)} \
        | {"ctl.mode"}


def test_opcua_writable_and_historized_sets_are_the_tables_flags():
    from vbatt.opcua_models.model import HIDDEN_NODE_FIELDS, aggregate_vars, node_vars

    for vars_, scope in ((node_vars(), Scope.NODE), (aggregate_vars(), Scope.AGGREGATE)):
        assert {v.name for v in vars_ if v.writable} == set(names(fields(scope, operator_settable=True)))
        assert {v.name for v in vars_ if v.historized} == set(names(fields(scope, historized=True)))
    assert [v.name for v in node_vars()] == [n for n in names(NODE_FIELDS) if n not in HIDDEN_NODE_FIELDS]
    assert [v.name for v in aggregate_vars()] == list(names(AGGREGATES))
    for f in fields(operator_settable=True):
        assert isinstance(getattr(Op, f.command), int), f.name


def test_scan_applies_every_setting_command_inside_the_range_only():
    from vbatt.config.plan import build_programs, image_spec, partition
    from vbatt.kernel.clock import FakeClock
    from vbatt.kernel.image import Ctl, Mode
    from vbatt.kernel.scan import ScanEngine

    cfg, fleet = load_config_text("nodes:\n  - {id: A, soc: 0.5}\n  - {id: B, soc: 0.5}\n")
    programs = build_programs(cfg, 2)
    image = ProcessImage.create(image_spec(cfg, fleet, programs, partition(cfg, fleet)))
    try:
        image.ctl[Ctl.MODE] = Mode.RUN
        clock = FakeClock()
        eng = ScanEngine(image, programs, cfg, clock)

        def cycle():
            a = image.inputs[0].begin()
            a["soc"][:] = 0.5
            a["updated_ns"][:] = clock.now_ns()
            image.inputs[0].commit()
            eng.run(max_cycles=1)
            clock.advance(10_000_000)
            return image.read_published()[0]

        for f in fields(operator_settable=True):
            key, node = f"{f.scope.value}.{f.name}", (1 if f.scope is Scope.NODE else -1)
            at = (lambda v: v[key][node if node >= 0 else 0])  # noqa: E731
            for value in (f.hi, f.lo):  # both ends are taken
                image.commands.push(1, getattr(Op, f.command), node=node, value=float(value))
                assert at(cycle()) == value, (f.name, value)
            for value in (_beyond(f, "hi"), _beyond(f, "lo"), math.nan):  # beyond them nothing changes
                image.commands.push(1, getattr(Op, f.command), node=node, value=float(value))
                assert at(cycle()) == f.lo, (f.name, value)
    finally:
        image.close()


def test_reload_turns_every_configured_setting_into_its_command():
    from vbatt.supervise.reload import diff

    def text(bump: int) -> str:
        plant = "".join(f"  {f.yaml}: {_yaml(f.lo + bump)}\n" for f in SETTINGS if f.scope is Scope.AGGREGATE)
        node = "".join(f"    {f.yaml}: {_yaml(f.lo + bump)}\n" for f in SETTINGS if f.scope is Scope.NODE)
        return f"plant:\n{plant}nodes:\n  - id: A\n{node}  - id: B\n"

    old, new = load_config_text(text(0)), load_config_text(text(1))
    plan = diff(*old, *new, memory_of=lambda cfg: ())
    assert not plan.refused
    assert sorted(op for op, _node, _v in plan.commands) == sorted(getattr(Op, f.command) for f in SETTINGS)
    assert all(v == f.lo + 1 for (_op, _node, v), f in zip(plan.commands, SETTINGS))


def test_health_checks_the_measurements_with_a_range():
    from vbatt.programs.health import CHECKED_FIELDS, Health

    assert CHECKED_FIELDS == names(fields(Scope.NODE, Role.MEASUREMENT, ranged=True)) == names(NODE_MEASUREMENTS)
    from types import SimpleNamespace

    import numpy as np

    from vbatt.kernel.fields import NODE_FIELDS, node_field
    from vbatt.programs.health import HealthParams

    img = SimpleNamespace(node={f.name: np.full(1, float(k)) for k, f in enumerate(NODE_FIELDS)})
    b = Health(HealthParams(), 1).bindings(img)
    # the kernel's `checked` binding is exactly those fields, in order, with the table's ranges
    assert [a[0] for a in b["checked"]] == [img.node[f][0] for f in CHECKED_FIELDS]
    assert list(b["check_lo"]) == [node_field(f).lo for f in CHECKED_FIELDS]
    assert list(b["check_hi"]) == [node_field(f).hi for f in CHECKED_FIELDS]


# -- what an operator sees ------------------------------------------------------------------------------------
def test_snapshot_and_live_view_show_every_field_of_the_table(img):
    from rich.console import Console

    from vbatt.kernel.snapshot import snapshot
    from vbatt.supervise.live import aggregate_cells, render

    img.publish()
    snap = snapshot(img)
    assert list(snap["aggregate"]) == list(names(AGGREGATES))
    assert [list(row) for row in snap["nodes"]] == [["id", *names(NODE_FIELDS)]] * 3
    cells = aggregate_cells({f.name: 1.0 for f in AGGREGATES})
    assert len(cells) == len(AGGREGATES) and len({label for label, _ in cells}) == len(AGGREGATES)
    con = Console(record=True, width=200)
    con.print(render(img, 10.0))
    shown = con.export_text()
    assert all(label in shown for label, _ in cells), shown


# -- nothing else spells a field list ----------------------------------------------------------------------------
# Where a literal list of field names is the point: a computation's argument or output order.
# The program contract (issue #10, the programs' reads/writes) will derive the programs' ones.
SPELLED_ON_PURPOSE = {
    "programs/allocation/__init__.py": "program binding: reads, writes, kernel outputs",
    "programs/allocation/kkt.py": "the checker's outputs",
    "programs/health.py": "program binding: reads",
    "programs/protection.py": "program binding: reads, writes",
    "programs/safe.py": "program binding: reads, writes",
    "programs/energy/__init__.py": "program binding: writes; per-class memory and the snapshot's class keys",
    "runtime/kernel/aggregates.py": "the aggregate kernel's output vector and arguments",
    "drivers/node/backends/sysfs.py": "the values a laptop battery cannot measure, from its config",
    "runtime/soak/ua.py": "the few variables the soak harness watches",
    "runtime/scenario/record.py": "names of the recorded series (per class, fleet), which reuse field names",
    "runtime/scenario/schema.py": "scenario event actions, named after the field they change",
    "programs/hierarchy/curves.py": "the outputs of allocation stages 2 and 4 under a tree's levels",
    "programs/hierarchy/classes.py": "the snapshot's class keys (as programs/energy class_rows) of a subtree",
    "runtime/hierarchy/link.py": "a virtual battery's offer from its aggregates; the status file's keys",
    "runtime/hierarchy/demo.py": "the generated nodes' YAML keys; the outputs compared with the flat controller",
}


def test_no_module_spells_a_list_of_fields():
    found = []
    for top in ("runtime", "drivers", "programs", "opcua_models"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel == "runtime/kernel/fields.py" or rel in SPELLED_ON_PURPOSE:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                elts = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None) \
                    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else None
                if elts is None:
                    continue
                hits = [e.value for e in elts if isinstance(e, ast.Constant) and e.value in TABLE_NAMES]
                if len(hits) >= 3:
                    found.append(f"{rel}:{node.lineno}: {hits}")
    assert not found, "field lists spelled outside the field table:\n" + "\n".join(found)
    for rel in SPELLED_ON_PURPOSE:
        assert (REPO / rel).is_file(), f"{rel} is gone: drop it from SPELLED_ON_PURPOSE"
