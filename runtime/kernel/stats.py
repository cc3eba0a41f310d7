"""Cycle statistics kept in the image: histograms over the run, a ring over a sliding window.

Recording is one numba call per cycle and allocates nothing. Histogram buckets
are log-spaced, 64 per octave (each bucket ~1.1 % wide), so percentiles over
months of cycles cost a fixed 20 KiB; the sliding window keeps raw samples, so
its percentiles are exact. Readers (terminal, JSON, OPC UA) compute percentiles
outside the cycle from a copy.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from vbatt.kernel.seqblock import ArraySpec

__all__ = ["METRICS", "stats_specs", "record", "Stats", "summarize", "histogram", "phases", "phase_names"]

METRICS = ("exec_ns", "wake_ns", "jitter_ns")  # work time, release latency, |period - nominal|
PER_OCTAVE = 64
NBINS = 40 * PER_OCTAVE  # up to 2**40 ns (18 min): no sample is dropped


def stats_specs(window: int, phases: int = 2) -> list[ArraySpec]:
    """`phases`: timed phases of a cycle (latch, each program, aggregate + publish)."""
    m = len(METRICS)
    return [
        ArraySpec("stats.phase_last", "i8", (phases,)),
        ArraySpec("stats.phase_max", "i8", (phases,)),
        ArraySpec("stats.phase_sum", "i8", (phases,)),
        ArraySpec("stats.phase_count", "i8", (1,)),
        ArraySpec("stats.hist", "i8", (m, NBINS)),
        ArraySpec("stats.ring", "i8", (m, window)),
        ArraySpec("stats.count", "i8", (m,)),
        ArraySpec("stats.max", "i8", (m,)),
        ArraySpec("stats.sum", "f8", (m,)),
        ArraySpec("stats.last", "i8", (m,)),
    ]


@njit(nogil=True, cache=True)
def _bucket(v):
    if v <= 0:
        return 0
    b = int(math.log2(v + 1.0) * 64.0)
    return b if b < 40 * 64 else 40 * 64 - 1


@njit(nogil=True, cache=True)
def record(hist, ring, count, maxv, total, last, exec_ns, wake_ns, jitter_ns):
    """One cycle's three samples; jitter_ns < 0 means 'no previous cycle' and is skipped."""
    w = ring.shape[1]
    for m in range(3):
        v = exec_ns if m == 0 else (wake_ns if m == 1 else jitter_ns)
        if m == 2 and v < 0:
            continue
        if v < 0:
            v = 0
        hist[m, _bucket(v)] += 1
        ring[m, count[m] % w] = v
        count[m] += 1
        total[m] += v
        last[m] = v
        if v > maxv[m]:
            maxv[m] = v


@njit(nogil=True, cache=True)
def record_phases(stamps, last, maxv, total, count):
    """stamps[k] .. stamps[k+1] is phase k."""
    for k in range(last.shape[0]):
        d = stamps[k + 1] - stamps[k]
        last[k] = d
        total[k] += d
        if d > maxv[k]:
            maxv[k] = d
    count[0] += 1


def phase_names(program_ids: list[str]) -> list[str]:
    return ["latch", *program_ids, "aggregate+publish"]


class Stats:
    """The statistics arrays of an image, bound for recording and for reading."""

    def __init__(self, mem: dict[str, np.ndarray]):
        self.hist = mem["stats.hist"]
        self.ring = mem["stats.ring"]
        self.count = mem["stats.count"]
        self.max = mem["stats.max"]
        self.sum = mem["stats.sum"]
        self.last = mem["stats.last"]
        self.phase_last = mem["stats.phase_last"]
        self.phase_max = mem["stats.phase_max"]
        self.phase_sum = mem["stats.phase_sum"]
        self.phase_count = mem["stats.phase_count"]

    def record_phases(self, stamps: np.ndarray) -> None:
        record_phases(stamps, self.phase_last, self.phase_max, self.phase_sum, self.phase_count)

    def record(self, exec_ns: int, wake_ns: int, jitter_ns: int) -> None:
        record(self.hist, self.ring, self.count, self.max, self.sum, self.last, exec_ns, wake_ns, jitter_ns)

    def reset(self) -> None:
        for a in (self.hist, self.ring, self.count, self.max, self.sum, self.last,
                  self.phase_last, self.phase_max, self.phase_sum, self.phase_count):
            a[...] = 0


def _hist_percentile(hist: np.ndarray, q: float) -> float:
    n = int(hist.sum())
    if n == 0:
        return 0.0
    rank = q * (n - 1) + 1  # 1-based rank of the sample at quantile q
    i = int(np.searchsorted(np.cumsum(hist), rank))
    # upper edge of the bucket: never reports better than measured
    return max(0.0, 2.0 ** ((i + 1) / PER_OCTAVE) - 1.0)


def summarize(mem: dict[str, np.ndarray]) -> dict:
    """p50/p99/p99.9/max (µs) over the run and over the sliding window, per metric."""
    hist = mem["stats.hist"].copy()
    ring = mem["stats.ring"].copy()
    count = mem["stats.count"].copy()
    maxv = mem["stats.max"].copy()
    out: dict = {}
    for m, name in enumerate(METRICS):
        key = name.replace("_ns", "_us")
        n = int(count[m])
        run = {"count": n}
        for label, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
            run[label] = round(min(_hist_percentile(hist[m], q), float(maxv[m])) / 1e3, 3)
        run["max"] = round(float(maxv[m]) / 1e3, 3)
        run["mean"] = round(float(mem["stats.sum"][m]) / n / 1e3, 3) if n else 0.0
        w = min(n, ring.shape[1])
        win = {"count": w}
        if w:
            samples = ring[m, :w] if n <= ring.shape[1] else ring[m]
            for label, q in (("p50", 50), ("p99", 99), ("p99.9", 99.9)):
                win[label] = round(float(np.percentile(samples, q, method="higher")) / 1e3, 3)
            win["max"] = round(float(samples.max()) / 1e3, 3)
        out[key] = {"run": run, "window": win}
    return out


def histogram(mem: dict[str, np.ndarray]) -> dict[str, list[list[float]]]:
    """Non-empty buckets over the run per metric: [[upper edge in µs, count], ...]."""
    hist = mem["stats.hist"].copy()
    out = {}
    for m, name in enumerate(METRICS):
        idx = np.nonzero(hist[m])[0]
        out[name.replace("_ns", "_us")] = [[round((2.0 ** ((i + 1) / PER_OCTAVE) - 1.0) / 1e3, 4), int(hist[m, i])]
                                           for i in idx]
    return out


def phases(mem: dict[str, np.ndarray], names: list[str]) -> dict[str, dict[str, float]]:
    """Per phase: last, mean and max execution time in µs."""
    n = max(int(mem["stats.phase_count"][0]), 1)
    return {name: {"last": round(int(mem["stats.phase_last"][k]) / 1e3, 3),
                   "mean": round(int(mem["stats.phase_sum"][k]) / n / 1e3, 3),
                   "max": round(int(mem["stats.phase_max"][k]) / 1e3, 3)}
            for k, name in enumerate(names)}
