"""The rooms of the package and the one-way rule between them, read from the source (every import
statement, also those inside functions; only `if TYPE_CHECKING:` blocks are exempt, they never run).

Lowest first: the kernel (field table, image, scan, program contract) knows no other room; programs
and drivers build on the kernel; config builds its schema from the driver and program registries;
supervision runs what config planned; the CLI, the soak harness and the scenario runner sit on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

TOPS = {"runtime": "vbatt", "drivers": "vbatt.drivers", "programs": "vbatt.programs",
        "opcua_models": "vbatt.opcua_models"}

# room -> rooms it may import (a room is a module prefix; the longest matching prefix names it)
LEAF_CONFIG = {"vbatt.config.base", "vbatt.config.yamlsrc", "vbatt.config.textfile"}
ALLOWED: dict[str, set[str]] = {
    "vbatt.kernel": set(),
    "vbatt.plugins": set(),
    "vbatt.programs": {"vbatt.kernel", "vbatt.plugins"} | LEAF_CONFIG,
    "vbatt.drivers": {"vbatt.kernel", "vbatt.plugins"} | LEAF_CONFIG,
    # the server's Reload method is a client of the online-change protocol, as `vbatt reload` is
    "vbatt.opcua_models": {"vbatt.kernel", "vbatt.plugins", "vbatt.programs.codes", "vbatt.programs.recorded",
                           "vbatt.supervise.reload"} | LEAF_CONFIG,
    "vbatt.retain": {"vbatt.kernel"} | LEAF_CONFIG,
    "vbatt.config.base": {"vbatt.kernel"},  # the YAML types of the field table
    "vbatt.config.yamlsrc": {"vbatt.config.textfile"},
    "vbatt.config.textfile": {"vbatt.config.yamlsrc"},
    "vbatt.config": {"vbatt.kernel", "vbatt.plugins", "vbatt.retain", "vbatt.programs.registry",
                     "vbatt.drivers.registry", "vbatt.drivers.sim.config", "vbatt.opcua_models.config"},
    "vbatt.supervise": {"vbatt.kernel", "vbatt.plugins", "vbatt.config", "vbatt.retain",
                        "vbatt.programs.registry", "vbatt.drivers.registry", "vbatt.drivers.base"},
    # the node side is an application of its own (`vbatt node`, `vbatt fleet`): it may read plant configs
    "vbatt.drivers.node": {"vbatt.kernel", "vbatt.plugins", "vbatt.config", "vbatt"},
    # a controller in a tree: its uplink is a node agent, its children are read over Modbus
    "vbatt.hierarchy": {"vbatt.kernel", "vbatt.plugins", "vbatt.programs", "vbatt.drivers", "vbatt.config"},
    "vbatt.cli": None,  # None: anything
    "vbatt.soak": None,
    "vbatt.scenario": None,  # the scenario runner (vbatt simulate), once it lands
}


def _room(mod: str) -> str:
    best = ""
    for r in ALLOWED:
        if (mod == r or mod.startswith(r + ".")) and len(r) > len(best):
            best = r
    return best or mod


def _module(top: str, path: Path) -> str:
    parts = [p for p in path.relative_to(REPO / top).with_suffix("").parts if p != "__init__"]
    return ".".join([TOPS[top], *parts])


def _imports(tree: ast.AST):
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("vbatt"):
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("vbatt"):
                    yield node.lineno, a.name, []


def _edges():
    for top in TOPS:
        for path in sorted((REPO / top).rglob("*.py")):
            if ".venv" in path.parts:
                continue
            mod = _module(top, path)
            tree = ast.parse(path.read_text(), str(path))
            for line, target, names in _imports(tree):
                # `from vbatt.x import y` may name a submodule y
                targets = [f"{target}.{n}" for n in names] or [target]
                yield path, line, mod, targets, target


def test_no_relative_imports_between_rooms():
    """Absolute imports only: a room's dependencies are greppable and this test sees them all."""
    bad = []
    for top in TOPS:
        for path in (REPO / top).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level > 1:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not bad, bad


def test_imports_run_one_way():
    bad = []
    for path, line, mod, targets, target in _edges():
        src = _room(mod)
        allowed = ALLOWED.get(src, set())
        if allowed is None:
            continue
        for t in targets:
            dst = _room(t) if _room(t) in ALLOWED else _room(target)
            if dst == src or dst.startswith(src + ".") or t.startswith(src + ".") or target.startswith(src + "."):
                continue
            if not any(t == a or t.startswith(a + ".") or target == a or target.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(REPO)}:{line}: {src} imports {t}")
    assert not bad, "imports against the room order:\n" + "\n".join(sorted(set(bad)))


def test_the_kernel_knows_no_room_above_it():
    """The rule the issue names, spelled out on its own: the kernel imports nothing from drivers,
    programs, opcua_models, config or supervision."""
    above = ("vbatt.drivers", "vbatt.programs", "vbatt.opcua_models", "vbatt.config", "vbatt.supervise",
             "vbatt.cli", "vbatt.retain", "vbatt.soak", "vbatt.scenario")
    bad = [f"{p.relative_to(REPO)}:{line} imports {target}" for p, line, mod, _, target in _edges()
           if mod.startswith("vbatt.kernel") and target.startswith(above)]
    assert not bad, bad


@pytest.mark.parametrize("room", sorted(r for r in ALLOWED if r.count(".") == 1 and r != "vbatt.scenario"))
def test_every_room_exists(room):
    import importlib

    importlib.import_module(room)
