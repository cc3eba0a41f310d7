"""A user program for tests/test_simulate.py: each node's runtime on its own battery (s)."""

from numba import njit


@njit(nogil=True, cache=True)
def own_runtime(capacity_wh, soc, demand_w, runtime_s, soc_min):
    for i in range(soc.shape[0]):
        d = demand_w[i]
        e = capacity_wh[i] * max(0.0, soc[i] - soc_min)
        runtime_s[i] = e * 3600.0 / d if d > 0.0 else 1e9
