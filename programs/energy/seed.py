"""The class demand profiles a cold start takes from the OPC UA server's history file: each class's
own recorded demand (`class.<priority>.demand_w`), read without a server (programs/recorded.py).

A class's profile is what the class forecast (horizon.py) would have learnt from its record: per bin
of the season, the mean of the recorded samples weighted by their age with the profile's time
constant (`demand_season_tau_s`: the online profile is an exponential mean per bin, each bin visited
once a season), NaN where the record has no sample. A record shorter than a season gives the bins it
covers (the rest are learnt online); none gives nothing (the aggregate's rule then, or a cold start).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vbatt.programs.recorded import class_series, load_bins, recorded_priorities

__all__ = ["SEASONS_READ", "class_profiles", "profile_from_bins"]

SEASONS_READ = 7  # the record read back, as the aggregate's (programs/forecast.py seed_from_history)
VAR = "demand_w"


def profile_from_bins(t_s: np.ndarray, j: np.ndarray, mean: np.ndarray, count: np.ndarray, bins: int,
                      season_tau_s: float) -> np.ndarray:
    """Per bin the age-weighted mean of the recorded (season, bin) means; NaN where none."""
    out = np.full(bins, np.nan)
    ok = (j >= 0) & (j < bins) & np.isfinite(mean) & (count > 0)
    if not ok.any():
        return out
    t_s, j, mean, count = t_s[ok], j[ok], mean[ok], count[ok]
    w = count * np.exp(-(t_s.max() - t_s) / season_tau_s)  # relative to the newest: no underflow
    wsum = np.bincount(j, weights=w, minlength=bins)
    seen = wsum > 0.0
    out[seen] = np.bincount(j, weights=w * mean, minlength=bins)[seen] / wsum[seen]
    return out


def class_profiles(path: Path, now_s: float, season_s: float, bins: int,
                   season_tau_s: float) -> tuple[dict[int, np.ndarray], list[str]]:
    """priority -> its recorded profile (W per bin, NaN: not recorded) for every priority with a record
    of its class demand in the last SEASONS_READ seasons; and one line per class for the log.
    Raises what sqlite3 raises on a file that is not a history (the caller logs it)."""
    out: dict[int, np.ndarray] = {}
    lines = []
    since = now_s - SEASONS_READ * season_s
    for p in recorded_priorities(path, VAR):
        t, j, m, n = load_bins(path, class_series(p, VAR), since, season_s, bins)
        prof = profile_from_bins(t, j, m, n, bins, season_tau_s)
        seen = int(np.isfinite(prof).sum())
        if seen == 0:
            lines.append(f"class {p}: no recorded demand in the last {SEASONS_READ} seasons")
            continue
        out[p] = prof
        span_h = (t.max() - t.min()) / 3600.0 if t.size else 0.0
        what = "whole" if seen == bins else f"{seen}/{bins} bins (the rest learnt online)"
        lines.append(f"class {p}: its own profile, {what}, from {n.sum():.0f} samples over {span_h:.1f} h")
    return out, lines
