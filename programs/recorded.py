"""The history file of the aggregates, read without a server (and without importing asyncua:
the scan process reads it at a cold start, for the forecast, and must start fast)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

__all__ = ["HISTORY_FILE", "load_series", "class_series", "recorded_priorities", "load_bins"]

HISTORY_FILE = "history.sqlite"
CLASS_PREFIX = "class."


def class_series(priority: int, var: str) -> str:
    """The stored name of a priority class's variable (the OPC UA server's class objects)."""
    return f"{CLASS_PREFIX}{int(priority)}.{var}"


def _connect(p: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{p}?mode=ro", uri=True)


def load_series(path: str | Path, name: str, since_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(unix time s, values) of one recorded aggregate, oldest first; empty when there is no history."""
    p = Path(path)
    if not p.exists():
        return np.empty(0), np.empty(0)
    con = _connect(p)
    try:
        lo = int(since_s * 1e9) if since_s is not None else 0
        rows = con.execute("SELECT t_ns, value FROM samples WHERE name = ? AND t_ns >= ? ORDER BY t_ns",
                           (name, lo)).fetchall()
    finally:
        con.close()
    if not rows:
        return np.empty(0), np.empty(0)
    arr = np.asarray(rows, dtype=np.float64)
    return arr[:, 0] / 1e9, arr[:, 1]


def recorded_priorities(path: str | Path, var: str) -> list[int]:
    """The priorities whose class `var` has a record (sorted); empty when there is no history."""
    p = Path(path)
    if not p.exists():
        return []
    con = _connect(p)
    try:
        # one index seek per distinct name (a DISTINCT would read every sample's index entry: 30 days of
        # them at 1 s); "class/" is the first name after every "class.<...>"
        rows = con.execute(
            "WITH RECURSIVE n(name) AS (SELECT MIN(name) FROM samples WHERE name >= :lo AND name < :hi "
            "UNION ALL SELECT (SELECT MIN(name) FROM samples WHERE name > n.name AND name < :hi) FROM n "
            "WHERE n.name IS NOT NULL) SELECT name FROM n WHERE name IS NOT NULL",
            {"lo": CLASS_PREFIX, "hi": CLASS_PREFIX[:-1] + "/"}).fetchall()
    finally:
        con.close()
    out = []
    for (name,) in rows:
        mid = name[len(CLASS_PREFIX):].partition(".")[0]
        if mid.isdigit() and name == class_series(int(mid), var):
            out.append(int(mid))
    return sorted(out)


def load_bins(path: str | Path, name: str, since_s: float, season_s: float,
              bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A recorded series reduced in the file to one row per season and bin of the season (by wall
    time): (mean time s, bin, mean value, samples), oldest first. Only values that can be a demand
    (finite, >= 0) count. A week of 1 s samples is 600,000 rows: SQLite averages them, and numpy gets
    ~700."""
    p = Path(path)
    if not p.exists():
        return np.empty(0), np.empty(0, np.int64), np.empty(0), np.empty(0)
    s_ns = int(round(season_s * 1e9))
    con = _connect(p)
    try:
        rows = con.execute(
            "SELECT AVG(t_ns), (t_ns % ?) * ? / ? AS j, AVG(value), COUNT(*) FROM samples "
            "WHERE name = ? AND t_ns >= ? AND value >= 0 AND value <= 1e300 "
            "GROUP BY t_ns / ?, j ORDER BY 1",
            (s_ns, int(bins), s_ns, name, int(since_s * 1e9), s_ns)).fetchall()
    finally:
        con.close()
    if not rows:
        return np.empty(0), np.empty(0, np.int64), np.empty(0), np.empty(0)
    a = np.asarray(rows, dtype=np.float64)
    return a[:, 0] / 1e9, a[:, 1].astype(np.int64), a[:, 2], a[:, 3]
