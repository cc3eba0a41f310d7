"""The history file of the aggregates, read without a server (and without importing asyncua:
the scan process reads it at a cold start, for the forecast, and must start fast)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

__all__ = ["HISTORY_FILE", "load_series"]

HISTORY_FILE = "history.sqlite"


def load_series(path: str | Path, name: str, since_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(unix time s, values) of one recorded aggregate, oldest first; empty when there is no history."""
    p = Path(path)
    if not p.exists():
        return np.empty(0), np.empty(0)
    con = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
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
