"""Benchmark collection, machine description and the `extra_info` conventions `benchmarks/report.py` reads.

Run: `pytest benchmarks --benchmark-enable --benchmark-json=benchmarks/results.json`,
then `python -m benchmarks.report` writes benchmarks/REPORT.md and benchmarks/plots/*.png.

Conventions (plain `benchmark.extra_info` keys, so a bench needs nothing from here):

* ``benchmark.group``: one table per group in the report; name groups "area: what",
  e.g. "scan: latch + publish", "modbus: poll 100 nodes".
* ``extra_info["n"] = <int>``: problem size (nodes). Every benchmark with an `n`
  lands on the "time against N" log-log plot; one line per (group, test
  function, other params), so parametrize N and keep the group fixed.
* ``extra_info["solver"] = "allocator" | "highs" | ...`` together with `n` (and
  optionally ``extra_info["problem"]`` when several instance families exist):
  benchmarks of the same problem and `n` with different solvers are paired on the
  allocator-against-HiGHS plot and table. A parametrize argument named `solver`
  works the same; failing both, a benchmark whose name contains "highs" is paired
  with the other benchmarks of its group at the same `n`.
* Latency, in microseconds, under a key ending in ``_us``:
  - a list of samples: ``extra_info["wake_latency_us"] = [41.2, 39.8, ...]``
    (keep it under ~20,000 values, the JSON is committed; `attach_latency` below
    turns more into a histogram plus exact percentiles);
  - or a summary dict ``{"count", "p50", "p99", "p99.9", "max", "mean"}``;
  - and/or a histogram under ``<metric>_hist_us``: ``[[upper_edge_us, count], ...]``
    (the form `vbatt.kernel.stats.histogram` produces).
  Every such metric gets a row in the latency table and a histogram plot.
"""

from __future__ import annotations

import fnmatch
import os
import platform
from importlib import metadata

import numpy as np
import pytest

__all__ = ["attach_latency", "LATENCY_SAMPLES_MAX"]

LATENCY_SAMPLES_MAX = 20_000


def pytest_collect_file(file_path, parent):
    """Collect `bench_*.py` (pyproject's python_files only names test_*.py)."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path) or any(
            fnmatch.fnmatch(file_path.name, pat) for pat in parent.config.getini("python_files")):
        return None  # collected by pytest itself (named on the command line, or matched by python_files)
    return pytest.Module.from_parent(parent, path=file_path)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_facts() -> dict:
    """What the report's machine section shows beyond pytest-benchmark's own machine_info."""
    versions = {}
    for dist in ("vbatt", "numpy", "numba", "llvmlite", "scipy", "highspy", "pymodbus", "asyncua", "pydantic",
                 "pytest-benchmark"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu_model": _cpu_model(), "cores_online": os.cpu_count(), "cores_usable": usable,
            "memory_gib": _memory_gib(), "kernel": platform.release(), "os": platform.platform(),
            "python": platform.python_version(), "loadavg_at_start": load, "versions": versions}


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["vbatt"] = machine_facts()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Drop the per-round timings from the JSON: results.json is committed, and for a
    microsecond benchmark they are megabytes nobody reads (the report uses the stats;
    latency samples go to extra_info). VBATT_BENCH_KEEP_DATA=1 keeps them."""
    if os.environ.get("VBATT_BENCH_KEEP_DATA") == "1":
        return
    for b in output_json.get("benchmarks", []):
        (b.get("stats") or {}).pop("data", None)


def attach_latency(extra_info: dict, metric: str, samples_us, max_samples: int = LATENCY_SAMPLES_MAX) -> None:
    """Store latency samples (µs) under `<metric>_us` by the convention above.

    Up to `max_samples` are stored raw; beyond that, exact percentiles
    (`<metric>_us` as a summary dict) and a log-spaced histogram
    (`<metric>_hist_us`, 32 buckets per octave) keep the JSON small.
    """
    a = np.asarray(samples_us, dtype=np.float64)
    if a.size <= max_samples:
        extra_info[f"{metric}_us"] = [round(float(x), 3) for x in a]
        return
    extra_info[f"{metric}_us"] = {
        "count": int(a.size), "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3), "p99.9": round(float(np.percentile(a, 99.9)), 3),
        "max": round(float(a.max()), 3), "mean": round(float(a.mean()), 3)}
    edges = 2.0 ** (np.arange(0, 32 * 40 + 1) / 32.0) - 1.0  # 0 .. ~10^12 µs, ~2 % wide buckets
    counts, _ = np.histogram(np.clip(a, 0, edges[-1]), bins=edges)
    nz = np.nonzero(counts)[0]
    extra_info[f"{metric}_hist_us"] = [[round(float(edges[i + 1]), 4), int(counts[i])] for i in nz]


@pytest.fixture
def latency():
    """`latency(benchmark, "save", samples_us)`: attach_latency on the benchmark's extra_info."""
    return lambda benchmark, metric, samples_us: attach_latency(benchmark.extra_info, metric, samples_us)
