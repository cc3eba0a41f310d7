"""Class demand over a horizon (issue #12 part 3): the mean demand of each priority class over the
next H seconds, for the reserve D_k tau_k of the energy program (docs/energy.md "The demand over
the target").

Per class: a daily profile of the demand (`bins` bins, each an exponential mean of the samples that
fall in it, linear between the bins' centres) and Holt smoothing of the deviation from it (a level and
a damped trend in W/s; of the demand itself while the profile is not whole), predicting the *mean
over a window* [now, now + H], not one point a short time ahead as programs/forecast.py does per node:

    F(H) = level + trend * m(H) + mean of the profile over [now, now + H]
    m(H) = damping_s * (1 - damping_s / H * (1 - exp(-H / damping_s)))   (the damped trend's mean)

The profile enters once every bin has been seen (a whole season), or at once when it was seeded:
from the class's own demand the OPC UA server recorded (seed.py; put in place before the class's
first sample by `preseed`, scaled to that sample; a record shorter than a season gives the bins it
has), or from the recorded aggregate's profile (read by the forecast's seed_from_history into the
energy program's memory; a class takes it scaled by its share of the recorded demand at its first
sample). Time constants, not per-sample factors: the update runs at the energy program's sweep rate
and means the same at any rate. O(K * bins covered by H) per update, K classes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["HZ_LEVEL", "HZ_TREND", "HZ_READY", "HZ_T0", "HZ_LAST", "HZ_SEEN", "HZ_N", "horizon_update",
           "horizon_mean", "horizon_replay", "horizon_mae", "preseed"]

# Columns of the per-class state hz[k, HZ_*]: the smoothed deviation of the demand from the profile
# (W; from 0 while the profile is not whole), its damped trend (W/s), first sample seen, wall time
# of the first sample and of the last update, bins of the profile seen; then the check of a seed from
# the class's own record against the hours after its first sample (`_shift_check`): the wall time the
# check ends (0: none), the bin of the first sample, the shift taken (bins), and per bin of the window
# the seed's value before the first sample in it, the sum and the count of the samples seen there.
HZ_LEVEL, HZ_TREND, HZ_READY, HZ_T0, HZ_LAST, HZ_SEEN = 0, 1, 2, 3, 4, 5
HZ_CHECK_END, HZ_CHECK_J0, HZ_SHIFT, HZ_RING = 6, 7, 8, 9
SHIFT_S = 3600.0  # a daylight-saving change moves a load that follows local time by an hour on the UTC bins
CHECK_S = 3.0 * 3600.0  # the hours after the first sample the record is judged on
CHECK_RATIO = 0.5  # a shifted record is taken when it misses at most half of what the record as it is misses
RING_N = 16  # bins of the check window at most (3 h of the default 15-minute bins: 12)
HZ_N = HZ_RING + 3 * RING_N


@njit(nogil=True, cache=True)
def _bin(t_s, season_s, bins):
    return int(((t_s % season_s) / season_s) * bins) % bins


@njit(nogil=True, cache=True)
def _profile(season, k, t_s, season_s):
    """The profile at t_s: linear between the bins' centres (a smooth day has no steps)."""
    bins = season.shape[1]
    x = (t_s % season_s) / season_s * bins - 0.5
    j0 = int(math.floor(x))
    f = x - j0
    return (1.0 - f) * season[k, j0 % bins] + f * season[k, (j0 + 1) % bins]


@njit(nogil=True, cache=True)
def _profile_mean(season, k, t_s, h_s, season_s):
    """The mean of the (piecewise linear) profile over [t_s, t_s + h_s]: exact, segment by segment."""
    bins = season.shape[1]
    w = season_s / bins
    whole = math.floor(h_s / season_s)
    acc = 0.0
    if whole > 0.0:
        tot = 0.0
        for j in range(bins):
            tot += season[k, j]
        acc = whole * season_s * tot / bins
    t = t_s
    end = t_s + (h_s - whole * season_s)
    while t < end:
        # the next bin centre after t
        nxt = (math.floor(t / w - 0.5) + 1.5) * w
        nxt = nxt if nxt > t else nxt + w
        e = min(nxt, end)
        acc += 0.5 * (_profile(season, k, t, season_s) + _profile(season, k, e, season_s)) * (e - t)
        t = e
    return acc / h_s


@njit(nogil=True, cache=True)
def _usable(hz, k, bins):
    return bins > 0 and hz[k, HZ_SEEN] >= bins


