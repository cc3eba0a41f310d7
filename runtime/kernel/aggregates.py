"""The virtual battery's aggregates (docs/design.md §1), computed at the end of every cycle."""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["aggregate", "AGG_ORDER", "bind_aggregates"]

# Order of the `out` vector; the scan binds it to the aggregate arrays.
AGG_ORDER = ("demand_w", "forecast_w", "battery_w", "available_discharge_w", "available_charge_w",
             "energy_wh", "soc", "shed_w", "bus_w", "nodes_online", "nodes_tripped")


# Selects instead of `continue`, and the sums may be reordered (fastmath reassoc; NaN is kept):
# the loop vectorises.
@njit(nogil=True, cache=True, fastmath={"reassoc", "nsz"})
def aggregate(online, trip, demand_w, forecast_w, battery_w, shed_w, bus_w, lo_w, hi_w, soc, capacity_wh, out):
    """Reads node inputs, outputs and limits; writes `out` in AGG_ORDER. Offline nodes count only as offline."""
    dem = fc = bat = dis = chg = energy = cap = shed = bus = 0.0
    n_on = n_trip = 0
    for i in range(online.shape[0]):
        on = online[i] != 0
        n_trip += trip[i] != 0
        bat += battery_w[i]
        bus += bus_w[i]
        shed += shed_w[i]
        n_on += on
        dem += demand_w[i] if on else 0.0
        fc += forecast_w[i] if on else 0.0
        dis += max(hi_w[i], 0.0) if on else 0.0
        chg += max(-lo_w[i], 0.0) if on else 0.0
        energy += capacity_wh[i] * soc[i] if on else 0.0
        cap += capacity_wh[i] if on else 0.0
    out[0] = dem
    out[1] = fc
    out[2] = bat
    out[3] = dis
    out[4] = chg
    out[5] = energy
    out[6] = energy / cap if cap > 0.0 else 0.0
    out[7] = shed
    out[8] = bus
    out[9] = n_on
    out[10] = n_trip


def bind_aggregates(img):
    """The end-of-cycle aggregate step, bound once to the image."""
    n, a = img.node, img.agg
    out = np.zeros(len(AGG_ORDER))
    args = (n["online"], n["trip"], n["demand_w"], n["forecast_w"], n["battery_w"], n["shed_w"],
            n["bus_w"], n["lo_w"], n["hi_w"], n["soc"], n["capacity_wh"], out)
    targets = [a[name] for name in AGG_ORDER]
    main_w, bus_w, deficit_w, forecast_w, main_limit_w = (a[k] for k in ("main_w", "bus_w", "deficit_w",
                                                                          "forecast_w", "main_limit_w"))

    def step() -> None:
        aggregate(*args)
        for i, t in enumerate(targets):
            t[0] = out[i]
        main_w[0] = bus_w[0]
        deficit_w[0] = forecast_w[0] - main_limit_w[0]

    return step
