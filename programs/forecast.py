"""Demand forecast (DESIGN.md §3 step 2): Holt's linear smoothing per node, seasonal where history allows.

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
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
from numba import njit
from pydantic import BaseModel, ConfigDict, Field

from vbatt.program import Ctx, Program
from vbatt.seqblock import ArraySpec

__all__ = ["Forecast", "ForecastParams", "holt_step", "forecast_mae"]

Pos = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ForecastParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    horizon_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0
    level_tau_s: Pos = 0.5
    trend_tau_s: Pos = 20.0
    season_s: Pos | None = None
    season_bins: Annotated[int, Field(ge=2, le=1440)] = 24
    season_tau_s: Pos = 3600.0  # how fast the seasonal profile follows change


@njit(nogil=True, cache=True)
def holt_step(now_s, dt, online, demand_w, forecast_w, level, trend, ready, season, t0,
              horizon_s, level_tau_s, trend_tau_s, season_s, season_tau_s):
    """One forecast pass. `season` has shape (n, bins) (bins = 0: not seasonal); t0[0] = first time seen."""
    if t0[0] != t0[0]:
        t0[0] = now_s
    a = 1.0 - math.exp(-dt / level_tau_s) if dt > 0.0 else 0.0
    b = 1.0 - math.exp(-dt / trend_tau_s) if dt > 0.0 else 0.0
    bins = season.shape[1]
    use_season = bins > 0 and now_s - t0[0] >= season_s
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
            level[i] = y
            trend[i] = 0.0
            ready[i] = 1
            forecast_w[i] = y
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


class Forecast(Program):
    id = "forecast"
    Params = ForecastParams
    reads = ("online", "demand_w")
    writes = ("forecast_w",)

    def _bins(self) -> int:
        return self.params.season_bins if self.params.season_s else 0

    def memory(self) -> list[ArraySpec]:
        n = self.n
        return [ArraySpec("level_w", "f8", (n,)), ArraySpec("trend_w_per_s", "f8", (n,)),
                ArraySpec("ready", "u1", (n,)), ArraySpec("season_w", "f8", (n, max(self._bins(), 1))),
                ArraySpec("t0_s", "f8", (1,))]

    def init(self, img) -> None:
        self.mem(img, "t0_s")[0] = np.nan

    def bind(self, img, ctx):
        p: ForecastParams = self.params
        nd = img.node
        season = self.mem(img, "season_w")[:, : self._bins()]
        arrays = (nd["online"], nd["demand_w"], nd["forecast_w"], self.mem(img, "level_w"),
                  self.mem(img, "trend_w_per_s"), self.mem(img, "ready"), season, self.mem(img, "t0_s"))
        par = (p.horizon_s, p.level_tau_s, p.trend_tau_s, p.season_s or 1.0, p.season_tau_s)
        now, dt = Ctx.NOW_S, Ctx.DT_S

        def step() -> None:
            holt_step(ctx[now], ctx[dt], *arrays, *par)

        return step


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
    for t in range(steps):
        holt_step(t * dt_s, dt_s, online, demand[t], fc, level, trend, ready, season, t0,
                  params.horizon_s, params.level_tau_s, params.trend_tau_s, params.season_s or 1.0,
                  params.season_tau_s)
        preds[t] = fc
    start = steps // 2
    err_f = np.abs(preds[start:steps - h] - demand[start + h:]).mean()
    err_p = np.abs(demand[start:steps - h] - demand[start + h:]).mean()
    return float(err_f), float(err_p)