@njit(nogil=True, cache=True)
def _check_bins(season_s, bins):
    """(bins of SHIFT_S, bins of the check window); (0, 0) where no shift check applies: bins that do not
    divide an hour, or a season too short for a window and a shift either side (the tests' short days)."""
    w = season_s / bins
    sb = SHIFT_S / w
    nr = int(round(CHECK_S / w))
    if sb < 1.0 or abs(sb - round(sb)) > 1e-9 or nr < 1 or nr > RING_N or nr + 2 * round(sb) >= bins:
        return 0, 0
    return int(round(sb)), nr


@njit(nogil=True, cache=True)
def _seed_at(hz, season, k, i, nr):
    """The seed's value of bin i: saved at the first sample in it when the window saw it, else as it is."""
    bins = season.shape[1]
    r = (i - int(hz[k, HZ_CHECK_J0])) % bins
    if r < nr and hz[k, HZ_RING + 3 * r + 2] > 0.0:
        return hz[k, HZ_RING + 3 * r]
    return season[k, i % bins]


@njit(nogil=True, cache=True)
def _reverse(season, k, a, b):
    while a < b:
        season[k, a], season[k, b] = season[k, b], season[k, a]
        a += 1
        b -= 1


@njit(nogil=True, cache=True)
def _shift_check(hz, season, k, season_s):
    """At the end of the check window: the window's samples (bin means) against the seed as recorded,
    an hour earlier and an hour later, each at its best scale (sum of samples over sum of seed); the
    seed is moved by an hour when that misses at most CHECK_RATIO of what it misses as recorded (a
    daylight-saving change between the record and now: the bins are UTC); else it is left as it is.
    Moved: the seed scaled and rotated in place, the window's bins the means seen in them."""
    bins = season.shape[1]
    sb, nr = _check_bins(season_s, bins)
    j0 = int(hz[k, HZ_CHECK_J0])
    best_s, best_e, best_g, e0 = 0, math.inf, 1.0, math.inf
    for s in (0, -sb, sb):
        so, ss = 0.0, 0.0
        for r in range(nr):
            n = hz[k, HZ_RING + 3 * r + 2]
            if n > 0.0:
                so += hz[k, HZ_RING + 3 * r + 1] / n
                ss += _seed_at(hz, season, k, j0 + r + s, nr)
        if not (ss > 0.0) or not (so > 0.0):
            return
        g = so / ss
        e = 0.0
        for r in range(nr):
            n = hz[k, HZ_RING + 3 * r + 2]
            if n > 0.0:
                e += abs(hz[k, HZ_RING + 3 * r + 1] / n - g * _seed_at(hz, season, k, j0 + r + s, nr))
        if s == 0:
            e0 = e
        if e < best_e:
            best_s, best_e, best_g = s, e, g
    if best_s == 0 or not (best_e < CHECK_RATIO * e0):
        return
    for r in range(nr):  # the seed whole again, then scaled and rotated: new[j] = seed[j + s]
        if hz[k, HZ_RING + 3 * r + 2] > 0.0:
            season[k, (j0 + r) % bins] = hz[k, HZ_RING + 3 * r]
    for j in range(bins):
        season[k, j] *= best_g
    m = best_s % bins
    _reverse(season, k, 0, m - 1)
    _reverse(season, k, m, bins - 1)
    _reverse(season, k, 0, bins - 1)
    for r in range(nr):
        n = hz[k, HZ_RING + 3 * r + 2]
        if n > 0.0:
            season[k, (j0 + r) % bins] = hz[k, HZ_RING + 3 * r + 1] / n
    hz[k, HZ_SHIFT] = best_s


def preseed(hz: np.ndarray, season: np.ndarray, k: int, profile: np.ndarray | None) -> None:
    """Put class k's own recorded profile (W per bin, NaN: a bin the record has not seen) in place
    before its first sample, which decides whether it is used (horizon_update); None: nothing
    recorded. Only for a class that has not started (its state is left alone once it has)."""
    if hz[k, HZ_READY] != 0.0 or season.shape[1] == 0:
        return
    hz[k, HZ_SEEN] = 0.0
    if profile is None or profile.shape[0] != season.shape[1]:
        return
    ok = np.isfinite(profile) & (profile >= 0.0)
    season[k] = np.where(ok, profile, np.nan)
    hz[k, HZ_SEEN] = float(ok.sum())


