"""Fuzzing the config loader: every input loads, or is refused with `source:LINE: ...` problems.

Four generators feed `load_config_text`: YAML documents built from the config
vocabulary, raw YAML-ish text, text mutations of the shipped configs
(runtime/default.yaml, examples/*.yaml) and structural mutations of them. The
oracle: the result is a (Config, Fleet), or a ConfigError whose every problem is
one line starting with the source and a line number inside the document. Any
other exception, or an input that takes longer than HANG_S, fails the test.

The crashes this fuzzer found are pinned as ordinary cases in tests/test_config.py.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import examples
from vbatt.config.plant import RANGED, Config, ConfigError, Fleet, load_config_text

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8")
           for p in [ROOT / "runtime" / "default.yaml", *sorted((ROOT / "examples").glob("*.yaml"))]}
SOURCE = "fuzz/plant.yaml"
HANG_S = 20  # far above the slowest legitimate load here (~1 s for a 10^6-node template)
YAML_BREAK = re.compile("\r\n|[\n\r\x85\u2028\u2029]")  # what YAML counts as a new line
PROBLEM = re.compile(rf"^{re.escape(SOURCE)}:(\d+): \S")

# More examples for a long exploratory run: `make fuzz` (HYPOTHESIS_PROFILE=fuzz, see conftest.py), or
# VBATT_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_config.py
FUZZ = settings(max_examples=int(os.environ.get("VBATT_FUZZ_EXAMPLES", examples(200, fuzz_share=0.2))),
                deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def _at_repo_root():
    # Shipped configs name files relative to the repository (examples/user_program.py).
    old = os.getcwd()
    os.chdir(ROOT)
    yield
    os.chdir(old)


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"load_config_text took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def check(text: str) -> None:
    """The oracle."""
    try:
        with time_limit(HANG_S):
            got = load_config_text(text, SOURCE)
    except ConfigError as exc:
        assert exc.problems, "ConfigError without problems"
        n_lines = len(YAML_BREAK.split(text))
        for p in exc.problems:
            assert isinstance(p, str) and "\n" not in p, f"problem is not one line: {p!r}"
            m = PROBLEM.match(p)
            assert m, f"problem does not start with '{SOURCE}:LINE: ': {p!r}"
            assert 1 <= int(m.group(1)) <= n_lines, f"line {m.group(1)} outside 1..{n_lines}: {p!r}"
        return
    except Exception as exc:
        raise AssertionError(f"{type(exc).__name__} instead of ConfigError for:\n{text}") from exc
    cfg, fleet = got
    assert isinstance(cfg, Config) and isinstance(fleet, Fleet)
    assert len(fleet) >= 1 and len(set(fleet.ids)) == len(fleet.ids)
    assert all(len(v) == len(fleet) for v in fleet.values.values())


# -- generators ------------------------------------------------------------------
KEYS = sorted({
    "cycle", "plant", "drivers", "opcua", "nodes", "programs", "template",
    "cycle_ms", "spin_us", "watchdog_overruns", "safe_state", "realtime", "fifo_priority", "stats_window",
    "start_timeout_s", "main_limit_w", "stale_ms", "sim", "modbus", "period_ms", "processes",
    "id", "driver", "priority", "demand_w", "demand_profile", "max_discharge_w", "max_charge_w",
    "capacity_wh", "soc", "temperature_c", "link_max_w", "physics", "count", "start", "seed",
    "kind", "amplitude_w", "period_s", "noise_w", "phase_s", "at_s", "to_w", "path", "dt_s", "column",
    "ocv_empty_v", "ocv_full_v", "resistance_ohm", "charge_efficiency", "discharge_efficiency",
    "ambient_c", "thermal_resistance_k_per_w", "thermal_capacity_j_per_k", "safe_allocation",
    "host", "port", "unit", "endpoint", "security", "enabled",
})


def _model_keys() -> set[str]:
    """Every key the config models know, so that generated documents get past 'unknown key'."""
    import typing

    from pydantic import BaseModel

    from vbatt.config import plant as c

    keys: set[str] = set()
    seen: set[type] = set()

    def walk(t) -> None:
        if isinstance(t, type) and issubclass(t, BaseModel):
            if t not in seen:
                seen.add(t)
                for name, f in t.model_fields.items():
                    keys.add(name)
                    walk(f.annotation)
            return
        for a in typing.get_args(t):
            walk(a)

    from vbatt.drivers.registry import driver_specs

    for m in (c.Config, c.NodeConfig, c.TemplateConfig, *(s.node for s in driver_specs().values() if s.node)):
        walk(m)
    return keys


def _program_params() -> dict[str, list[str]]:
    from vbatt.programs.registry import known_programs, program_class

    # `user` imports the modules its steps name (a config is trusted like code): never fuzz that.
    return {p: sorted(program_class(p).Params.model_fields) for p in known_programs() if p != "user"}


KEYS = sorted(set(KEYS) | _model_keys())
PROGRAMS = _program_params()
WORDS = ["sim", "modbus", "opcua", "can", "sine", "step", "csv", "own_battery", "zero", "safe_allocation",
         "n{i}", "rack-{i:04d}", "{i}{i}", "{j}", "{i!r}", "{", "}", "A", "B", "", " ", "\t", "a b",
         "/nonexistent.csv", "yes", "no", "on", "null", "~", ".inf", "-.inf", ".nan", "0x1F", "0o17", "1_000",
         "2001-12-14", "12:30:45", "1e400", "-0", "é", "\u2028", "x" * 80]
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-5, 2000), st.integers(), st.sampled_from([0, 1, 2, 10, 100, 1000, 10**6 + 1, 2**63, -2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 2),
    st.sampled_from(WORDS), st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)), max_leaves=25)
node = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)
template = st.fixed_dictionaries({"template": st.dictionaries(st.sampled_from(KEYS), values, max_size=8)})

@st.composite
def program_list(draw) -> list:
    out = []
    for pid in draw(st.lists(st.sampled_from(sorted(PROGRAMS) + ["nope"]), max_size=5)):
        fields = PROGRAMS.get(pid, [])
        if not fields or draw(st.booleans()):
            out.append(pid)
        else:
            params = draw(st.dictionaries(st.one_of(st.sampled_from(fields), keys), values, max_size=6))
            out.append({pid: params})
    return out


document = st.fixed_dictionaries(
    {"nodes": st.lists(st.one_of(node, template, values), max_size=4)},
    optional={**{k: st.one_of(values, st.dictionaries(st.sampled_from(KEYS), values, max_size=4))
                 for k in ("cycle", "plant", "drivers", "opcua")},
              "programs": st.one_of(program_list(), values)},
)


def dump(data, flow: bool, unicode: bool) -> str:
    return yaml.safe_dump(data, default_flow_style=flow, allow_unicode=unicode, sort_keys=False)


YAMLISH = st.lists(st.sampled_from(list(":-[]{},&*!|>'\"#%@`?~. \n\t") + list("abnoz019_{}") +
                                    ["nodes", "id", "template", "count", "  ", "- ", ": ", "&a ", "*a",
                                     "!!int ", "!!set ", "<<: ", "\ufeff", "\x00", "\x85"]),
                   max_size=60).map("".join)

TOKENS = ["", " ", "  ", "-", "- ", ":", ": ", "[", "]", "{", "}", ",", "&x ", "*x", "!!str ", "!!float ",
          "!!binary ", "!!python/object:os.system ", "|", ">", "#", "'", '"', "\n", "\t", "~", ".nan",
          "-1", "1e400", "99999999999999999999", "0.5", "x", "{i}", "nodes", "template", "<<: *x"]


@st.composite
def mutated_text(draw) -> str:
    name = draw(st.sampled_from(sorted(SHIPPED)))
    text = SHIPPED[name]
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["delete", "insert", "dup_line", "swap_lines", "indent", "number", "truncate"]))
        lines = text.split("\n")
        if op == "delete" and text:
            a = draw(st.integers(0, len(text) - 1))
            text = text[:a] + text[a + draw(st.integers(1, 40)):]
        elif op == "insert":
            a = draw(st.integers(0, len(text)))
            text = text[:a] + draw(st.sampled_from(TOKENS)) + text[a:]
        elif op == "dup_line":
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            text = "\n".join(lines)
        elif op == "swap_lines":
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif op == "indent":
            i = draw(st.integers(0, len(lines) - 1))
            lines[i] = " " * draw(st.integers(0, 6)) + lines[i].lstrip(" ")
            text = "\n".join(lines)
        elif op == "number":
            nums = list(re.finditer(r"-?\d+(\.\d+)?", text))
            if nums:
                m = draw(st.sampled_from(nums))
                text = text[:m.start()] + draw(st.sampled_from(TOKENS[-9:] + ["0", "-0.0", "1000001"])) + text[m.end():]
        elif op == "truncate":
            text = text[:draw(st.integers(0, len(text)))]
    return text


def _paths(data, path=()):
    yield path
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, path + (i,))


@st.composite
def mutated_structure(draw):
    data = yaml.safe_load(SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))])
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(_paths(data))))
        if not path:
            continue
        parent = data
        for p in path[:-1]:
            parent = parent[p]
        op = draw(st.sampled_from(["replace", "delete", "add_key", "wrap"]))
        last = path[-1]
        if op == "replace":
            parent[last] = draw(values)
        elif op == "delete":
            del parent[last]
        elif op == "add_key" and isinstance(parent, dict):
            parent[draw(keys)] = draw(values)
        elif op == "wrap":
            parent[last] = [parent[last]] if draw(st.booleans()) else {"x": parent[last]}
    return data


# -- the tests -----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_load_as_written(name):
    """Each shipped config loads to what its text says, read here independently of the loader: the node
    ids in order (templates expanded), every value given for a node (a [low, high] range: inside it),
    the plant settings and the programs with their parameters, in order."""
    import numpy as np

    doc = yaml.safe_load(SHIPPED[name])
    cfg, fleet = load_config_text(SHIPPED[name], SOURCE)
    want_ids, k = [], 0
    for entry in doc["nodes"]:
        t = entry.get("template")
        body, count = (t, t["count"]) if t else (entry, 1)
        want_ids += [t["id"].format(i=t.get("start", 0) + i) for i in range(count)] if t else [entry["id"]]
        for f in RANGED:
            v = body.get(f)
            got = fleet.values[f][k:k + count]
            if isinstance(v, list):
                assert np.all((got >= v[0]) & (got <= v[1])), (name, want_ids[-1], f, v)
            elif isinstance(v, (int, float)):
                assert np.all(got == v), (name, want_ids[-1], f, v, got[:3])
        k += count
    assert fleet.ids == want_ids
    for key, v in (doc.get("plant") or {}).items():
        assert getattr(cfg.plant, key) == v, (name, key)
    progs = [(p, {}) if isinstance(p, str) else next(iter(p.items())) for p in doc.get("programs", [])]
    assert [e.id for e in cfg.programs] == ([pid for pid, _ in progs] or ["safe_allocation"])
    for e, (_, params) in zip(cfg.programs, progs):
        got = e.params.model_dump(mode="json")
        for key, v in (params or {}).items():
            assert got[key] == v, (name, e.id, key, got[key], v)


@FUZZ
@given(document, st.booleans(), st.booleans())
def test_generated_documents_load_or_name_line_and_key(data, flow, unicode):
    check(dump(data, flow, unicode))


@FUZZ
@given(st.one_of(YAMLISH, st.text(max_size=200)))
def test_arbitrary_text_loads_or_is_a_clear_error(text):
    check(text)


@FUZZ
@given(mutated_text())
def test_text_mutations_of_shipped_configs(text):
    check(text)


@FUZZ
@given(mutated_structure(), st.booleans())
def test_structural_mutations_of_shipped_configs(data, flow):
    check(dump(data, flow, True))


# Hostile shapes, each once: they must be refused quickly with a line number.
HOSTILE = {
    "deep_nesting": "nodes: " + "[" * 5000 + "]" * 5000 + "\n",
    "recursive_alias": "nodes: &a [*a]\n",
    "recursive_map_alias": "nodes:\n  - &n {id: A, physics: *n}\n",
    "billion_laughs": "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] +
                                [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)] +
                                ["nodes: *a9"]),
    "alias_chain": "\n".join(["a0: &a0 [1]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(1, 2000)]),
    "python_tag": "nodes: !!python/object/apply:os.system ['true']\n",
    "unknown_tag": "nodes:\n  - !thing {id: A}\n",
    "bad_int_tag": "nodes:\n  - {id: A, priority: !!int abc}\n",
    "bad_timestamp": "nodes: !!timestamp 2020-99-99\n",
    "set_tag": "nodes: !!set {a, b}\n",
    "control_char": "nodes:\n  - {id: A}\n\x07\n",
    "lone_surrogate": "nodes:\n  - {id: \ud800}\n",
    "newline_key": 'nodes:\n  - {id: A, "x\\ny": 1}\n',
    "two_documents": "nodes: [{id: A}]\n---\nnodes: [{id: B}]\n",
    "undefined_alias": "nodes: [*nope]\n",
    "bom_then_tab": "\ufeff\tnodes: []\n",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_documents_are_refused_with_a_line(name):
    with pytest.raises(ConfigError):
        with time_limit(5):
            load_config_text(HOSTILE[name], SOURCE)
    check(HOSTILE[name])


# -- crashes in runtime/config/plant.py (owned by the lead), reported with these reproducers --------
