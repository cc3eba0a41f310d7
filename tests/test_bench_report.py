"""benchmarks/report.py: from pytest-benchmark JSON to REPORT.md and PNGs, on any subset of the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")  # the `bench` extra; `make test` installs it
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.report import EXPECTED, build_report, main, solver_pairs  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def bench(fullname: str, group: str, median: float, extra: dict | None = None, params: dict | None = None) -> dict:
    name = fullname.split("::")[1]
    return {"group": group, "name": name, "fullname": fullname, "params": params, "extra_info": extra or {},
            "stats": {"min": median * 0.9, "max": median * 2, "mean": median * 1.1, "stddev": median * 0.1,
                      "median": median, "ops": 1 / (median * 1.1), "rounds": 10}}


def results(benchmarks: list[dict]) -> dict:
    return {"machine_info": {"python_version": "3.11.7", "system": "Linux", "release": "6.1",
                             "cpu": {"brand_raw": "Test CPU", "count": 2},
                             "vbatt": {"cpu_model": "Test CPU model", "cores_online": 2, "cores_usable": 2,
                                       "kernel": "6.1-test", "versions": {"numpy": "2.0", "numba": "0.60"}}},
            "commit_info": {"id": "abcdef0123456789", "dirty": False, "branch": "main"},
            "datetime": "2026-11-24T07:00:00", "benchmarks": benchmarks}


SUITE = [
    # the lead's bench_scan shape: summary dicts + [[edge, count]] histogram, and n-scaled cost
    bench("benchmarks/bench_scan.py::test_wake_latency[10ms-idle]", "scan: wake latency 10 ms", 0.5,
          {"wake_latency_us": {"count": 1000, "p50": 45.0, "p99": 130.0, "p99.9": 300.0, "max": 900.0},
           "wake_latency_hist_us": [[40.0, 300], [45.0, 500], [130.0, 190], [900.0, 10]],
           "exec_us": {"count": 1000, "p50": 5.0, "p99": 9.0, "p99.9": 12.0, "max": 20.0}},
          {"period_ms": 10.0, "busy": False}),
    bench("benchmarks/bench_scan.py::test_latch_and_publish[n=1000]", "scan: latch + publish", 2e-6, {"n": 1000},
          {"engine": 1000}),
    bench("benchmarks/bench_scan.py::test_latch_and_publish[n=100000]", "scan: latch + publish", 2e-4,
          {"n": 100000}, {"engine": 100000}),
    # solver pairs by extra_info
    *[bench(f"benchmarks/bench_programs.py::test_solve[{s}-{n}]", "programs: allocation", t,
            {"n": n, "solver": s, "problem": "water-filling"}, {"solver": s, "n": n})
      for s, n, t in [("allocator", 100, 1e-5), ("highs", 100, 1e-3), ("allocator", 10000, 1e-3),
                      ("highs", 10000, 0.2)]],
    # raw samples
    bench("benchmarks/bench_modbus.py::test_poll", "modbus: poll", 0.01, {"poll_latency_us": [100.0, 120.0, 5000.0]}),
]


def test_report_has_machine_tables_latency_scaling_and_solver_ratio(tmp_path):
    out = tmp_path / "REPORT.md"
    text = build_report(results(SUITE), out, tmp_path / "plots", ROOT / "benchmarks")
    assert out.read_text() == text
    assert "| CPU | Test CPU model" in text and "| kernel | Linux 6.1-test |" in text
    assert "| numba | 0.60 |" in text and "abcdef012345" in text
    for g in ("scan: wake latency 10 ms", "scan: latch + publish", "programs: allocation", "modbus: poll"):
        assert f"### {g}" in text
    assert "| test_latch_and_publish[n=1000] | µs | 1.80 | 2.00 | 2.20 | 4.00 | 0.200 |" in text
    # latency: summary dict, samples and histogram, one plot per metric
    assert "| wake_latency | scan: wake latency 10 ms: test_wake_latency[10ms-idle] | 1000 | 45.0 | 130 | 300 | 900 |" in text
    assert "| poll_latency | modbus: poll: test_poll | 3 | 120 | 5,000 | 5,000 | 5,000 |" in text
    for png in ("latency_wake_latency.png", "latency_poll_latency.png", "time_vs_n.png", "solvers_water_filling.png"):
        assert (tmp_path / "plots" / png).read_bytes().startswith(PNG), png
        assert f"](plots/{png})" in text
    # exec_us has only a summary: a table row, and a plot only when there is something to draw
    assert "| exec | " in text and not (tmp_path / "plots" / "latency_exec.png").exists()
    # scaling: slope of latch+publish is 1 (2 µs -> 200 µs over 100x)
    assert "| scan: latch + publish: test_latch_and_publish | – | 2.00 µs | – | 200 µs | 1.00 |" in text
    # solver table: HiGHS / allocator ratio per N
    assert "| 100 | 10.0 µs | 1.00 ms | 100× |" in text
    assert "| 10,000 | 1.00 ms | 200 ms | 200× |" in text
    # coverage: OPC UA and startup did not run
    assert "| OPC UA server updates | bench_opcua.py" in text and "**missing**" in text
    assert "Missing: OPC UA server updates, OPC UA client driver, startup, retentive state." in text


def test_empty_results_still_give_a_report_that_says_what_is_missing(tmp_path):
    text = build_report(results([]), tmp_path / "R.md", tmp_path / "plots", ROOT / "benchmarks")
    assert "No benchmark attached latency samples" in text and "No benchmark set" in text
    assert "No paired solver benchmarks" in text
    assert text.count("**missing**") == len(EXPECTED)
    assert not list((tmp_path / "plots").glob("*.png"))


def test_stale_plots_are_removed(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "old_bench.png").write_bytes(PNG)
    build_report(results(SUITE[:1]), tmp_path / "R.md", tmp_path / "plots", ROOT / "benchmarks")
    assert not (tmp_path / "plots" / "old_bench.png").exists()


def test_highs_is_paired_by_name_when_no_solver_is_declared():
    b = [bench("benchmarks/bench_programs.py::test_allocator[n=100]", "alloc", 1e-5, {"n": 100}),
         bench("benchmarks/bench_programs.py::test_highs[n=100]", "alloc", 1e-3, {"n": 100})]
    pairs = solver_pairs(b)
    assert set(pairs["alloc"][100]) == {"allocator", "highs"}


def test_baseline_ratio_and_cli_errors(tmp_path, capsys):
    res = tmp_path / "results.json"
    base = tmp_path / "base.json"
    res.write_text(json.dumps(results(SUITE)))
    slower = [dict(b, stats=dict(b["stats"], median=b["stats"]["median"] / 2)) for b in SUITE[:2]]
    base.write_text(json.dumps(results(slower)))
    assert main(["--results", str(res), "--out", str(tmp_path / "R.md"), "--baseline", str(base)]) == 0
    text = (tmp_path / "R.md").read_text()
    assert "2.00× ⚠" in text and " new |" in text
    assert main(["--results", str(tmp_path / "nope.json"), "--out", str(tmp_path / "R.md")]) == 2
    res.write_text("{not json")
    assert main(["--results", str(res), "--out", str(tmp_path / "R.md")]) == 2
    assert "not a pytest-benchmark JSON file" in capsys.readouterr().err


def _not_a_worker() -> dict:
    """This environment without pytest-xdist's worker variables: pytest-benchmark reads them and, in a
    pytest started from a parallel worker, would disable the benchmarks and write no JSON."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}