@njit(nogil=True, cache=True)
def horizon_update(wall_s, k_n, y, hz, season, prior, prior_season, use_prior, level_tau_s, trend_tau_s,
                   damping_s, season_s, season_tau_s, use_own=True):
    """Learn from one sample per class: y[k] (W) at wall-clock time wall_s. hz[k, HZ_*] the state,
    season[k, bins] the profiles (W). prior[0] the recorded aggregate's mean level (NaN: none),
    prior[2] == 1 when prior_season (the same bins) holds its profile as deviations from that mean.
    use_prior: whether a class takes it at its first sample. A class whose own recorded profile was
    put in place before its first sample (preseed: hz[k, HZ_SEEN] bins of it) starts from that when
    use_own: a whole one first, then the aggregate's (use_prior), then a partial one (the bins
    the record missed are learnt online). NaN, infinite or negative samples are skipped."""
    bins = season.shape[1]
    seeded = use_prior and prior.shape[0] > 2 and prior[2] == 1.0 and prior_season.shape[0] == bins
    j_now = _bin(wall_s, season_s, bins) if bins > 0 else 0
    for k in range(k_n):
        v = y[k]
        if not (v >= 0.0) or v == math.inf:
            continue
        if hz[k, HZ_READY] == 0.0:
            if v <= 0.0:  # no node of the class reporting yet (a start): nothing to start from
                continue
            own = hz[k, HZ_SEEN] if use_own and bins > 0 else 0.0
            hz[k, HZ_READY] = 1.0
            hz[k, HZ_T0] = wall_s
            hz[k, HZ_LAST] = wall_s
            hz[k, HZ_TREND] = 0.0
            hz[k, HZ_SEEN] = 0.0
            base = prior[0] + (prior_season[j_now] if seeded else 0.0)
            agg = seeded and base > 0.0 and base < math.inf
            if own >= bins or (own > 0.0 and not agg):
                # the class's own record, scaled to its demand now at this time of day: a class that
                # grew or shrank since (nodes moved between classes) keeps its shape. Unscaled, the level
                # carried the difference while the profile relearnt it too, and the two undershot: a
                # record at 1.3 x made the forecast 3.8 x persistence's error at 5 min, scaled 0.27 x
                # (docs/energy.md, benchmarks/forecast_horizon.py --seeded)
                hz[k, HZ_SEEN] = own
                hz[k, HZ_CHECK_END] = 0.0
                hz[k, HZ_SHIFT] = 0.0
                if own >= bins and _check_bins(season_s, bins)[1] > 0:
                    hz[k, HZ_CHECK_END] = wall_s + CHECK_S
                    hz[k, HZ_CHECK_J0] = j_now
                    for c in range(HZ_RING, HZ_N):
                        hz[k, c] = 0.0
                s_now = season[k, j_now]
                if s_now != s_now:
                    season[k, j_now] = v
                    hz[k, HZ_SEEN] += 1.0
                else:
                    # the profile now (between the bins' centres when whole: a bin's mean is not now)
                    base = _profile(season, k, wall_s, season_s) if own >= bins else s_now
                    share = v / base if base > 0.0 else 1.0
                    for j in range(bins):
                        season[k, j] *= share
                use = _usable(hz, k, bins)
                hz[k, HZ_LEVEL] = v - (_profile(season, k, wall_s, season_s) if use else 0.0)
                continue
            for j in range(bins):
                season[k, j] = math.nan
            if agg:
                # this class's share of the recorded aggregate at this time of day
                share = v / base
                for j in range(bins):
                    season[k, j] = (prior[0] + prior_season[j]) * share
                hz[k, HZ_SEEN] = bins
            elif bins > 0:
                season[k, j_now] = v
                hz[k, HZ_SEEN] = 1.0
            use = _usable(hz, k, bins)
            hz[k, HZ_LEVEL] = v - (_profile(season, k, wall_s, season_s) if use else 0.0)
            continue
        dt = wall_s - hz[k, HZ_LAST]
        if dt <= 0.0:
            continue
        hz[k, HZ_LAST] = wall_s
        was = _usable(hz, k, bins)
        moved = False
        if hz[k, HZ_CHECK_END] > 0.0:
            if wall_s < hz[k, HZ_CHECK_END]:
                r = (j_now - int(hz[k, HZ_CHECK_J0])) % bins
                if r < _check_bins(season_s, bins)[1]:
                    if hz[k, HZ_RING + 3 * r + 2] == 0.0:
                        hz[k, HZ_RING + 3 * r] = season[k, j_now]
                    hz[k, HZ_RING + 3 * r + 1] += v
                    hz[k, HZ_RING + 3 * r + 2] += 1.0
            else:
                hz[k, HZ_CHECK_END] = 0.0
                _shift_check(hz, season, k, season_s)
                moved = hz[k, HZ_SHIFT] != 0.0
        if bins > 0:
            s = season[k, j_now]
            if s != s:
                season[k, j_now] = v
                hz[k, HZ_SEEN] += 1.0
            else:
                # each bin is visited season_s/bins per season: its rate is scaled to that
                g = 1.0 - math.exp(-dt * bins / season_tau_s)
                season[k, j_now] = s + g * (v - s)
        use = _usable(hz, k, bins)
        dev = v - (_profile(season, k, wall_s, season_s) if use else 0.0)
        if use != was or moved:  # the profile has just become whole (or moved): the deviation starts anew
            hz[k, HZ_LEVEL] = dev
            hz[k, HZ_TREND] = 0.0
            continue
        # Holt on the deviation from the profile (on the demand itself while there is none)
        a = 1.0 - math.exp(-dt / level_tau_s)
        b = 1.0 - math.exp(-dt / trend_tau_s)
        prev = hz[k, HZ_LEVEL]
        tr = hz[k, HZ_TREND] * math.exp(-dt / damping_s)
        lv = a * dev + (1.0 - a) * (prev + tr * dt)
        hz[k, HZ_TREND] = b * (lv - prev) / dt + (1.0 - b) * tr
        hz[k, HZ_LEVEL] = lv


