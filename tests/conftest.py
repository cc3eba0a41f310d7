"""Shared test helpers: run the real `vbatt` command, write configs into tmp_path; hypothesis profiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# One BLAS thread in every test process and every process a test starts, unless the caller chose: the
# reference solvers (scipy, numpy.linalg) factorise small matrices, where OpenBLAS's extra threads only
# spin against each other and against the rest of a loaded machine (a feeder reference, test_hierarchy_
# feeder.py seed 10: 0.7 s with one thread, 5 s with two on a quiet 2-core machine, 65 s in a loaded run).
# Set before numpy is first imported (pytest and its plugins do not import it; OpenBLAS reads it once).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402 (after the BLAS setting above)
from hypothesis import settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _worker_ports() -> str | None:
    """The port range of this pytest-xdist worker (`make test` runs several): gwN gets the N-th block of
    PORT_BLOCK ports from PORT_BASE, all below the system's ephemeral range, so no bind to port 0 in any
    process and no other worker takes them (runtime/kernel/ports.py)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw") or os.environ.get("VBATT_PORTS"):
        return None
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    lo = PORT_BASE + PORT_BLOCK * int(worker[2:])
    return f"{lo}-{lo + PORT_BLOCK - 1}" if lo + PORT_BLOCK <= ephemeral else None


PORT_BASE, PORT_BLOCK = 20000, 500
if _ports := _worker_ports():
    os.environ["VBATT_PORTS"] = _ports  # this process and every process a test starts


def pytest_collection_modifyitems(config, items):
    """In a parallel run the files with `slow` tests start first, the most of them first (each file runs
    in one worker, in the order collected): started last, one of them would be the whole run's tail."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        slow: dict = {}
        for item in items:
            slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
        items.sort(key=lambda item: -slow[item.path])  # stable: the same order in every worker

# Hypothesis profiles. The default run (`make test`) uses each test's own quick count; `make fuzz`
# (HYPOTHESIS_PROFILE=fuzz) explores afresh with FUZZ_EXAMPLES per property (scaled down by a test for
# its slow examples, see `examples`). No example database in the fuzz run: every run starts clean, as a
# fresh clone does.
FUZZ_EXAMPLES = int(os.environ.get("VBATT_FUZZ_PROFILE_EXAMPLES", "3000"))
settings.register_profile("fuzz", max_examples=FUZZ_EXAMPLES, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def examples(quick: int, fuzz_share: float = 1.0) -> int:
    """max_examples of a property: `quick` normally, under the fuzz profile its max_examples times
    `fuzz_share` (a property whose examples take seconds asks for a share), never fewer than quick."""
    if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz":
        return max(quick, int(settings.default.max_examples * fuzz_share))
    return quick
VBATT = [sys.executable, "-m", "vbatt.cli"]


def wait_until(fn, what: str, timeout: float = 20.0, every: float = 0.02):
    """Poll `fn` until it returns something true and return that; fails naming `what` and the last value
    after `timeout` s (a wait for a state, never for a time: generous timeouts cost nothing when it comes)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def run_vbatt(*args: str, timeout: float = 120, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run `vbatt ARGS` as a real process; returns the completed process (text mode)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run([*VBATT, *args], capture_output=True, text=True, timeout=timeout, check=check,
                          env=env, cwd=kw.pop("cwd", REPO), **kw)


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


@pytest.fixture
def write_config(tmp_path):
    """write_config(text, name="plant.yaml") -> path of a config file in tmp_path."""

    def _write(text: str, name: str = "plant.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    return _write
