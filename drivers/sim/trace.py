"""Demand traces: one value (W) per line, or one column of a CSV file.

Read when the config is validated (so `vbatt check` sees a broken trace, not
the simulator's process at run time) and again where the simulator starts; the
parsed trace is cached by file identity so a fleet of nodes naming one trace
reads it once.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from vbatt.config.textfile import read_text_file

__all__ = ["read_trace"]

EXPECTED = "a UTF-8 text CSV trace (one number per line, or a column of numbers)"


def read_trace(path: str, column: int = 0) -> np.ndarray:
    """The samples of `path` (a read-only array); ValueError of one line naming file and line when it is not a trace."""
    try:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        key = None  # read_text_file says why
    return _read(path, column, key)


@functools.lru_cache(maxsize=64)
def _read(path: str, column: int, _identity) -> np.ndarray:
    text = read_text_file(path, EXPECTED)  # ConfigError is a ValueError
    rows: list[float] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cells = line.split(",")
        if not -len(cells) <= column < len(cells):
            raise ValueError(f"{path}:{n}: no column {column} (the line has {len(cells)}); expected {EXPECTED}")
        cell = cells[column].strip()
        try:
            value = float(cell)
        except ValueError:
            if rows:  # only a header may be non-numeric
                raise ValueError(f"{path}:{n}: not a number: {cell!r}; expected {EXPECTED}") from None
            continue
        if not math.isfinite(value):
            raise ValueError(f"{path}:{n}: {cell!r} is not a finite number; expected {EXPECTED}")
        rows.append(value)
    if not rows:
        raise ValueError(f"{path}: no samples; expected {EXPECTED}")
    out = np.asarray(rows, dtype=np.float64)
    out.flags.writeable = False
    return out