@pytest.mark.slow
def test_end_to_end_real_benchmark_run_then_report(tmp_path):
    """The real pipeline on the retain benchmarks: pytest-benchmark JSON, then `python -m benchmarks.report`."""
    res = tmp_path / "results.json"
    subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_retain.py", "-q", "-p", "no:cacheprovider",
                    "--benchmark-enable", f"--benchmark-json={res}", "--benchmark-max-time=0.2"],
                   cwd=ROOT, check=True, timeout=300, capture_output=True, env=_not_a_worker())
    data = json.loads(res.read_text())
    assert data["machine_info"]["vbatt"]["versions"]["numpy"]  # conftest's machine facts were recorded
    assert {b["extra_info"]["n"] for b in data["benchmarks"]} == {1_000, 100_000}
    assert all("data" not in b["stats"] for b in data["benchmarks"])  # per-round timings stripped
    out = tmp_path / "REPORT.md"
    subprocess.run([sys.executable, "-m", "benchmarks.report", "--results", str(res), "--out", str(out),
                    "--no-baseline"], cwd=ROOT, check=True, timeout=120, capture_output=True)
    text = out.read_text()
    assert "### retain: save (fsync)" in text and "| retentive state | bench_retain.py | 4 |" in text
    assert (tmp_path / "plots" / "latency_save.png").read_bytes().startswith(PNG)
    assert (tmp_path / "plots" / "time_vs_n.png").read_bytes().startswith(PNG)
