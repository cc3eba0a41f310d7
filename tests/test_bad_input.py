"""Files that are not UTF-8 text, given where vbatt expects a config, a trace or a program:
exit 2 with one problem line naming the file, no traceback (issue #10, part 5)."""

from __future__ import annotations

import codecs
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_vbatt
from vbatt.config import load_config
from vbatt.config.textfile import read_text_file
from vbatt.config.yamlsrc import ConfigError

GOOD = "nodes:\n  - {id: a, demand_w: 100, max_discharge_w: 200, capacity_wh: 500}\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"


def _random_binary() -> bytes:
    rnd = random.Random(10)  # fixed: the same bytes every run
    return bytes(rnd.randrange(256) for _ in range(200)) + b"\x00" + bytes(rnd.randrange(256) for _ in range(50))


# name -> (bytes of the file, what the one problem line must say)
BAD_FILES = {
    "latin1": ("nodes:\n  - {id: café}\n".encode("latin-1"), ":2: not UTF-8 (byte 0xE9 at byte offset 19"),
    "binary": (_random_binary(), "binary data (NUL byte at byte offset"),
    "png": (PNG, ":3: binary data (NUL byte at byte offset 8)"),
    "utf16": (GOOD.encode("utf-16"), ":1: the file is UTF-16 text (byte order mark at byte 0)"),
    "utf32": (GOOD.encode("utf-32"), ":1: the file is UTF-32 text (byte order mark at byte 0)"),
    "empty": (b"", ":1: the file is empty"),
    "directory": (None, ": is a directory; expected a UTF-8 text YAML file"),
}


def _make(tmp_path: Path, name: str) -> Path:
    data, _ = BAD_FILES[name]
    p = tmp_path / f"{name}.yaml"
    if data is None:
        p.mkdir()
    else:
        p.write_bytes(data)
    return p


