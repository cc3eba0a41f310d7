"""Retentive state: save (encode + write + fsync + rename + directory fsync) and load, against N.

The arrays are what a warm restart needs per node (trip, alarm, priority, forecast
level and trend, energy counter) plus the aggregates; on the real disk of the
machine (tmp_path), with fsync, because that is the cost a controller pays.
Each save's own duration is attached as latency samples (`save_us`).
"""

from __future__ import annotations

import numpy as np
import pytest

from vbatt.retain.store import RetainStore


def state(n: int) -> tuple[dict[str, np.ndarray], dict]:
    rng = np.random.default_rng(n)
    arrays = {
        "node.trip": rng.integers(0, 4, n).astype(np.uint32),
        "node.alarm": rng.integers(0, 4, n).astype(np.uint32),
        "node.priority": rng.integers(0, 4, n).astype(np.int64),
        "forecast.level": rng.uniform(0, 1000, n),
        "forecast.trend": rng.normal(0, 1, n),
        "energy.wh": rng.uniform(0, 1e6, n),
        "agg.main_limit_w": np.array([20_000.0]),
        "ctl.mode": np.array([1], dtype=np.int64),
    }
    return arrays, {"kind": "vbatt", "node_ids": [f"n{i}" for i in range(n)], "config_hash": "0" * 64}


@pytest.mark.parametrize("n", [1_000, 100_000], ids=lambda n: f"n={n}")
def test_save(benchmark, tmp_path, latency, n):
    arrays, meta = state(n)
    store = RetainStore(tmp_path)
    benchmark.group = "retain: save (fsync)"
    benchmark.extra_info["n"] = n
    benchmark.extra_info["file_bytes"] = None
    benchmark.pedantic(store.save, args=(arrays, meta), rounds=30 if n > 10_000 else 100, warmup_rounds=2)
    benchmark.extra_info["file_bytes"] = (tmp_path / "state.bin").stat().st_size
    if benchmark.stats is not None:  # None when run with --benchmark-disable (one plain call)
        latency(benchmark, "save", [t * 1e6 for t in benchmark.stats.stats.data])
    assert store.load().state.seq >= 1


@pytest.mark.parametrize("n", [1_000, 100_000], ids=lambda n: f"n={n}")
def test_load(benchmark, tmp_path, n):
    arrays, meta = state(n)
    store = RetainStore(tmp_path)
    store.save(arrays, meta)
    store.save(arrays, meta)
    benchmark.group = "retain: load (read + verify + decode)"
    benchmark.extra_info["n"] = n
    got = benchmark(store.load)
    assert got.source == "current" and np.array_equal(got.state.arrays["energy.wh"], arrays["energy.wh"])