@njit(nogil=True, cache=True)
def horizon_mean(wall_s, k, h_s, hz, season, damping_s, season_s):
    """The forecast mean demand of class k over [wall_s, wall_s + h_s] (h_s = 0: now): the demand now,
    the damped trend of its deviation from the profile, and the profile's change from now over the
    window. NaN before the class's first sample. Never negative."""
    if hz[k, HZ_READY] == 0.0:
        return math.nan
    f = hz[k, HZ_LEVEL]
    use = _usable(hz, k, season.shape[1])
    if h_s > 0.0:
        x = h_s / damping_s
        f += hz[k, HZ_TREND] * damping_s * (1.0 - (1.0 - math.exp(-x)) / x)
        if use:
            f += _profile_mean(season, k, wall_s, h_s, season_s)
    elif use:
        f += _profile(season, k, wall_s, season_s)
    return max(0.0, f)


def horizon_replay(y: np.ndarray, dt_s: float, h_s: float, level_tau_s: float, trend_tau_s: float,
                   damping_s: float, season_s: float | None, bins: int, season_tau_s: float,
                   t0_s: float = 0.0, prior: np.ndarray | None = None,
                   prior_season: np.ndarray | None = None, use_prior: bool = True,
                   own: list[np.ndarray | None] | None = None) -> np.ndarray:
    """Replay class demand samples y (time x classes, every dt_s from wall time t0_s) through the
    class forecast; returns the forecast mean over the next h_s made at each sample (NaN before the
    first). own[k]: class k's own recorded profile (preseed). The same functions as the energy
    program runs."""
    steps, k_n = y.shape
    nb = bins if season_s else 0
    hz = np.zeros((k_n, HZ_N))
    season = np.zeros((k_n, max(nb, 1)))[:, :nb]
    for k, profile in enumerate(own or []):
        preseed(hz, season, k, profile)
    pr = np.full(3, np.nan) if prior is None else prior
    ps = np.zeros(max(nb, 1))[:nb] if prior_season is None else prior_season
    out = np.full((steps, k_n), np.nan)
    ss = season_s or 1.0
    for t in range(steps):
        now = t0_s + t * dt_s
        horizon_update(now, k_n, y[t], hz, season, pr, ps, use_prior, level_tau_s, trend_tau_s, damping_s, ss,
                       season_tau_s)
        for k in range(k_n):
            out[t, k] = horizon_mean(now, k, h_s, hz, season, damping_s, ss)
    return out


def window_means(y: np.ndarray, h_steps: int) -> np.ndarray:
    """The mean of y over the next h_steps samples after each sample (rows without a whole window: NaN)."""
    steps = y.shape[0]
    c = np.concatenate([np.zeros((1,) + y.shape[1:]), np.cumsum(y, axis=0)])
    out = np.full(y.shape, np.nan)
    if h_steps < steps:
        out[: steps - h_steps] = (c[1 + h_steps:] - c[1: steps - h_steps + 1]) / h_steps
    return out


def horizon_mae(y: np.ndarray, dt_s: float, h_s: float, start: int, **params) -> tuple[float, float]:
    """(MAE of the class forecast, MAE of persistence), W per class averaged over classes, of the mean
    demand over the next h_s, judged from sample `start` on (after a warm-up)."""
    h = max(1, int(round(h_s / dt_s)))
    truth = window_means(y, h)
    pred = horizon_replay(y, dt_s, h_s, **params)
    rows = slice(start, y.shape[0] - h)
    err_f = np.abs(pred[rows] - truth[rows])
    err_p = np.abs(y[rows] - truth[rows])
    return float(np.nanmean(err_f)), float(np.nanmean(err_p))