def _assert_one_line_error(r, path: Path, says: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Error:" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"configuration error: {path}"), r.stderr
    assert says in lines[0], r.stderr
    if "empty" not in says:
        assert "expected a UTF-8 text" in lines[0], r.stderr


@pytest.mark.parametrize("name", sorted(BAD_FILES))
@pytest.mark.parametrize("command", [("check",), ("run", "--cycles", "1", "-q"), ("reload",)])
def test_config_that_is_not_text(tmp_path, name, command):
    path = _make(tmp_path, name)
    r = run_vbatt(command[0], str(path), *command[1:], timeout=60)
    _assert_one_line_error(r, path, BAD_FILES[name][1])
    assert r.stdout == ""  # run started nothing (no summary line), check printed no "ok"


@pytest.mark.parametrize("name", ["latin1", "png", "utf16", "directory"])
def test_node_agent_config_that_is_not_text(tmp_path, name):
    path = _make(tmp_path, name)
    r = run_vbatt("node", str(path), timeout=60)
    _assert_one_line_error(r, path, BAD_FILES[name][1])


TRACE_BAD = {
    "binary": (_random_binary(), ":1: binary data (NUL byte at byte offset"),
    "png": (PNG, ":3: binary data (NUL byte at byte offset 8)"),
    "latin1": ("# Leistung in W für Knoten A\n100\n200\n".encode("latin-1"), ":1: not UTF-8 (byte 0xFC"),
    "utf16": ("100\n200\n".encode("utf-16"), ":1: the file is UTF-16 text"),
    "not_a_number": (b"demand_w\n100\n20O\n", ":3: not a number: '20O'"),
    "nan": (b"100\nnan\n", ":2: 'nan' is not a finite number"),
    "no_column": (b"1,2\n3\n", ":2: no column 1 (the line has 1)"),
    "no_samples": (b"# nothing\n", ": no samples"),
}


@pytest.mark.parametrize("name", sorted(TRACE_BAD))
@pytest.mark.parametrize("command", [("check",), ("run", "--cycles", "1", "-q"), ("reload",)])
def test_csv_trace_that_is_not_a_trace(tmp_path, name, command):
    data, says = TRACE_BAD[name]
    trace = tmp_path / f"{name}.csv"
    trace.write_bytes(data)
    column = 1 if name == "no_column" else 0
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(f"nodes:\n  - id: a\n    demand_profile: {{kind: csv, path: '{trace}', column: {column}}}\n")
    r = run_vbatt(command[0], str(cfg), *command[1:], timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    # the config's own line, then the trace file with its line
    assert lines[0].startswith(f"configuration error: {cfg}:3: nodes[0].demand_profile: "), r.stderr
    assert f"{trace}{says}" in lines[0], r.stderr
    assert r.stdout == ""


def test_good_trace_with_header_and_utf8_bom_is_read(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_bytes(codecs.BOM_UTF8 + "t_s,Leistung für A (W)\n0,100\n1,250.5\n".encode())
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(f"nodes:\n  - id: a\n    demand_profile: {{kind: csv, path: '{trace}', column: 1}}\n")
    r = run_vbatt("check", str(cfg), timeout=60)
    assert r.returncode == 0, r.stderr
    from vbatt.drivers.sim.trace import read_trace

    assert read_trace(str(trace), 1).tolist() == [100.0, 250.5]


def test_user_program_file_that_is_not_text(tmp_path):
    prog = tmp_path / "prog.py"
    prog.write_bytes(b"from numba import njit\n@njit\ndef f(soc):\n    pass  # r\xe9serve\n")
    cfg = tmp_path / "plant.yaml"
    cfg.write_text(GOOD + f"programs:\n  - user:\n      steps:\n        - {{function: '{prog}:f', writes: []}}\n"
                   "  - safe_allocation\n")
    r = run_vbatt("check", str(cfg), timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"configuration error: {cfg}:"), r.stderr
    assert f"{prog}:4: not UTF-8 (byte 0xE9" in lines[0] and "expected a UTF-8 Python source file" in lines[0]


def test_utf8_with_bom_config_is_accepted(tmp_path):
    p = tmp_path / "bom.yaml"
    p.write_bytes(codecs.BOM_UTF8 + GOOD.encode())
    cfg, fleet = load_config(p)
    assert fleet.ids == ["a"]


def test_unreadable_path_says_what_is_expected(tmp_path):
    with pytest.raises(ConfigError) as info:
        read_text_file(tmp_path / "missing.yaml", "a UTF-8 text YAML file")
    assert info.value.problems == [f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory; "
                                   f"expected a UTF-8 text YAML file"]


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: GOOD.encode() + b),  # a good start, a broken end
    st.text(max_size=100).map(lambda t: (GOOD + t).encode(st_encoding(t))),
))
def test_any_bytes_load_or_give_one_line_problems(tmp_path, data):
    """Whatever the bytes, loading gives a fleet or ConfigError problems that are single lines
    starting with the file name: never a UnicodeDecodeError or another exception."""
    p = tmp_path / "fuzz.yaml"
    p.write_bytes(data)
    try:
        load_config(p)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.startswith(str(p)) and "\n" not in problem, problem


def st_encoding(text: str) -> str:
    """An encoding other than UTF-8 where the text allows one (so the bytes are not UTF-8)."""
    try:
        text.encode("latin-1")
        return "latin-1"
    except UnicodeEncodeError:
        return "utf-16"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from vbatt.drivers.certs import make_fleet_certs

    d = tmp_path_factory.mktemp("pki")
    make_fleet_certs(d, 1)
    return d


@pytest.mark.parametrize("case", ["binary_ca", "png_cert", "key_of_another", "missing_key"])
def test_node_agent_tls_files_that_are_not_pem(tmp_path, pki, case):
    ca, cert, key = pki / "ca.pem", pki / "node-0.pem", pki / "node-0.key"
    junk = tmp_path / "junk.pem"
    junk.write_bytes(_random_binary() if case == "binary_ca" else PNG)
    ca, cert, key, says = {
        "binary_ca": (junk, cert, key, f"{junk}: not a CA certificate"),
        "png_cert": (ca, junk, key, f"{junk} with key {key}: not a certificate and its private key"),
        "key_of_another": (ca, cert, pki / "controller.key", f"{cert} with key {pki / 'controller.key'}: "
                                                              f"not a certificate and its private key"),
        "missing_key": (ca, cert, tmp_path / "none.key", f"TLS file not found: {tmp_path / 'none.key'}"),
    }[case]
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"id: n1\nport: 0\ntls: {{ca: '{ca}', cert: '{cert}', key: '{key}'}}\n"
                   "backend: {kind: sim, demand_w: 10, max_discharge_w: 10, max_charge_w: 10, capacity_wh: 10}\n")
    r = run_vbatt("node", str(cfg), timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"configuration error: {cfg}:3: tls: "), r.stderr
    assert says in lines[0], r.stderr
