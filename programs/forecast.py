"""Demand forecast (docs/design.md §3 step 2): Holt's linear smoothing per node, seasonal where history allows.

Reads: online, demand_w. Writes: forecast_w (the node's demand predicted
`horizon_s` ahead). The aggregate forecast is the sum over online nodes (the
aggregates step), and the controller's deficit is that minus main_limit_w.

O(1) per node per cycle. The smoothing constants are time constants, not
per-sample factors, so the forecast does not change meaning with the cycle
time: alpha = 1 - exp(-dt / level_tau_s), beta likewise. The trend is in W/s.
Seasonal variant (`season_s` set): an additive profile of `season_bins` bins
per node, learnt from the de-trended residual; it is added to the forecast only
after one whole season has been seen (before that there is no history for it).
With a season, give the level a slow time constant and the trend a very long
one: the profile then carries the shape (a fast level and trend chase the
seasonal swings and the forecast overshoots).
Offline nodes and NaN demand keep their last state and forecast.

Seasons follow the wall clock (Ctx.WALL_S), so that a daily profile stays on the
time of day across restarts. After a cold start, the forecast starts from the
aggregate demand the OPC UA server recorded (its history file, when the server
and its history are on): the recent slope of the aggregate gives each node a
starting trend, and with a season, a recorded whole season gives the starting
profile; each node takes the share of its first demand sample in the recorded
aggregate level. Without a usable history (missing, too old, too short) it
starts from nothing, as before; the log says which.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Annotated

import numpy as np
from numba import njit
from pydantic import BaseModel, ConfigDict, Field

from vbatt.kernel.program import Program
from vbatt.kernel.seqblock import ArraySpec

__all__ = ["Forecast", "ForecastParams", "holt_step", "forecast_mae", "seed_from_history", "PRIOR_N"]

log = logging.getLogger("vbatt.forecast")

Pos = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ForecastParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    horizon_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    level_tau_s: Pos = 0.5
    trend_tau_s: Pos = 20.0
    season_s: Pos | None = None
    season_bins: Annotated[int, Field(ge=2, le=1440)] = 24
    season_tau_s: Pos = 3600.0  # how fast the seasonal profile follows change


# Indices of the prior (from the recorded aggregate); NaN = none.
PRIOR_LEVEL, PRIOR_TREND, PRIOR_SEASON, PRIOR_N = 0, 1, 2, 3


@njit(nogil=True, cache=True)
def holt_step(now_s, dt, online, demand_w, forecast_w, level, trend, ready, season, t0, prior_season, prior,
              horizon_s, level_tau_s, trend_tau_s, season_s, season_tau_s):
    """One forecast pass. now_s: wall-clock time (the seasons' phase). `season` has shape (n, bins)
    (bins = 0: not seasonal); t0[0] = first time seen. prior[PRIOR_*]: the recorded aggregate's
    level and trend, and 1 when `prior_season` holds its seasonal profile (NaN: no prior)."""
    if t0[0] != t0[0]:
        t0[0] = now_s
    a = 1.0 - math.exp(-dt / level_tau_s) if dt > 0.0 else 0.0
    b = 1.0 - math.exp(-dt / trend_tau_s) if dt > 0.0 else 0.0
    bins = season.shape[1]
    seeded = prior[PRIOR_SEASON] == 1.0
    use_season = bins > 0 and (seeded or now_s - t0[0] >= season_s)
    agg = prior[PRIOR_LEVEL]
    j_now = 0
    j_ahead = 0
    g = 0.0
    if bins > 0:
        j_now = int(((now_s % season_s) / season_s) * bins) % bins
        j_ahead = int((((now_s + horizon_s) % season_s) / season_s) * bins) % bins
        # each bin is visited season_s/bins per season: scale its learning rate to that
        g = 1.0 - math.exp(-dt * bins / season_tau_s)
    for i in range(online.shape[0]):
        y = demand_w[i]
        if online[i] == 0 or not (y == y) or abs(y) == math.inf:
            continue
        if ready[i] == 0:
            lv = y
            trend[i] = 0.0
            ready[i] = 1
            # With a prior: this node's share of the recorded aggregate at this time of day.
            base = agg + (prior_season[j_now] if bins > 0 and seeded else 0.0)
            if base > 0.0 and base < math.inf:
                share = y / base
                tr = prior[PRIOR_TREND]
                if tr == tr:
                    trend[i] = tr * share
                if bins > 0 and seeded:
                    for j in range(bins):
                        season[i, j] = prior_season[j] * share
                    lv = y - season[i, j_now]
            level[i] = lv
            f = lv + trend[i] * horizon_s
            if use_season:
                f += season[i, j_ahead]
            forecast_w[i] = f
            continue
        s_now = season[i, j_now] if bins > 0 else 0.0
        prev = level[i]
        lv = a * (y - s_now) + (1.0 - a) * (prev + trend[i] * dt)
        if dt > 0.0:
            trend[i] = b * (lv - prev) / dt + (1.0 - b) * trend[i]
        level[i] = lv
        if bins > 0:
            season[i, j_now] += g * ((y - lv) - s_now)
        f = lv + trend[i] * horizon_s
        if use_season:
            f += season[i, j_ahead]
        forecast_w[i] = f


@njit(nogil=True, cache=True)
def forecast_step(wall_s, dt_s, online, demand_w, forecast_w, level_w, trend_w_per_s, ready, season, t0_s,
                  prior_season_w, prior, horizon_s, level_tau_s, trend_tau_s, season_s, season_tau_s):
    """The program's kernel, bound by name (holt_step is the algorithm, also replayed offline)."""
    holt_step(wall_s[0], dt_s[0], online, demand_w, forecast_w, level_w, trend_w_per_s, ready, season, t0_s,
              prior_season_w, prior, horizon_s, level_tau_s, trend_tau_s, season_s, season_tau_s)


class Forecast(Program):
    id = "forecast"
    Params = ForecastParams
    kernel = forecast_step
    writes = ("forecast_w",)

    def _bins(self) -> int:
        return self.params.season_bins if self.params.season_s else 0

    def memory(self) -> list[ArraySpec]:
        n = self.n
        bins = max(self._bins(), 1)
        return [ArraySpec("level_w", "f8", (n,)), ArraySpec("trend_w_per_s", "f8", (n,)),
                ArraySpec("ready", "u1", (n,)), ArraySpec("season_w", "f8", (n, bins)),
                ArraySpec("t0_s", "f8", (1,)), ArraySpec("prior_season_w", "f8", (bins,)),
                ArraySpec("prior", "f8", (PRIOR_N,))]

    history_path: Path | None = None

    def configure(self, cfg) -> None:
        """The OPC UA server's history file, when it records the aggregates."""
        o = cfg.opcua
        if o.enabled and o.history.enabled:
            from vbatt.programs.recorded import HISTORY_FILE

            self.history_path = Path(o.state_dir).expanduser() / HISTORY_FILE

    def init(self, img) -> None:
        self.mem(img, "t0_s")[0] = np.nan
        prior, season = self.mem(img, "prior"), self.mem(img, "prior_season_w")
        prior[:] = np.nan
        season[:] = 0.0
        if self.history_path is None:
            return
        try:
            line = seed_from_history(self.history_path, self.params, time.time(), prior, season[: self._bins()])
        except Exception as exc:  # a damaged history file must not stop the controller
            line = f"recorded history unusable ({type(exc).__name__}: {exc})"
        log.info("forecast: %s", line)

    def bindings(self, img) -> dict:
        return {"season": self.mem(img, "season_w")[:, : self._bins()]}

    def kernel_params(self) -> dict:
        p: ForecastParams = self.params
        return dict(horizon_s=p.horizon_s, level_tau_s=p.level_tau_s, trend_tau_s=p.trend_tau_s,
                    season_s=p.season_s or 1.0, season_tau_s=p.season_tau_s)


def forecast_mae(demand: np.ndarray, dt_s: float, params: ForecastParams) -> tuple[float, float]:
    """Replay a demand trace (time x nodes) through the forecast; returns (MAE forecast, MAE persistence)
    of the prediction `horizon_s` ahead, in W, over the second half of the trace (after warm-up)."""
    steps, n = demand.shape
    h = max(1, int(round(params.horizon_s / dt_s)))
    bins = params.season_bins if params.season_s else 0
    level, trend, ready = np.zeros(n), np.zeros(n), np.zeros(n, np.uint8)
    season = np.zeros((n, max(bins, 1)))[:, :bins]
    t0 = np.full(1, np.nan)
    fc = np.zeros(n)
    online = np.ones(n, np.uint8)
    preds = np.zeros((steps, n))
    no_prior = np.full(PRIOR_N, np.nan)
    for t in range(steps):
        holt_step(t * dt_s, dt_s, online, demand[t], fc, level, trend, ready, season, t0, np.zeros(1), no_prior,
                  params.horizon_s, params.level_tau_s, params.trend_tau_s, params.season_s or 1.0,
                  params.season_tau_s)
        preds[t] = fc
    start = steps // 2
    err_f = np.abs(preds[start:steps - h] - demand[start + h:]).mean()
    err_p = np.abs(demand[start:steps - h] - demand[start + h:]).mean()
    return float(err_f), float(err_p)



def seed_from_history(path: Path, p: ForecastParams, now_s: float, prior: np.ndarray,
                      prior_season: np.ndarray) -> str:
    """Fill `prior` (and `prior_season`, bins of the season) from the recorded aggregate demand;
    returns what was used, for the log. Only recent history counts: a trend older than a few of its
    time constants, or a profile from less than one whole season, says nothing about now."""
    from vbatt.programs.recorded import load_series

    span = max(p.season_s or 0.0, 3.0 * p.trend_tau_s)
    t, y = load_series(path, "demand_w", since_s=now_s - 7.0 * span)
    ok = np.isfinite(y)
    t, y = t[ok], y[ok]
    if t.size < 2:
        return f"no recorded demand in {path}: starting from the first samples"
    window, need = 3.0 * p.trend_tau_s, 2.0 * p.trend_tau_s
    age = now_s - t[-1]
    recent = t >= t[-1] - window
    covered = np.ptp(t[recent])
    # A slope from less than two time constants is noise (or the start-up of the last run).
    trend_ok = age <= window and recent.sum() >= 3 and covered >= need
    if not trend_ok and not p.season_s:
        if age > window:
            return f"recorded demand is {age:.0f} s old: starting from the first samples"
        return f"recorded demand covers less than {need:.0f} s: starting from the first samples"
    used = []
    if trend_ok:
        prior[PRIOR_TREND] = np.polyfit(t[recent] - t[-1], y[recent], 1)[0]
        prior[PRIOR_LEVEL] = y[recent][-1]
        used.append(f"trend {prior[PRIOR_TREND]:+.1f} W/s of the aggregate over its last {covered:.0f} s")
    if p.season_s:
        bins = prior_season.shape[0]
        full = t >= now_s - 7.0 * p.season_s
        tf, yf = t[full], y[full]
        j = (((tf % p.season_s) / p.season_s) * bins).astype(np.int64) % bins
        count = np.bincount(j, minlength=bins)
        if tf.size and np.ptp(tf) >= 0.9 * p.season_s and np.all(count > 0):
            mean = yf.mean()
            prior_season[:] = np.bincount(j, weights=yf - mean, minlength=bins) / count
            prior[PRIOR_SEASON] = 1.0
            prior[PRIOR_LEVEL] = mean  # the level without the season: the kernel adds the bin of now
            used.append(f"seasonal profile from {np.ptp(tf) / 3600:.1f} h of recorded demand")
        else:
            used.append(f"no seasonal profile (the record covers {np.ptp(tf) / 3600 if tf.size else 0:.1f} h "
                        f"and {int(np.sum(count > 0))}/{bins} bins of a {p.season_s / 3600:.1f} h season)")
    if not prior[PRIOR_LEVEL] > 0.0:
        prior[:] = np.nan
        return "recorded demand unusable (no positive level): starting from the first samples"
    return f"started from {path}: " + "; ".join(used)
